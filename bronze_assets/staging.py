"""Stage sources (read, validate, write their files and rejects under ``lake/_staging/``), then
publish them in batches: one Delta commit per batch, then the Parquet mirror. The run
(``ingest.py``) and the Dagster IO managers call these same functions, each front door in its
own order of steps.

A source is staged whole before anything of it is published. Its valid rows are held in memory
while it is small (up to SMALL_SOURCE_BYTES) and then coalesced with the other small sources of
the batch into shared files, so that a thousand small files make a few well-sized data files and
one commit, not a thousand of each; a larger source writes its own files as it is read.
"""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from bronze_assets.discovery import RawSource
from bronze_assets.errors import SourceFailed, UnreadableFile
from bronze_assets.faults import step
from bronze_assets.lake import (
    TARGET_FILE_BYTES,
    DeltaCommit,
    Lake,
    PartitionedWriter,
    RejectsWriter,
    WrittenFile,
    source_id,
)
from bronze_assets.pipeline import Background, in_order, prefetched
from bronze_assets.readers import RawKind, Reading, open_source
from bronze_assets.upsert import commit_upsert
from bronze_assets.validation import BatchResult, Validator, added_columns, output_schema, rejects_for_file
from schemas.schemas import Table, ValidationMode

Status = Literal["success", "duplicate", "rejected", "failed"]
Progress = Callable[[str], None]
PROGRESS_EVERY_S = 2.0
HOLD_RAW_BYTES = 8 << 20  # sources up to this size on disk are read whole, then validated with others
HOLD_ROWS = 100_000  # ... if they hold no more records than this
VALIDATE_ROWS = 200_000  # held records validated in one statement
COALESCE_ROWS = 250_000  # valid rows of small sources split by partition at once
SMALL_SOURCE_BYTES = 32 << 20  # valid rows of a source held in memory, to be coalesced with others
BATCH_SOURCES = 2_000  # sources published in one commit at most
VALIDATE_THREADS = 2  # DuckDB threads validating one source (the machine's cores)
VALIDATE_LANES = 2  # batches of a text source validated at once, each by one statement
SHARED_PREFIX = "batch-"


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
    only: tuple[str, ...] | None = None  # restrict the run to these sources (Dagster partition keys)
    # A source whose valid rows stay under this many bytes is coalesced with others into shared
    # files; a larger one writes files of its own (0: every source does).
    small_source_bytes: int = SMALL_SOURCE_BYTES


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
class Staged:
    """A source read and validated, its files and rejects written under the staging folder,
    waiting to be published (Delta commit, Parquet mirror) and recorded."""

    source: RawSource
    table: Table
    outcome: Outcome
    run_id: str
    checksum: str | None = None
    columns: list[str] | None = None
    schema: pa.Schema | None = None
    folder: Path | None = None  # lake/_staging/<token>
    files: list[WrittenFile] = field(default_factory=list)
    rejects_path: Path | None = None
    replace: bool = True  # the lake's rows of this source are replaced (by ``files``, maybe none)
    watermark: int | None = None  # a Delta source version to record once published
    # A small source's valid rows, until its batch writes them into the shared files.
    buffered: list[pa.Table] = field(default_factory=list)
    held: _Held | None = None  # a small source read, waiting to be validated with others

    @property
    def data_dir(self) -> Path:
        assert self.folder is not None
        return self.folder / "data"


class _Counting:
    """Stands in for the Parquet writer in a dry run: counts, writes nothing."""

    def __init__(self) -> None:
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.rows += table.num_rows


class _Deferred:
    """The writer of a source that may be small: its rows are held until they pass ``limit``
    bytes, and only then written to the source's own files (``make()``), with the rest."""

    def __init__(self, make: Callable[[], PartitionedWriter], limit: int) -> None:
        self.make = make
        self.limit = limit
        self.tables: list[pa.Table] = []
        self.nbytes = 0
        self.writer: PartitionedWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is not None:
            self.writer.write(table)
            return
        if table.num_rows:
            self.tables.append(table)
            self.nbytes += table.nbytes
        if self.nbytes > self.limit:
            self.writer = self.make()
            for held in self.tables:
                self.writer.write(held)
            self.tables, self.nbytes = [], 0

    def close(self) -> list[WrittenFile]:
        return self.writer.close() if self.writer is not None else []

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self.tables, self.nbytes = [], 0


Writer = PartitionedWriter | _Deferred | _Counting


@dataclass
class Batch:
    """Staged sources of one table published together: one Delta commit adds the files they
    wrote (their own, and the shared ones their held rows were coalesced into) and removes the
    files of what they held before (for an upserted table, in its history, followed by one MERGE
    of the new winners); then each is recorded."""

    table: Table
    run_id: str
    members: list[Staged] = field(default_factory=list)
    folder: Path | None = None  # lake/_staging/<token>: the shared files, under data/
    files: list[WrittenFile] = field(default_factory=list)  # shared files, once closed
    commit: DeltaCommit | None = None
    held_bytes: int = 0
    held_rows: int = 0  # records of held sources not validated yet
    _writer: PartitionedWriter | None = None
    _rows: list[pa.Table] = field(default_factory=list)  # valid rows not given to the writer yet
    _rows_pending: int = 0

    def add(self, staged: Staged, *, lake: Lake, settings: Settings) -> None:
        self.members.append(staged)
        if staged.held is not None:
            self.held_rows += staged.held.rows
            if self.held_rows >= VALIDATE_ROWS:
                self.validate(lake=lake, settings=settings)
            return
        self._coalesce(staged, lake=lake, target_file_bytes=settings.target_file_bytes)

    def validate(self, *, lake: Lake, settings: Settings) -> None:
        """Validate the held sources, then coalesce their valid rows into the shared files."""
        pending = [m for m in self.members if m.held is not None]
        if not pending:
            return
        validate_held(pending, settings=settings)
        self.held_rows = 0
        for m in pending:
            self._coalesce(m, lake=lake, target_file_bytes=settings.target_file_bytes)

    def _coalesce(self, staged: Staged, *, lake: Lake, target_file_bytes: int) -> None:
        if not staged.buffered:
            return
        if self._writer is None:
            token = uuid.uuid4().hex[:12]
            self.folder = lake.staging_root / f"batch-{token}"
            self._writer = PartitionedWriter(
                self.folder / "data",
                staged.schema or output_schema(self.table),
                partition_by=self.table.partition_by,
                prefix=f"{SHARED_PREFIX}{token}",
                target_file_bytes=target_file_bytes,
                folders=lake.folder_maker(self.table.name),
            )
        for held in staged.buffered:
            self._rows.append(held)
            self._rows_pending += held.num_rows
            self.held_bytes += held.nbytes
        staged.buffered = []
        if self._rows_pending >= COALESCE_ROWS:
            self._write_rows()
        step("batch.added")

    def _write_rows(self) -> None:
        # Sources' rows go to the writer in large chunks: it splits a chunk by partition once,
        # where split source by source a thousand small sources would make a million slices.
        if self._rows and self._writer is not None:
            self._writer.write(pa.concat_tables(self._rows).combine_chunks())
        self._rows, self._rows_pending = [], 0

    @property
    def full(self) -> bool:
        return len(self.members) >= BATCH_SOURCES or self.held_bytes >= TARGET_FILE_BYTES * 2

    def close(self, *, lake: Lake, settings: Settings) -> None:
        """Validate what is still held and close the shared files."""
        self.validate(lake=lake, settings=settings)
        self._write_rows()
        if self._writer is not None:
            self.files = self._writer.close()
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    @property
    def outcomes(self) -> list[Outcome]:
        return [m.outcome for m in self.members]

    @property
    def partitions(self) -> set[str]:
        """The hive folders the batch writes to (its shared files and its sources' own)."""
        found = {f.relpath.rsplit("/", 1)[0] for f in self.files if "/" in f.relpath}
        for o in self.outcomes:
            found |= o.partitions
        return found


@dataclass
class _Held:
    """A small source read but not validated yet: its record batches wait to be validated in one
    statement with the other small sources of its batch (``validate_held``)."""

    raw_kind: RawKind
    batches: list[pa.RecordBatch]
    ingestion_ts: dt.datetime
    rejects: RejectsWriter | None
    mode: ValidationMode
    started: float
    rows: int


def stage_source(
    source: RawSource,
    table: Table,
    *,
    lake: Lake,
    settings: Settings,
    run_id: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading] | None = None,
    checksum: Callable[[], str] | None = None,
) -> Staged:
    """Read and validate one source; unless dry, write its files and rejects under staging. A
    small source of an appended table is only read: it is validated with the others of its
    batch (``staged.held`` until then). ``checksum``, when given, is asked for the content's
    checksum once the source is staged (it is being computed meanwhile); a source whose
    checksum cannot be computed fails and loads nothing."""
    started = time.monotonic()
    mode = settings.validation_mode or table.validation_mode
    ingestion_ts = dt.datetime.now(dt.UTC)
    token = uuid.uuid4().hex[:12]
    folder = lake.staging_root / token
    rejects = None if settings.dry_run else RejectsWriter(folder / "rejects.csv")
    outcome = Outcome(source.src_path, source.table, "success")
    staged = Staged(source, table, outcome, run_id, folder=folder)
    writer: Writer | None = None
    opener = opener or open_source
    try:
        reading = opener(source)
        staged.columns, force, staged.schema = _plan(reading, table)
        batches: Iterator[pa.RecordBatch] = iter(reading.batches)
        small = source.size <= min(HOLD_RAW_BYTES, settings.small_source_bytes)
        if force is None and small and table.write_mode != "upsert" and source.format != "delta":
            held, rest = _take(batches, HOLD_ROWS)
            if rest is None:
                _unchanged_while_read(source)
                staged.held = _Held(reading.raw_kind, held, ingestion_ts, rejects, mode, started, sum(b.num_rows for b in held))
                _settle_checksum(staged, checksum)
                step("stage.read")
                return staged
            batches = itertools.chain(held, rest)
        writer = _new_writer(source, table, folder, staged.schema, settings, token, lake, ingestion_ts)
        staged.columns, writer = _stream(
            source, table, batches, reading.raw_kind, staged.columns, force, staged.schema, folder, rejects, outcome,
            settings, ingestion_ts, token, progress, opener, writer, lake,
        )  # fmt: skip
        _unchanged_while_read(source)
    except UnreadableFile as exc:
        if isinstance(writer, PartitionedWriter | _Deferred):
            writer.abort()
        _unreadable(staged, exc, rejects, ingestion_ts)
        writer = None
    except Exception as exc:
        # Not a verdict on the file but an error (a bug, the disk): the source fails with one
        # line, loads nothing, and is tried again by the next run; the others go on.
        if isinstance(writer, PartitionedWriter | _Deferred):
            writer.abort()
        if rejects is not None:
            rejects.discard()
        _failed(staged, exc.detail if isinstance(exc, SourceFailed) else f"reading: {type(exc).__name__}: {exc}")
        writer = None
    _finish_staging(staged, writer, rejects, mode, started)
    _settle_checksum(staged, checksum)
    return staged


def _settle_checksum(staged: Staged, checksum: Callable[[], str] | None) -> None:
    """Take the checksum computed while the source was staged; if it could not be (the file
    unreadable meanwhile), the source fails and what it staged is left out."""
    if checksum is None:
        return
    try:
        staged.checksum = checksum()
    except OSError as exc:
        if staged.outcome.status != "failed":
            _failed(staged, f"checksum: {exc.strerror or exc}")
            staged.files, staged.buffered, staged.rejects_path = [], [], None


def _unchanged_while_read(source: RawSource) -> None:
    """A file that a writer still appends to, or replaced, while it was read gives a mix of
    contents: the source fails (it loads nothing) and the next run reads it again, whole."""
    if source.format == "delta":
        return  # a Delta source is read by version: a new commit is a new version
    try:
        st = source.path.stat()
    except OSError as exc:
        raise SourceFailed(source.src_path, f"gone while it was read: {exc}") from exc
    if (st.st_size, st.st_mtime_ns) != (source.size, source.mtime_ns):
        raise SourceFailed(source.src_path, "changed while it was read; it is read again by the next run")


def _failed(staged: Staged, message: str) -> None:
    source = staged.source
    staged.outcome = Outcome(source.src_path, source.table, "failed", error=message.splitlines()[0][:500])
    staged.columns = None
    staged.held = None


def _unreadable(staged: Staged, exc: UnreadableFile, rejects: RejectsWriter | None, ingestion_ts: dt.datetime) -> None:
    source = staged.source
    if rejects is not None:
        rejects.discard()
    outcome = staged.outcome = Outcome(source.src_path, source.table, "rejected", error=exc.detail)
    outcome.rejects["UNREADABLE_FILE"] = 1
    staged.columns = None
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


def _finish_staging(
    staged: Staged, writer: Writer | None, rejects: RejectsWriter | None, mode: ValidationMode, started: float
) -> None:
    """Strict mode, the files written, the rejects closed, and the outcome's figures."""
    outcome, table = staged.outcome, staged.table
    if outcome.status == "success" and outcome.reject_count and mode == "strict":
        outcome.status = "failed"
        outcome.error = f"strict mode: {outcome.reject_count} record(s) rejected"
        outcome.rows = 0
        if isinstance(writer, PartitionedWriter | _Deferred):
            writer.abort()
        writer = None
    if isinstance(writer, PartitionedWriter | _Deferred):
        staged.files = writer.close()
    if isinstance(writer, _Deferred):
        staged.buffered = writer.tables
    if rejects is not None:
        rejects.close()
        staged.rejects_path = rejects.path
    if staged.schema is None:
        staged.schema = output_schema(table)
    outcome.files = len(staged.files)
    outcome.bytes = sum(f.size for f in staged.files)
    outcome.partitions = {f.relpath.rsplit("/", 1)[0] for f in staged.files if "/" in f.relpath}
    outcome.seconds = time.monotonic() - started
    step("stage.done")


def _take(batches: Iterator[pa.RecordBatch], limit: int) -> tuple[list[pa.RecordBatch], Iterator[pa.RecordBatch] | None]:
    """The batches, if there are at most ``limit`` rows in all (then None for the rest); else
    those taken so far and the iterator of the others."""
    taken: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        taken.append(batch)
        rows += batch.num_rows
        if rows > limit:
            return taken, batches
    return taken, None


def validate_held(members: Sequence[Staged], *, settings: Settings) -> None:
    """Validate the held small sources: one statement per table and source layout (same
    columns, same kind of raw record) for all of them, then each is finished as if validated
    alone. JSON sources that turn out to lack a required key in every record are done again,
    each on its own, as SCHEMA_MISMATCH."""
    groups: dict[tuple[object, ...], list[Staged]] = {}
    for m in members:
        if m.held is None:
            continue
        first = m.held.batches[0].schema if m.held.batches else None
        key = (m.table.name, m.held.raw_kind, first, m.schema)
        groups.setdefault(key, []).append(m)
    for group in groups.values():
        head = group[0]
        assert head.held is not None and head.schema is not None
        with_rows = [m for m in group if m.held is not None and m.held.batches]
        by_src: dict[str, BatchResult] = {}
        try:
            by_src = _validate_together(with_rows)
        except Exception:
            # One source's records broke the shared statement: each is validated on its own, so
            # that the error stays with the source it belongs to.
            for m in with_rows:
                try:
                    by_src.update(_validate_together([m]))
                except Exception as exc:
                    if m.held is not None and m.held.rejects is not None:
                        m.held.rejects.discard()
                    _failed(m, f"validating: {type(exc).__name__}: {exc}")
        for m in group:
            held = m.held
            if held is None:  # failed above
                _finish_staging(m, None, None, "quarantine", time.monotonic())
                continue
            m.held = None
            collected = _Deferred(lambda: None, limit=1 << 62) if not settings.dry_run else _Counting()  # type: ignore[arg-type, return-value]
            res = by_src.get(m.source.src_path)
            outcome = m.outcome
            if res is not None:
                collected.write(res.valid)
                outcome.rows += res.valid.num_rows
                outcome.rejects.update(res.reasons)
                if held.rejects is not None and res.rejects.num_rows:
                    held.rejects.write(res.rejects)
            if held.raw_kind == "json":
                keys = res.keys_present if res is not None else set()
                m.columns = [c for c in m.table.column_names if c in keys or c not in m.table.required]
                missing = tuple(c for c in m.table.required if c not in keys)
                if missing and (outcome.rows or outcome.reject_count):
                    collected = _refuse(m, held, f"missing required key(s) in every record: {', '.join(missing)}")
            _finish_staging(m, collected, held.rejects, held.mode, held.started)


def _validate_together(members: Sequence[Staged]) -> dict[str, BatchResult]:
    """One statement over the held batches of ``members`` (one table, one source layout)."""
    if not members:
        return {}
    head = members[0]
    assert head.held is not None and head.schema is not None
    validator = Validator(
        head.table, source_schema=head.held.batches[0].schema, raw_kind=head.held.raw_kind, output_schema=head.schema
    )
    try:
        results = validator.run_many(
            [(m.held.batches, m.source.src_path, m.held.ingestion_ts) for m in members]  # type: ignore[union-attr]
        )
    finally:
        validator.close()
    return {m.source.src_path: r for m, r in zip(members, results, strict=True)}


def _refuse(staged: Staged, held: _Held, detail: str) -> _Counting:
    """Every record of a held source rejected as SCHEMA_MISMATCH (validated alone)."""
    outcome = staged.outcome
    outcome.rows, outcome.rejects = 0, Counter()
    if held.rejects is not None:
        held.rejects.discard()
    assert staged.schema is not None
    validator = Validator(staged.table, source_schema=held.batches[0].schema, raw_kind=held.raw_kind, output_schema=staged.schema)
    try:
        for batch in held.batches:
            res = validator.run(batch, src_filename=staged.source.src_path, ingestion_ts=held.ingestion_ts, force=("SCHEMA_MISMATCH", detail))
            outcome.rejects.update(res.reasons)
            if held.rejects is not None:
                held.rejects.write(res.rejects)
    finally:
        validator.close()
    outcome.status = "rejected"
    outcome.error = detail
    return _Counting()


def commit_batch(lake: Lake, batch: Batch) -> None:
    """The Delta half of publishing: one commit replacing the rows of the batch's sources with
    the files they wrote (for an upserted table's source, its records in the history, then a
    MERGE of the new winners). A strict-mode failure loads nothing and withdraws what the source
    held before, and so does a path that became a duplicate."""
    table = batch.table
    replacing = [m for m in batch.members if m.replace]
    if not replacing:
        return
    upsert = table.write_mode == "upsert"
    loads = [m for m in replacing if m.outcome.status != "failed"]
    if not loads and (lake.history if upsert else lake).delta_table(table.name) is None:
        return
    schema = _union(m.schema for m in loads) or output_schema(table)
    files = [(m.data_dir, f) for m in loads for f in m.files]
    if batch.folder is not None:
        files += [(batch.folder / "data", f) for f in batch.files]
    publish = commit_upsert if upsert else lake.commit_delta_of
    batch.commit = publish(
        lake,
        table,
        src_paths=[m.source.src_path for m in replacing],
        schema=schema,
        files=files,
        scratch=_scratch(lake, batch.folder or replacing[0].folder),
        run_id=batch.run_id,
    )
    if batch.commit is not None:
        for m in replacing:
            m.outcome.delta_version = batch.commit.version


def _union(schemas: Iterable[pa.Schema | None]) -> pa.Schema | None:
    """Every column of the sources' schemas (an upserted table's sources may add columns)."""
    present = [s for s in schemas if s is not None]
    return pa.unify_schemas(present) if present else None


def _scratch(lake: Lake, folder: Path | None) -> Path:
    """Where a commit writes the shared files it rewrites: inside a staging folder that the
    batch removes once recorded."""
    return (folder if folder is not None else lake.staging_root / uuid.uuid4().hex[:12]) / "rewrites"


def mirror_batch(lake: Lake, batch: Batch) -> None:
    """The Parquet half of publishing: follow the Delta commit."""
    if batch.commit is not None:
        lake.mirror_parquet(batch.commit)


def publish_delta(lake: Lake, batch: Batch) -> None:
    """``commit_batch``, with an error recorded on its sources instead of raised."""
    try:
        commit_batch(lake, batch)
    except Exception as exc:
        _fail(batch, f"writing the lake: {type(exc).__name__}: {exc}")


def publish_parquet(lake: Lake, batch: Batch) -> None:
    """``mirror_batch``, with an error recorded on its sources instead of raised."""
    try:
        mirror_batch(lake, batch)
    except OSError as exc:
        _fail(batch, f"writing the Parquet mirror: {exc}")


def _fail(batch: Batch, message: str) -> None:
    for m in batch.members:
        m.outcome.status = "failed"
        m.outcome.error = message.splitlines()[0]


def place_rejects(lake: Lake, staged: Staged) -> None:
    """Move the staged rejects file to its place (replacing the source's previous one)."""
    if staged.rejects_path is not None and staged.rejects_path.exists():
        lake.write_rejects(staged.table.name, staged.source.src_path, staged.rejects_path)
    elif staged.outcome.status == "duplicate":
        lake.rejects_file(staged.table.name, staged.source.src_path).unlink(missing_ok=True)


def discard(batch: Batch) -> None:
    """Remove the batch's staging folders (the last step of publishing)."""
    for folder in [m.folder for m in batch.members] + [batch.folder]:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _plan(reading: Reading, table: Table) -> tuple[list[str], tuple[str, str] | None, pa.Schema]:
    """The source's columns, the file-level rejection its header already decides (a missing
    required column), and the output schema (with the columns an ``add`` table takes from it)."""
    columns = list(reading.columns)
    force: tuple[str, str] | None = None
    if reading.raw_kind != "json":
        missing = tuple(c for c in table.required if c not in columns)
        if missing:
            force = ("SCHEMA_MISMATCH", f"missing required column(s): {', '.join(missing)}")
    return columns, force, output_schema(table, extra_columns=added_columns(table, columns, reading.schema))


def _new_writer(
    source: RawSource,
    table: Table,
    folder: Path,
    schema: pa.Schema,
    settings: Settings,
    token: str,
    lake: Lake,
    ingestion_ts: dt.datetime,
) -> Writer:
    if settings.dry_run:
        return _Counting()

    def own_files() -> PartitionedWriter:
        return PartitionedWriter(
            folder / "data",
            schema,
            partition_by=table.partition_by,
            prefix=f"{source_id(source.src_path)}-{token}",
            target_file_bytes=settings.target_file_bytes,
            folders=lake.folder_maker(table.name),
            constants={"src_filename": source.src_path, "ingestion_ts": ingestion_ts},  # its rows are all this source's
        )

    if table.write_mode == "upsert":
        return own_files()  # an upserted table's history keeps each source in files of its own
    return _Deferred(own_files, settings.small_source_bytes)


def _stream(
    source: RawSource,
    table: Table,
    batches: Iterator[pa.RecordBatch],
    raw_kind: RawKind,
    columns: list[str],
    force: tuple[str, str] | None,
    out_schema: pa.Schema,
    folder: Path,
    rejects: RejectsWriter | None,
    outcome: Outcome,
    settings: Settings,
    ingestion_ts: dt.datetime,
    token: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading],
    writer: Writer,
    lake: Lake,
) -> tuple[list[str], Writer]:
    """Validate the source's batches as they are read, writing as it goes."""
    keys_seen = _consume(batches, raw_kind, table, out_schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if raw_kind == "json":
        columns = [c for c in table.column_names if c in keys_seen or c not in table.required]
        missing = tuple(c for c in table.required if c not in keys_seen)
        if missing and (outcome.rows or outcome.reject_count):
            # Known only once every record was read: start again, rejecting every record.
            if isinstance(writer, PartitionedWriter | _Deferred):
                writer.abort()
                shutil.rmtree(folder / "data", ignore_errors=True)
            writer = _new_writer(source, table, folder, out_schema, settings, token, lake, ingestion_ts)
            if rejects is not None:
                rejects.discard()
            outcome.rows, outcome.rejects = 0, Counter()
            force = ("SCHEMA_MISMATCH", f"missing required key(s) in every record: {', '.join(missing)}")
            again = opener(source)
            _consume(iter(again.batches), again.raw_kind, table, out_schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if force is not None:
        outcome.status = "rejected"
        outcome.error = force[1]
    return columns, writer


def _consume(
    batches: Iterator[pa.RecordBatch],
    raw_kind: RawKind,
    table: Table,
    schema: pa.Schema,
    writer: Writer,
    rejects: RejectsWriter | None,
    outcome: Outcome,
    source: RawSource,
    ingestion_ts: dt.datetime,
    force: tuple[str, str] | None,
    progress: Progress,
) -> set[str]:
    validators: dict[int, Validator] = {}  # by lane
    keys: set[str] = set()
    last_report = time.monotonic()
    background = Background()
    # Text sources come in many batches of CHUNK_BYTES: two statements of one thread each, on two
    # batches at once, keep both cores busy through the parts of a statement that run on one
    # thread (planning, the hand-over to Arrow) where one statement of two threads leaves a core
    # idle (paired runs, 5M orders: 0.88-0.98 of the time, median 0.91; 2M events: 0.82-0.95).
    # Row sources come in a few large batches, which one statement already spreads over both
    # cores (5M sensors took 1.07x as long in two lanes).
    lanes = 1 if raw_kind == "row" else VALIDATE_LANES

    def validate(batch: pa.RecordBatch, lane: int) -> BatchResult:
        v = validators.get(lane)
        if v is None:  # a lane's statement is made with its first batch
            v = validators[lane] = Validator(
                table,
                source_schema=batch.schema,
                raw_kind=raw_kind,
                output_schema=schema,
                threads=max(1, VALIDATE_THREADS // lanes),
            )
        return v.run(batch, src_filename=source.src_path, ingestion_ts=ingestion_ts, force=force)

    results = in_order(validate, prefetched(batches), lanes=lanes)
    try:
        for res in results:
            keys |= res.keys_present
            background.submit(writer.write, res.valid)
            step("stage.batch")
            outcome.rows += res.valid.num_rows
            outcome.rejects.update(res.reasons)
            if rejects is not None and res.rejects.num_rows:
                rejects.write(res.rejects)
            if time.monotonic() - last_report > PROGRESS_EVERY_S:
                last_report = time.monotonic()
                progress(f"{source.src_path}: {outcome.rows + outcome.reject_count:,} records read ...")
        background.drain()
    finally:
        results.close()  # its lanes stop before their statements close
        background.drain()
        for v in validators.values():
            v.close()
    return keys
