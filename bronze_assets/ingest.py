"""One ingestion run: discover -> plan -> stage (read, validate, write under staging) ->
publish (Delta commit, Parquet mirror) -> record in the manifest.

This is the single code path behind every front door. The command line runs it through
``run()``; the Dagster assets open a ``Session`` themselves and hand the staged sources to their
IO managers to publish. A session holds an exclusive lock next to the manifest, so a second run
waits for the first and then finds nothing left to do.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bronze_assets.discovery import Discovery, RawSource, discover
from bronze_assets.errors import BadArgument, BronzeError
from bronze_assets.faults import step
from bronze_assets.lake import Lake
from bronze_assets.manifest import INGESTED, Connector, Manifest, ManifestRow, utcnow
from bronze_assets.pipeline import without_huge_pages
from bronze_assets.staging import (
    Batch,
    Outcome,
    Progress,
    Settings,
    Staged,
    Status,
    discard,
    place_rejects,
    publish_delta,
    publish_parquet,
    stage_source,
)
from bronze_assets.upsert import catch_up
from schemas.schemas import TABLES, TABLES_BY_NAME, Table

__all__ = ["Batch", "Outcome", "RunResult", "Session", "Settings", "Status", "run"]


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


def recover(lake: Lake, tables: Sequence[Table], *, run_id: str) -> None:
    """Finish what a run that died left (its staging folder is still there): the Delta log is the
    truth; files it never committed are deleted, the Parquet datasets are brought back in line
    with the Delta tables, and upserted tables catch up with their history. Holds the run lock."""
    history = lake.history
    if lake.staging_left_over() or history.staging_left_over():
        for t in tables:
            lake.remove_orphans(t.name)
            history.remove_orphans(t.name)
            lake.reconcile(t.name)
        lake.clear_staging()
        history.clear_staging()
        for t in tables:
            if t.write_mode == "upsert":
                catch_up(lake, t, run_id=run_id)
        lake.remove_empty_staging()


def _kept_if_gone(staged: Staged) -> Staged:
    """A source that failed because its file went away while it was staged keeps what it
    loaded before, as a file removed between runs does (a run withdraws a source's rows only
    for new content of it)."""
    if staged.outcome.status == "failed" and not staged.source.path.exists():
        staged.replace = False
    return staged


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def run(settings: Settings, *, progress: Progress | None = None) -> RunResult:
    """Ingest every new or changed source under ``settings.raw``."""
    with Session(settings, progress=progress) as session:
        for batch in session.batches(session.sources):
            session.publish(batch)
            session.finish(batch)
        for batch in session.batches(session.orphaned_duplicates()):
            session.publish(batch)
            session.finish(batch)
        return session.result()


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
        self.rows: dict[str, ManifestRow] = {}
        self._sizes: Counter[tuple[str, int | None]] = Counter()  # ingested sources by table and size
        for row in rows.values():
            self.set(row)

    def set(self, row: ManifestRow) -> None:
        old = self.rows.get(row.src_path)
        if old is not None and old.status in INGESTED:
            self._sizes[(old.table_name, old.file_size_bytes)] -= 1
        if row.status in INGESTED:
            self._sizes[(row.table_name, row.file_size_bytes)] += 1
        self.rows[row.src_path] = row

    def may_hold(self, table: str, size: int, *, other_than: str) -> bool:
        """Whether an ingested source of ``table`` other than ``other_than`` is ``size`` bytes
        long: only such a source can hold the same content (the same checksum)."""
        n = self._sizes[(table, size)]
        own = self.rows.get(other_than)
        if own is not None and own.status in INGESTED and (own.table_name, own.file_size_bytes) == (table, size):
            n -= 1
        return n > 0

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


class Session:
    """One run over one lake: the lock, the plan, and each source's stages.

    ``stage(source)`` yields the staged ingestions a source needs (none when it is unchanged; one
    per new version of a Delta source); ``batches(sources)`` stages them and groups them into
    batches, each of which must then be published (``publish``, or its two halves
    ``publish_delta`` and ``publish_parquet``) and recorded (``finish``), in that order.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        progress: Progress | None = None,
        manifest_connector: Connector | None = None,
        run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.say: Progress = progress or (lambda _msg: None)
        self.run_id = run_id or uuid.uuid4().hex
        self._connector = manifest_connector
        self._stack: list[object] = []
        self.outcomes: list[Outcome] = []
        self._unchanged: dict[str, str] = {}
        self._hasher: ThreadPoolExecutor | None = None

    def __enter__(self) -> Session:
        without_huge_pages()
        settings = self.settings
        if not settings.raw.is_dir():
            raise BadArgument(f"raw folder not found: {settings.raw}", argument="--raw")
        self.tables = _select_tables(settings.tables)
        _check_reprocess(settings, self.tables, discover(settings.raw, TABLES))
        self._lock = run_lock(settings)
        self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._release()
            self._lock.__exit__(None, None, None)
            raise
        return self

    def _release(self) -> None:
        manifest: Manifest | None = getattr(self, "manifest", None)  # set by _open
        if manifest is not None:
            manifest.release()

    def _open(self) -> None:
        settings = self.settings
        self.discovery = discover(settings.raw, TABLES, min_file_age=settings.min_file_age)
        _check_reprocess(settings, self.tables, self.discovery)
        wanted = {t.name for t in self.tables}
        self.sources = sorted(
            (
                s
                for s in self.discovery.sources
                if s.table in wanted and (settings.only is None or s.src_path in settings.only)
            ),
            key=_order,
        )
        # Held open for the run (released in __exit__, before the lock).
        self.manifest = Manifest(settings.manifest, read_only=settings.dry_run, connector=self._connector, hold=True)
        self.lake = Lake(settings.lake)
        if not settings.dry_run:
            recover(self.lake, TABLES, run_id=self.run_id)
        self.previous = self.manifest.rows()
        self.state = _State(self.previous)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True, cancel_futures=True)
            if not self.settings.dry_run:
                self.lake.remove_empty_staging()
        finally:
            try:
                self._release()
            finally:
                self._lock.__exit__(exc_type, exc, tb)

    # -- planning and staging ------------------------------------------------------------------

    def stage(self, source: RawSource) -> Iterator[Staged]:
        """The staged ingestions ``source`` needs now (none when nothing changed)."""
        table = TABLES_BY_NAME[source.table]
        settings = self.settings
        if source.format == "delta":
            from bronze_assets.delta_sources import stage_delta_source

            yield from stage_delta_source(source, table, session=self)
            return
        path = source.src_path
        prev = self.state.rows.get(path)
        forced = path in settings.reprocess
        same_stat = prev is not None and (prev.file_size_bytes, prev.file_mtime_ns) == (source.size, source.mtime_ns)
        state = self.state
        if (
            prev
            and not forced
            and same_stat
            and (prev.status in INGESTED or (prev.status == "duplicate" and state.still_duplicate(prev)))
        ):
            self._unchanged[path] = source.table
            return
        checksum_of: Callable[[], str]
        if not (
            state.may_hold(source.table, source.size, other_than=path)
            or (prev and not forced and prev.status in INGESTED and prev.file_size_bytes == source.size)
        ):
            # No source this content could be the same as (none has its size): the checksum
            # is computed while the source is staged, on a thread of its own (hashlib lets go
            # of the GIL), instead of before it on one core with the other idle: 0.36 s for
            # 420 MB here. It is only recorded.
            checksum_of = self._checksums().submit(sha256_file, source.path).result
        else:
            try:
                checksum = sha256_file(source.path)
            except OSError as exc:
                yield self._gone(source, table, exc)
                return
            if prev and not forced and prev.file_checksum == checksum and prev.status in INGESTED:
                self.manifest.touch(path, mtime_ns=source.mtime_ns)
                self._unchanged[path] = source.table
                return
            self._unchanged.pop(path, None)
            original = state.holder(source.table, checksum, other_than=path)
            if original is not None:
                if prev and prev.status == "duplicate" and prev.file_checksum == checksum and prev.duplicate_of == original:
                    self._unchanged[path] = source.table
                    return
                outcome = Outcome(path, source.table, "duplicate", duplicate_of=original)
                # A path that held other content before gives those rows up.
                staged = Staged(source, table, outcome, self.run_id, checksum=checksum)
                staged.replace = bool(prev and prev.status in INGESTED)
                if staged.replace and not settings.dry_run:
                    # The staging folder marks the withdrawal as under way until it is finished.
                    staged.folder = self.lake.staging_root / uuid.uuid4().hex[:12]
                    staged.folder.mkdir(parents=True)
                state.set(_manifest_row(source, outcome, checksum, self.run_id))
                self.say(f"{path}: duplicate of {original}")
                yield staged
                return
            checksum_of = lambda: checksum  # noqa: E731
        self._unchanged.pop(path, None)
        staged = _kept_if_gone(
            stage_source(
                source, table, lake=self.lake, settings=settings, run_id=self.run_id, progress=self.say,
                checksum=checksum_of,
            )
        )  # fmt: skip
        state.set(_manifest_row(source, staged.outcome, staged.checksum, self.run_id))
        yield staged

    def _checksums(self) -> ThreadPoolExecutor:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="bronze-checksum")
        return self._hasher

    def _gone(self, source: RawSource, table: Table, exc: OSError) -> Staged:
        """A source that cannot be read since it was listed (removed, its permissions changed)
        fails alone, with one line, like any error while it is staged; what it loaded before
        stays in the lake (a run never withdraws rows because a file went away), and the next
        run sees it again if it is back."""
        message = f"not readable since it was listed: {exc.strerror or exc}"
        outcome = Outcome(source.src_path, source.table, "failed", error=message)
        self._unchanged.pop(source.src_path, None)
        self.state.set(_manifest_row(source, outcome, None, self.run_id))
        self.say(f"{source.src_path}: {message}")
        return Staged(source, table, outcome, self.run_id, replace=False)

    def orphaned_duplicates(self) -> list[RawSource]:
        """Copies recorded as duplicates whose original no longer holds the same content (it
        changed in this run, even if it sorts after the copy): they load now."""
        out = []
        for source in self.sources:
            row = self.state.rows.get(source.src_path)
            orphaned = row is not None and row.status == "duplicate" and not self.state.still_duplicate(row)
            if source.format != "delta" and orphaned:
                out.append(source)
        return out

    def batches(self, sources: Sequence[RawSource]) -> Iterator[Batch]:
        """Stage ``sources`` (in order) and group them, per table, into batches to publish: a
        batch closes when its table changes, or after a source that left it holding
        BATCH_SOURCES sources or twice the target file size of coalesced rows. The versions of a
        Delta source are never split (one that fails to publish must block those after it)."""
        current: Batch | None = None
        settings, lake = self.settings, self.lake
        for source in sources:
            for staged in self.stage(source):
                if current is not None and current.table.name != staged.table.name:
                    current.close(lake=lake, settings=settings)
                    yield current
                    current = None
                if current is None:
                    current = Batch(staged.table, self.run_id)
                current.add(staged, lake=lake, settings=settings)
            if current is not None and current.full:
                current.close(lake=lake, settings=settings)
                yield current
                current = None
        if current is not None:
            current.close(lake=lake, settings=settings)
            yield current

    # -- publishing and recording --------------------------------------------------------------

    def publish(self, batch: Batch) -> None:
        """Both halves of publishing, in order (the IO managers call them one each)."""
        if not self.settings.dry_run:
            publish_delta(self.lake, batch)
            publish_parquet(self.lake, batch)

    def finish(self, batch: Batch) -> list[Outcome]:
        """Place the rejects, record the outcomes in the manifest (one transaction for the
        batch), clean the staging folders."""
        try:
            if not self.settings.dry_run:
                for staged in batch.members:
                    if not (staged.outcome.error or "").startswith("writing"):
                        place_rejects(self.lake, staged)
                        step("rejects.placed")
                record_outcomes(self.manifest, batch.members, self.run_id)
                step("manifest.recorded")
                marks = [
                    (s.source.src_path.rsplit("@v", 1)[0], s.table.name, s.watermark)
                    for s in batch.members
                    if s.watermark is not None and s.outcome.status != "failed"
                ]
                if marks:
                    self.manifest.set_watermarks(marks)  # type: ignore[arg-type]
                    step("watermark.set")
        finally:
            batch.abort()
            discard(batch)
        for staged in batch.members:
            outcome = staged.outcome
            self.state.set(_manifest_row(staged.source, outcome, staged.checksum, self.run_id))
            self.outcomes.append(outcome)
            if outcome.status != "duplicate":
                self.say(
                    f"{outcome.src_path}: {outcome.status}, {outcome.rows:,} rows, {outcome.reject_count:,} rejected"
                    f" ({outcome.seconds:.1f} s)"
                )
        return batch.outcomes

    def result(self) -> RunResult:
        wanted = {t.name for t in self.tables}
        rows = self.manifest.rows() if not self.settings.dry_run else self.previous
        totals = _totals(rows, self.outcomes, self.settings.dry_run, wanted)
        return RunResult(
            self.run_id,
            self.settings.dry_run,
            self.outcomes,
            Counter(self._unchanged.values()),
            self.discovery.unmatched,
            self.discovery.too_new,
            totals,
        )


def _totals(
    rows: dict[str, ManifestRow], outcomes: list[Outcome], dry_run: bool, tables: set[str]
) -> dict[str, tuple[int, int, Counter[str]]]:
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


def record_outcomes(manifest: Manifest, members: Sequence[Staged], run_id: str) -> None:
    """Record the sources' outcomes, and the columns each carried in the schema history."""
    current = manifest.table_columns()
    rows = []
    schema_rows = []
    for staged in members:
        source, outcome = staged.source, staged.outcome
        rows.append(_manifest_row(source, outcome, staged.checksum, run_id))
        if staged.columns is not None and outcome.status != "failed":
            name = staged.table.name
            schema_rows.append((name, source.src_path, staged.columns, _change(current.get(name), staged.columns)))
            current[name] = staged.columns
    manifest.record(rows, schema_rows=schema_rows)


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


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
