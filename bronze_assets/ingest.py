"""One ingestion run: discover -> plan -> (read -> validate -> stage) -> publish -> record.

This is the single code path behind every front door (command line, Dagster). A run holds an
exclusive lock next to the manifest, so a second run waits for the first and then finds nothing
left to do.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import re
import shutil
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from bronze_assets.discovery import Discovery, RawSource, discover
from bronze_assets.errors import BadArgument, BronzeError, UnreadableFile
from bronze_assets.lake import TARGET_FILE_BYTES, Lake, PartitionedWriter, RejectsWriter, source_id
from bronze_assets.manifest import INGESTED, Manifest, ManifestRow, utcnow
from bronze_assets.readers import Reading, open_source
from bronze_assets.validation import Validator, added_columns, output_schema, rejects_for_file
from schemas.schemas import TABLES, TABLES_BY_NAME, Table, ValidationMode

Status = Literal["success", "duplicate", "rejected", "failed"]
Progress = Callable[[str], None]
PROGRESS_EVERY_S = 2.0


@dataclass(frozen=True)
class Settings:
    """Everything a run needs, resolved once at the front door."""

    raw: Path
    lake: Path
    manifest: Path
    dry_run: bool = False
    tables: tuple[str, ...] | None = None
    validation_mode: ValidationMode | None = None
    reprocess: tuple[str, ...] = ()
    min_file_age: float = 0.0
    target_file_bytes: int = TARGET_FILE_BYTES
    lock_timeout: float | None = None


@dataclass
class Outcome:
    """What happened to one source in a run."""

    src_path: str
    table: str
    status: Status
    rows: int = 0
    rejects: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    files: int = 0
    bytes: int = 0
    partitions: set[str] = field(default_factory=set)
    delta_version: int | None = None
    duplicate_of: str | None = None
    seconds: float = 0.0

    @property
    def reject_count(self) -> int:
        return sum(self.rejects.values())


@dataclass
class RunResult:
    run_id: str
    dry_run: bool
    outcomes: list[Outcome]
    unchanged: Counter[str]
    unmatched: tuple[str, ...]
    too_new: tuple[str, ...]
    # Per table, over every source ingested so far (this run included): sources, rows, rejects.
    totals: dict[str, tuple[int, int, Counter[str]]] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        if any(o.status == "failed" for o in self.outcomes):
            return 2
        if any(o.reject_count for o in self.outcomes):
            return 1
        return 0


def _select_tables(names: Sequence[str] | None) -> list[Table]:
    if names is None:
        return list(TABLES)
    unknown = [n for n in names if n not in TABLES_BY_NAME]
    if unknown:
        raise BadArgument(
            f"unknown table(s): {', '.join(unknown)} (known: {', '.join(TABLES_BY_NAME)})", argument="--tables"
        )
    return [TABLES_BY_NAME[n] for n in names]


@contextmanager
def run_lock(settings: Settings) -> Iterator[None]:
    """Exclusive for a real run (created if missing), shared for a dry run (only if it exists)."""
    path = settings.manifest.with_name(settings.manifest.name + ".lock")
    if settings.dry_run:
        if not path.exists():
            yield
            return
        mode = fcntl.LOCK_SH
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        mode = fcntl.LOCK_EX
    fh = open(path, "rb")  # noqa: SIM115 - closed in finally
    try:
        deadline = None if settings.lock_timeout is None else time.monotonic() + settings.lock_timeout
        while True:
            try:
                fcntl.flock(fh, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise BronzeError(f"another run holds {path} (waited {settings.lock_timeout:g} s)") from None
                time.sleep(0.2)
        yield
    finally:
        fh.close()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(settings: Settings, *, progress: Progress | None = None) -> RunResult:
    """Ingest every new or changed source under ``settings.raw``."""
    if not settings.raw.is_dir():
        raise BadArgument(f"raw folder not found: {settings.raw}", argument="--raw")
    tables = _select_tables(settings.tables)
    _check_reprocess(settings, tables, discover(settings.raw, TABLES))
    run_id = uuid.uuid4().hex
    with run_lock(settings):
        return _run_locked(settings, tables, run_id, progress)


DELTA_VERSION = re.compile(r"^(?P<base>.+)@v(?P<version>[0-9]+)$")


def _check_reprocess(settings: Settings, tables: list[Table], discovery: Discovery) -> None:
    by_path = {s.src_path: s for s in discovery.sources}
    wanted = {t.name for t in tables}
    for p in settings.reprocess:
        m = DELTA_VERSION.match(p)
        source = by_path.get(p) or (by_path.get(m["base"]) if m else None)
        if source is None or (m and source.format != "delta" and p not in by_path):
            raise BadArgument(f"--reprocess: no such source: {p}", argument="--reprocess")
        if source.table not in wanted:
            raise BadArgument(f"--reprocess: not in the selected tables: {p}", argument="--reprocess")


def _order(source: RawSource) -> tuple[str, bool, str]:
    # Within a table: files in src_path order, then Delta sources (their versions in order).
    return (source.table, source.format == "delta", source.src_path)


class _State:
    """The manifest as the run goes: what each source holds now, and who holds which content."""

    def __init__(self, rows: dict[str, ManifestRow]) -> None:
        self.rows = dict(rows)

    def set(self, row: ManifestRow) -> None:
        self.rows[row.src_path] = row

    def holder(self, table: str, checksum: str, *, other_than: str) -> str | None:
        """The first ingested source of ``table`` (by src_path) whose content is ``checksum``."""
        found = [
            r.src_path
            for r in self.rows.values()
            if r.table_name == table and r.file_checksum == checksum and r.status in INGESTED and r.src_path != other_than
        ]
        return min(found) if found else None

    def still_duplicate(self, row: ManifestRow) -> bool:
        original = self.rows.get(row.duplicate_of or "")
        return original is not None and original.status in INGESTED and original.file_checksum == row.file_checksum


def _run_locked(settings: Settings, tables: list[Table], run_id: str, progress: Progress | None) -> RunResult:
    discovery = discover(settings.raw, TABLES, min_file_age=settings.min_file_age)
    _check_reprocess(settings, tables, discovery)
    wanted = {t.name for t in tables}
    sources = sorted((s for s in discovery.sources if s.table in wanted), key=_order)

    manifest = Manifest(settings.manifest, read_only=settings.dry_run)
    lake = Lake(settings.lake)
    if not settings.dry_run:
        lake.clear_staging()
        for t in tables:
            lake.reconcile(t.name)

    previous = manifest.rows()
    state = _State(previous)
    outcomes: list[Outcome] = []
    unchanged: dict[str, str] = {}
    reprocess = set(settings.reprocess)
    say = progress or (lambda _msg: None)

    def process(source: RawSource) -> None:
        table = TABLES_BY_NAME[source.table]
        path = source.src_path
        if source.format == "delta":
            from bronze_assets.delta_sources import ingest_delta_source

            outcomes.extend(
                ingest_delta_source(
                    source, table, lake=lake, manifest=manifest, settings=settings, run_id=run_id, progress=say
                )
            )
            return
        prev = state.rows.get(path)
        forced = path in reprocess
        same_stat = prev is not None and (prev.file_size_bytes, prev.file_mtime_ns) == (source.size, source.mtime_ns)
        if (
            prev
            and not forced
            and same_stat
            and (prev.status in INGESTED or (prev.status == "duplicate" and state.still_duplicate(prev)))
        ):
            unchanged[path] = source.table
            return
        checksum = sha256_file(source.path)
        if prev and not forced and prev.file_checksum == checksum and prev.status in INGESTED:
            manifest.touch(path, mtime_ns=source.mtime_ns)
            unchanged[path] = source.table
            return
        original = state.holder(source.table, checksum, other_than=path)
        if original is not None:
            if prev and prev.status == "duplicate" and prev.file_checksum == checksum and prev.duplicate_of == original:
                unchanged[path] = source.table
                return
            outcome = Outcome(path, source.table, "duplicate", duplicate_of=original)
            row = _manifest_row(source, outcome, checksum, run_id)
            if not settings.dry_run:
                if prev and prev.status in INGESTED:  # it held other content before: withdraw those rows
                    _withdraw(lake, table, path, run_id)
                manifest.record(row)
            state.set(row)
            outcomes.append(outcome)
            say(f"{path}: duplicate of {original}")
            return
        unchanged.pop(path, None)
        outcome, columns = ingest_file(source, table, lake=lake, settings=settings, run_id=run_id, progress=say)
        outcomes.append(outcome)
        state.set(_manifest_row(source, outcome, checksum, run_id))
        if not settings.dry_run:
            record_outcome(manifest, source, outcome, checksum, run_id, table, columns)

    for source in sources:
        process(source)
    # A copy recorded as a duplicate loads when its original no longer holds the same content
    # (the original changed in this run, even if it sorts after the copy).
    for source in sources:
        row = state.rows.get(source.src_path)
        if source.format != "delta" and row is not None and row.status == "duplicate" and not state.still_duplicate(row):
            unchanged.pop(source.src_path, None)
            process(source)
    if not settings.dry_run:
        lake.remove_empty_staging()
    totals = _totals(manifest.rows() if not settings.dry_run else previous, outcomes, settings.dry_run, wanted)
    return RunResult(
        run_id,
        settings.dry_run,
        outcomes,
        Counter(unchanged.values()),
        discovery.unmatched,
        discovery.too_new,
        totals,
    )


def _totals(
    rows: dict[str, ManifestRow], outcomes: list[Outcome], dry_run: bool, tables: set[str]
) -> dict[str, tuple[int, int, Counter[str]]]:
    import json

    per: dict[str, tuple[int, int, Counter[str]]] = {}
    merged: dict[str, tuple[str, str, int, Counter[str]]] = {
        r.src_path: (r.table_name, r.status, r.row_count, Counter(json.loads(r.rejects_by_reason or "{}")))
        for r in rows.values()
    }
    if dry_run:
        for o in outcomes:
            merged[o.src_path] = (o.table, o.status, o.rows, o.rejects)
    for table, status, n, rejects in merged.values():
        if table not in tables or status not in INGESTED:
            continue
        sources, total, reasons = per.get(table, (0, 0, Counter()))
        per[table] = (sources + 1, total + n, reasons + rejects)
    return per


def record_outcome(
    manifest: Manifest,
    source: RawSource,
    outcome: Outcome,
    checksum: str | None,
    run_id: str,
    table: Table,
    columns: list[str] | None,
) -> None:
    """Record a source's outcome, and the columns it carried in the schema history."""
    schema_rows = []
    if columns is not None and outcome.status != "failed":
        before = manifest.table_columns().get(table.name)
        schema_rows.append((table.name, source.src_path, columns, _change(before, columns)))
    manifest.record(_manifest_row(source, outcome, checksum, run_id), schema_rows=schema_rows)


def _change(before: list[str] | None, after: list[str]) -> str | None:
    if before is None:
        return "initial"
    added = [c for c in after if c not in before]
    removed = [c for c in before if c not in after]
    parts = []
    if added:
        parts.append("added: " + ", ".join(added))
    if removed:
        parts.append("missing: " + ", ".join(removed))
    return "; ".join(parts) or None


def _manifest_row(source: RawSource, outcome: Outcome, checksum: str | None, run_id: str) -> ManifestRow:
    import json

    return ManifestRow(
        src_path=source.src_path,
        table_name=source.table,
        file_format=source.format + (".gz" if source.compression == "gzip" else ""),
        file_size_bytes=source.size,
        file_checksum=checksum,
        processed_at=utcnow(),
        row_count=outcome.rows,
        reject_count=outcome.reject_count,
        status=outcome.status,
        error_message=outcome.error,
        run_id=run_id,
        file_mtime_ns=source.mtime_ns,
        duplicate_of=outcome.duplicate_of,
        rejects_by_reason=json.dumps(dict(outcome.rejects)) if outcome.rejects else None,
        delta_version=outcome.delta_version,
    )


def _withdraw(lake: Lake, table: Table, src_path: str, run_id: str, *, keep_rejects: bool = False) -> None:
    dt_ = lake.delta_table(table.name)
    if dt_ is not None:
        schema = output_schema(table)
        lake.publish(
            table=table.name,
            src_path=src_path,
            schema=schema,
            partition_by=table.partition_by,
            staged_dir=lake.staging_root,
            files=[],
            run_id=run_id,
        )
    if not keep_rejects:
        lake.rejects_file(table.name, src_path).unlink(missing_ok=True)


class _Counting:
    """Stands in for the Parquet writer in a dry run: counts, writes nothing."""

    def __init__(self, partition_by: tuple[str, ...]) -> None:
        self.partition_by = partition_by
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows


def ingest_file(
    source: RawSource,
    table: Table,
    *,
    lake: Lake,
    settings: Settings,
    run_id: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading] = open_source,
) -> tuple[Outcome, list[str] | None]:
    """Read, validate and (unless dry) publish one raw source. Returns its outcome and the columns seen.

    ``opener`` reads the source; Delta source versions pass their own.
    """
    started = time.monotonic()
    mode = settings.validation_mode or table.validation_mode
    ingestion_ts = dt.datetime.now(dt.UTC)
    token = uuid.uuid4().hex[:12]
    staged = lake.staging_root / token
    rejects = None if settings.dry_run else RejectsWriter(staged / "rejects.csv")
    outcome = Outcome(source.src_path, source.table, "success")
    columns: list[str] | None = None
    writer: PartitionedWriter | _Counting | None = None
    try:
        columns, writer = _stream(
            source, table, staged, rejects, outcome, settings, ingestion_ts, token, progress, opener
        )
    except UnreadableFile as exc:
        if isinstance(writer, PartitionedWriter):
            writer.abort()
        if rejects is not None:
            rejects.discard()
        outcome = Outcome(source.src_path, source.table, "rejected", error=exc.detail)
        outcome.rejects["UNREADABLE_FILE"] = 1
        if rejects is not None:
            rejects.write(
                rejects_for_file(
                    src_filename=source.src_path,
                    reason="UNREADABLE_FILE",
                    detail=exc.detail,
                    raw_records=[(None, "")],
                    ingestion_ts=ingestion_ts,
                )
            )
        writer = None

    if outcome.status == "success" and outcome.reject_count and mode == "strict":
        outcome.status = "failed"
        outcome.error = f"strict mode: {outcome.reject_count} record(s) rejected"
        outcome.rows = 0
        if isinstance(writer, PartitionedWriter):
            writer.abort()
        writer = None

    if not settings.dry_run:
        assert rejects is not None
        try:
            files = writer.close() if isinstance(writer, PartitionedWriter) else []
            rejects.close()
            if outcome.status == "failed" and lake.delta_table(table.name) is not None:
                # Strict mode loads nothing of the new content, and the old content is gone.
                _withdraw(lake, table, source.src_path, run_id, keep_rejects=True)
            if outcome.status != "failed":
                schema = writer.schema if isinstance(writer, PartitionedWriter) else output_schema(table)
                outcome.delta_version = lake.publish(
                    table=table.name,
                    src_path=source.src_path,
                    schema=schema,
                    partition_by=table.partition_by,
                    staged_dir=staged / "data",
                    files=files,
                    run_id=run_id,
                )
                outcome.files = len(files)
                outcome.bytes = sum(f.size for f in files)
                outcome.partitions = {f.relpath.rsplit("/", 1)[0] for f in files if "/" in f.relpath}
            lake.write_rejects(table.name, source.src_path, rejects.path)
        except (OSError, pa.ArrowException, BronzeError) as exc:
            outcome = Outcome(source.src_path, source.table, "failed", error=f"writing the lake: {exc}")
        finally:
            shutil.rmtree(staged, ignore_errors=True)
    outcome.seconds = time.monotonic() - started
    progress(
        f"{source.src_path}: {outcome.status}, {outcome.rows:,} rows, {outcome.reject_count:,} rejected"
        f" ({outcome.seconds:.1f} s)"
    )
    return outcome, columns


def _stream(
    source: RawSource,
    table: Table,
    staged: Path,
    rejects: RejectsWriter | None,
    outcome: Outcome,
    settings: Settings,
    ingestion_ts: dt.datetime,
    token: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading],
) -> tuple[list[str] | None, PartitionedWriter | _Counting | None]:
    reading = opener(source)
    columns = list(reading.columns)
    force: tuple[str, str] | None = None
    if reading.raw_kind != "json":
        missing = tuple(c for c in table.required if c not in columns)
        if missing:
            force = ("SCHEMA_MISMATCH", f"missing required column(s): {', '.join(missing)}")
    schema = output_schema(table, extra_columns=added_columns(table, columns, reading.schema))
    writer: PartitionedWriter | _Counting
    if settings.dry_run:
        writer = _Counting(table.partition_by)
    else:
        writer = PartitionedWriter(
            staged / "data",
            schema,
            partition_by=table.partition_by,
            prefix=f"{source_id(source.src_path)}-{token}",
            target_file_bytes=settings.target_file_bytes,
        )
    keys_seen = _consume(reading, table, schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if reading.raw_kind == "json":
        columns = [c for c in table.column_names if c in keys_seen or c not in table.required]
        missing = tuple(c for c in table.required if c not in keys_seen)
        if missing and (outcome.rows or outcome.reject_count):
            # Known only once every record was read: start again, rejecting every record.
            if isinstance(writer, PartitionedWriter):
                writer.abort()
                writer = PartitionedWriter(
                    staged / "data2", schema, partition_by=table.partition_by, prefix=f"{source_id(source.src_path)}-{token}"
                )
            if rejects is not None:
                rejects.discard()
            outcome.rows, outcome.rejects = 0, Counter()
            force = ("SCHEMA_MISMATCH", f"missing required key(s) in every record: {', '.join(missing)}")
            _consume(opener(source), table, schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if force is not None:
        outcome.status = "rejected"
        outcome.error = force[1]
    return columns, writer


def _consume(
    reading: Reading,
    table: Table,
    schema: pa.Schema,
    writer: PartitionedWriter | _Counting,
    rejects: RejectsWriter | None,
    outcome: Outcome,
    source: RawSource,
    ingestion_ts: dt.datetime,
    force: tuple[str, str] | None,
    progress: Progress,
) -> set[str]:
    validator: Validator | None = None
    keys: set[str] = set()
    last_report = time.monotonic()
    try:
        for batch in reading.batches:
            if validator is None:
                validator = Validator(table, source_schema=batch.schema, raw_kind=reading.raw_kind, output_schema=schema)
            res = validator.run(batch, src_filename=source.src_path, ingestion_ts=ingestion_ts, force=force)
            keys |= res.keys_present
            writer.write(res.valid)
            outcome.rows += res.valid.num_rows
            outcome.rejects.update(res.reasons)
            if rejects is not None and res.rejects.num_rows:
                rejects.write(res.rejects)
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                progress(f"{source.src_path}: {outcome.rows + outcome.reject_count:,} records read ...")
    finally:
        if validator is not None:
            validator.close()
    return keys


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
