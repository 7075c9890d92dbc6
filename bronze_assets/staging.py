"""Stage one source (read, validate, write its files and rejects under ``lake/_staging/``), then
publish it: the Delta commit, the Parquet mirror. The run (``ingest.py``) and the Dagster IO
managers call these same functions, each front door in its own order of steps.
"""

from __future__ import annotations

import datetime as dt
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa

from bronze_assets.discovery import RawSource
from bronze_assets.errors import UnreadableFile
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
from bronze_assets.readers import Reading, open_source
from bronze_assets.upsert import commit_upsert
from bronze_assets.validation import Validator, added_columns, output_schema, rejects_for_file
from schemas.schemas import Table, ValidationMode

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
    only: tuple[str, ...] | None = None  # restrict the run to these sources (Dagster partition keys)


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
    commit: DeltaCommit | None = None
    watermark: int | None = None  # a Delta source version to record once published

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


def stage_source(
    source: RawSource,
    table: Table,
    *,
    lake: Lake,
    settings: Settings,
    run_id: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading] = open_source,
) -> Staged:
    """Read and validate one source; unless dry, write its files and rejects under staging."""
    started = time.monotonic()
    mode = settings.validation_mode or table.validation_mode
    ingestion_ts = dt.datetime.now(dt.UTC)
    token = uuid.uuid4().hex[:12]
    folder = lake.staging_root / token
    rejects = None if settings.dry_run else RejectsWriter(folder / "rejects.csv")
    outcome = Outcome(source.src_path, source.table, "success")
    staged = Staged(source, table, outcome, run_id, folder=folder)
    writer: PartitionedWriter | _Counting | None = None
    try:
        staged.columns, writer, staged.schema = _stream(
            source, table, folder, rejects, outcome, settings, ingestion_ts, token, progress, opener
        )
    except UnreadableFile as exc:
        if isinstance(writer, PartitionedWriter):
            writer.abort()
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
        writer = None
    if outcome.status == "success" and outcome.reject_count and mode == "strict":
        outcome.status = "failed"
        outcome.error = f"strict mode: {outcome.reject_count} record(s) rejected"
        outcome.rows = 0
        if isinstance(writer, PartitionedWriter):
            writer.abort()
        writer = None
    if isinstance(writer, PartitionedWriter):
        staged.files = writer.close()
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
    return staged


def commit_staged(lake: Lake, staged: Staged) -> None:
    """The Delta half of publishing: one commit replacing the source's rows with its files (for
    an upserted table, its records in the history, then a MERGE of the new winners).
    A strict-mode failure loads nothing and withdraws what the source held before."""
    if not staged.replace:
        return
    failed = staged.outcome.status == "failed"
    table = staged.table
    upsert = table.write_mode == "upsert"
    if failed and (lake.history if upsert else lake).delta_table(table.name) is None:
        return
    kwargs = {
        "src_path": staged.source.src_path,
        "schema": staged.schema if staged.schema is not None and not failed else output_schema(table),
        "staged_dir": staged.data_dir if staged.folder is not None else lake.staging_root,
        "files": [] if failed else staged.files,
        "run_id": staged.run_id,
    }
    if upsert:
        staged.commit = commit_upsert(lake, table, **kwargs)  # type: ignore[arg-type]
    else:
        staged.commit = lake.commit_delta(table=table.name, partition_by=table.partition_by, **kwargs)  # type: ignore[arg-type]
    if staged.commit is not None:
        staged.outcome.delta_version = staged.commit.version


def mirror_staged(lake: Lake, staged: Staged) -> None:
    """The Parquet half of publishing: follow the Delta commit."""
    if staged.commit is not None:
        lake.mirror_parquet(staged.commit)


def publish_delta(lake: Lake, staged: Staged) -> None:
    """``commit_staged``, with an error recorded on the source instead of raised."""
    try:
        commit_staged(lake, staged)
    except Exception as exc:
        _fail(staged, f"writing the lake: {type(exc).__name__}: {exc}")


def publish_parquet(lake: Lake, staged: Staged) -> None:
    """``mirror_staged``, with an error recorded on the source instead of raised."""
    try:
        mirror_staged(lake, staged)
    except OSError as exc:
        _fail(staged, f"writing the Parquet mirror: {exc}")


def _fail(staged: Staged, message: str) -> None:
    staged.outcome.status = "failed"
    staged.outcome.error = message.splitlines()[0]


def place_rejects(lake: Lake, staged: Staged) -> None:
    """Move the staged rejects file to its place (replacing the source's previous one)."""
    if staged.rejects_path is not None and staged.rejects_path.exists():
        lake.write_rejects(staged.table.name, staged.source.src_path, staged.rejects_path)
    elif staged.outcome.status == "duplicate":
        lake.rejects_file(staged.table.name, staged.source.src_path).unlink(missing_ok=True)


def discard(staged: Staged) -> None:
    if staged.folder is not None:
        shutil.rmtree(staged.folder, ignore_errors=True)


def _stream(
    source: RawSource,
    table: Table,
    folder: Path,
    rejects: RejectsWriter | None,
    outcome: Outcome,
    settings: Settings,
    ingestion_ts: dt.datetime,
    token: str,
    progress: Progress,
    opener: Callable[[RawSource], Reading],
) -> tuple[list[str], PartitionedWriter | _Counting, pa.Schema]:
    reading = opener(source)
    columns = list(reading.columns)
    force: tuple[str, str] | None = None
    if reading.raw_kind != "json":
        missing = tuple(c for c in table.required if c not in columns)
        if missing:
            force = ("SCHEMA_MISMATCH", f"missing required column(s): {', '.join(missing)}")
    schema = output_schema(table, extra_columns=added_columns(table, columns, reading.schema))

    def new_writer(sub: str) -> PartitionedWriter | _Counting:
        if settings.dry_run:
            return _Counting()
        return PartitionedWriter(
            folder / sub,
            schema,
            partition_by=table.partition_by,
            prefix=f"{source_id(source.src_path)}-{token}",
            target_file_bytes=settings.target_file_bytes,
        )

    writer = new_writer("data")
    keys_seen = _consume(reading, table, schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if reading.raw_kind == "json":
        columns = [c for c in table.column_names if c in keys_seen or c not in table.required]
        missing = tuple(c for c in table.required if c not in keys_seen)
        if missing and (outcome.rows or outcome.reject_count):
            # Known only once every record was read: start again, rejecting every record.
            if isinstance(writer, PartitionedWriter):
                writer.abort()
                shutil.rmtree(folder / "data", ignore_errors=True)
            writer = new_writer("data")
            if rejects is not None:
                rejects.discard()
            outcome.rows, outcome.rejects = 0, Counter()
            force = ("SCHEMA_MISMATCH", f"missing required key(s) in every record: {', '.join(missing)}")
            _consume(opener(source), table, schema, writer, rejects, outcome, source, ingestion_ts, force, progress)
    if force is not None:
        outcome.status = "rejected"
        outcome.error = force[1]
    return columns, writer, schema


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
            step("stage.batch")
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
