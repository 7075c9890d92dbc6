"""Compaction: coalesce small files toward the target size, and keep replace-by-source working
on the coalesced files.

Data files are named after the source that wrote them (``<src_id>-...``), which is how a source's
files are found when it is replaced. Compaction merges files of several sources into files named
``compacted-...``; a later replacement of one of those sources rewrites the compacted files that
may hold its rows (by their ``src_filename`` statistics) without them, in the same Delta commit.

Compaction is a rearrangement, not new data: one Delta commit per table adds the new files and
removes the old ones, all with ``dataChange = false``, and the Parquet dataset then follows that
commit like any other, so both outputs keep exactly the same rows.

delta-rs's own ``DeltaTable.optimize.compact()`` must never be used on these tables: it would
rewrite the files under names of its own (so replace-by-source could no longer find a source's
rows) and it knows nothing of the Parquet mirror (whose files would then no longer be the table's
active files). ``compact_table`` is this project's optimize; ``vacuum_table`` its vacuum.
"""

from __future__ import annotations

import math
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from bronze_assets import lake as lake_mod
from bronze_assets.faults import step
from bronze_assets.lake import DeltaCommit, Lake

if TYPE_CHECKING:
    from bronze_assets.lake import WrittenFile
    from bronze_assets.staging import Settings
    from schemas.schemas import Table

COMPACTED_PREFIX = "compacted-"
ORDER_KEYS = ("src_filename", "src_row_number")

OldFile = tuple[str, int, dict[str, str | None]]


@dataclass(frozen=True)
class _Active:
    """An active file of the Delta table, with what compaction needs to know about it."""

    relpath: str
    size: int
    partition_values: dict[str, str | None]
    src_min: str | None  # src_filename statistics (None when the file has none)
    src_max: str | None

    @property
    def old(self) -> OldFile:
        return (self.relpath, self.size, self.partition_values)

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def folder(self) -> str:
        return self.relpath.rsplit("/", 1)[0] if "/" in self.relpath else ""


@dataclass
class CompactionResult:
    """What compacting one table did. ``files_*`` and ``bytes_*`` count the table's active files
    before and after; ``delta_version`` is the compaction's commit (None when nothing was done)."""

    table: str
    partitions_compacted: int = 0
    files_before: int = 0
    files_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    delta_version: int | None = None


def _active(dt_: DeltaTable, *, shared_only: bool = False) -> list[_Active]:
    """The active files (only those shared by several sources, with ``shared_only``): path
    relative to the table, size, partition values as Delta writes them (strings), and their
    src_filename bounds. Built from vectorised columns: a table may hold many thousand files."""
    actions = lake_mod.add_actions(dt_)
    if actions.num_rows == 0:
        return []
    if shared_only:
        owned = pc.is_valid(pc.struct_field(pc.extract_regex(actions.column("path"), lake_mod.SOURCE_FILE_NAME), "sid"))
        actions = actions.filter(pc.invert(owned))
        if actions.num_rows == 0:
            return []
    old = lake_mod._old_files(actions)
    src_min = _bound_column(actions, "min")
    src_max = _bound_column(actions, "max")
    return [
        _Active(path, size, values, lo, hi)
        for (path, size, values), lo, hi in zip(old, src_min, src_max, strict=True)
    ]


def _bound_column(actions: pa.Table, name: str) -> list[str | None]:
    """The src_filename statistic ``name`` (min or max) of each file (None where it has none)."""
    if name not in actions.column_names:
        return [None] * actions.num_rows
    col = actions.column(name)
    if "src_filename" not in [col.type.field(i).name for i in range(col.type.num_fields)]:
        return [None] * actions.num_rows
    values = pc.struct_field(col, "src_filename")
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    return values.to_pylist()  # type: ignore[no-any-return]


def compacted_files(lake: Lake, dt_: DeltaTable) -> list[OldFile]:
    """Active files of the table written by compaction."""
    return [f.old for f in _active(dt_, shared_only=True) if f.name.startswith(COMPACTED_PREFIX)]


def _placed(files: list[WrittenFile], folder: str, values: dict[str, str | None]) -> list[WrittenFile]:
    """Files a writer put at the root of ``<dir>/<folder>``, with paths relative to ``<dir>``."""
    return [
        replace(f, relpath=f"{folder}/{f.relpath}" if folder else f.relpath, partition_values=dict(values))
        for f in files
    ]


def _writer(directory: Path, schema: pa.Schema, target_file_bytes: int) -> lake_mod.PartitionedWriter:
    return lake_mod.PartitionedWriter(
        directory,
        schema,
        partition_by=(),
        prefix=f"{COMPACTED_PREFIX}{uuid.uuid4().hex[:12]}",
        target_file_bytes=target_file_bytes,
    )


# -- replacing a source inside compacted files -----------------------------------------------------


def _may_hold(f: _Active, src_paths: Sequence[str]) -> bool:
    if f.src_min is None or f.src_max is None:
        return True
    lo, hi = f.src_min, f.src_max
    return any(lo <= p <= hi for p in src_paths)


def _matches(path: Path, src_paths: pa.Array) -> tuple[int, int]:
    """(rows of ``src_paths``, all rows) in the file at ``path``, reading only src_filename."""
    pf = pq.ParquetFile(path)
    if "src_filename" not in pf.schema_arrow.names:
        return 0, pf.metadata.num_rows
    hits = 0
    for batch in pf.iter_batches(columns=["src_filename"]):
        hits += pc.sum(pc.is_in(batch.column(0), value_set=src_paths)).as_py() or 0
    return hits, pf.metadata.num_rows


def rewrite_without_sources(
    lake: Lake, dt_: DeltaTable, table: str, src_paths: Sequence[str], scratch: Path
) -> tuple[list[OldFile], list[WrittenFile]]:
    """Files shared by several sources (batched ingestion, compaction) that hold rows of any of
    ``src_paths``, and their rewrites without those rows (written under ``scratch``).

    Files whose ``src_filename`` bounds exclude every one of ``src_paths`` are not opened; the
    others are scanned, and only those that really hold such rows are returned, each with a
    rewrite of its other rows (none when no row is left) at
    ``scratch/<same folder>/compacted-<token>-<n>.parquet``.
    """
    ordered = sorted(src_paths)
    candidates = [f for f in _active(dt_, shared_only=True) if _may_hold(f, ordered)]
    if not candidates:
        return [], []
    wanted = pa.array(ordered, pa.string())
    removed: list[OldFile] = []
    written: list[WrittenFile] = []
    delta_dir = lake.delta_dir(table)
    for f in candidates:
        path = delta_dir / f.relpath
        hits, rows = _matches(path, wanted)
        if not hits:
            continue
        removed.append(f.old)
        if hits == rows:
            continue
        pf = pq.ParquetFile(path)
        writer = _writer(scratch / f.folder, pf.schema_arrow, lake_mod.TARGET_FILE_BYTES)
        try:
            for batch in pf.iter_batches():
                keep = pc.invert(pc.fill_null(pc.is_in(batch.column("src_filename"), value_set=wanted), False))
                writer.write(pa.Table.from_batches([batch]).filter(keep))
            files = writer.close()
        except BaseException:
            writer.abort()
            raise
        written += _placed(files, f.folder, f.partition_values)
    return removed, written


# -- compaction ----------------------------------------------------------------------------------


Key = tuple[str, int]
_LOWEST_ROW = -(2**63)


def _first_key(path: Path) -> Key | None:
    """A lower bound of the file's smallest (src_filename, src_row_number), from its footer
    statistics; None when they are missing (the file may hold any key)."""
    meta = pq.read_metadata(path)
    names = meta.schema.to_arrow_schema().names
    if "src_filename" not in names or meta.num_row_groups == 0:
        return None
    i_src = names.index("src_filename")
    i_row = names.index("src_row_number") if "src_row_number" in names else None
    srcs: list[str] = []
    rows: list[int] = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        st = group.column(i_src).statistics
        if st is None or not st.has_min_max or not isinstance(st.min, str):
            return None
        srcs.append(st.min)
        rst = group.column(i_row).statistics if i_row is not None else None
        rows.append(rst.min if rst is not None and rst.has_min_max else _LOWEST_ROW)
    return (min(srcs), min(rows))


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.Table:
    """``batch`` with exactly ``schema``'s columns: missing ones (older files of an evolved table)
    are null, others cast when their type differs."""
    n = batch.num_rows
    columns = []
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        if i < 0:
            columns.append(pa.nulls(n, f.type))
        else:
            col = batch.column(i)
            columns.append(col if col.type == f.type else col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _below(data: pa.Table, key: Key) -> int:
    """How many leading rows of ``data`` (sorted by the order keys) sort before ``key``."""
    src, row = data.column("src_filename"), data.column("src_row_number")
    before = pc.or_(pc.less(src, key[0]), pc.and_(pc.equal(src, key[0]), pc.less(row, key[1])))
    return int(pc.sum(pc.fill_null(before, False)).as_py() or 0)


def _ordered(paths: Sequence[Path], schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows of ``paths``, conformed to ``schema``, ordered by (src_filename, src_row_number).

    Files are taken in the order of their smallest key; before a file is read, the rows already
    read that sort before its smallest key are yielded (no file still to read can come before
    them). Memory therefore holds about one input file, plus whatever rows overlap the key range
    of the next one (only files rewritten by an earlier compaction overlap).
    """
    if not all(k in schema.names for k in ORDER_KEYS):
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches():
                yield _conform(batch, schema)
        return
    firsts = [(_first_key(p), p) for p in paths]
    firsts.sort(key=lambda kp: (kp[0] is not None, kp[0] or ("", 0)))
    sort_keys = [(k, "ascending") for k in ORDER_KEYS]
    pending: pa.Table | None = None
    for first, path in firsts:
        if pending is not None and first is not None:
            n = _below(pending, first)
            if n:
                yield pending.slice(0, n)
                pending = pending.slice(n)
        parts = [] if pending is None else [pending]
        parts += [_conform(b, schema) for b in pq.ParquetFile(path).iter_batches()]
        pending = pa.concat_tables(parts).sort_by(sort_keys)
    if pending is not None and pending.num_rows:
        yield pending


def _groups(files: Iterable[_Active], small_file_bytes: int) -> list[list[_Active]]:
    """Per partition, the small files, where there are two or more of them."""
    by_partition: dict[tuple[tuple[str, str | None], ...], list[_Active]] = {}
    for f in files:
        if f.size < small_file_bytes:
            by_partition.setdefault(tuple(sorted(f.partition_values.items())), []).append(f)
    return [sorted(g, key=lambda f: f.relpath) for _, g in sorted(by_partition.items()) if len(g) >= 2]


def compact_table(
    lake: Lake,
    table: Table,
    *,
    target_file_bytes: int = lake_mod.TARGET_FILE_BYTES,
    small_file_bytes: int | None = None,
    run_id: str = "",
) -> CompactionResult:
    """Coalesce, in every partition of ``table``'s Delta table, the active files smaller than
    ``small_file_bytes`` (default: half the target) into ``compacted-...`` files of about
    ``target_file_bytes``, ordered by (src_filename, src_row_number); commit the change in one
    Delta transaction (``dataChange = false``) and make the Parquet dataset follow it.

    A partition with fewer than two small files is left alone, so compacting again right after is
    a no-op (no commit). Needs the lake to itself: run it under the ingestion's run lock.
    """
    small = target_file_bytes // 2 if small_file_bytes is None else small_file_bytes
    if target_file_bytes <= 0 or small > target_file_bytes:
        # With small > target a compacted file could itself count as small: never a fixed point.
        raise ValueError(f"need 0 < small_file_bytes <= target_file_bytes, got {small} and {target_file_bytes}")
    result = CompactionResult(table.name)
    dt_ = lake.delta_table(table.name)
    if dt_ is None:
        return result
    if lake.staging_left_over():
        # A run died part-way: bring the Parquet mirror in line with the Delta log first.
        lake.reconcile(table.name)
    files = _active(dt_)
    result.files_before = result.files_after = len(files)
    result.bytes_before = result.bytes_after = sum(f.size for f in files)
    groups = _groups(files, small)
    if not groups:
        return result

    commit, written = _rewrite(lake, table.name, dt_, groups, target_file_bytes=target_file_bytes, run_id=run_id)
    removed = [f for group in groups for f in group]
    result.partitions_compacted = len(groups)
    result.delta_version = commit.version
    result.files_after = len(files) - len(removed) + len(written)
    result.bytes_after = result.bytes_before - sum(f.size for f in removed) + sum(w.size for w in written)
    return result


def conform_table(lake: Lake, table: Table, *, also: Iterable[str] = (), mirror: bool = True, run_id: str = "") -> DeltaCommit | None:
    """Rewrite, with the table's whole schema and declared types, the active files that lack some
    of its columns (columns added by schema evolution after they were written) and those of
    ``also`` whose embedded Arrow schema has other types (delta-rs's MERGE writes strings as
    ``string_view``, which pyarrow then fails to compare with the table's ``string`` when it
    filters). Every file then reads the same in any engine, and a reader that takes a dataset's
    schema from one file sees every column. One commit that changes no data (None when no file
    needed it); with ``mirror``, the Parquet dataset follows it."""
    dt_ = lake.delta_table(table.name)
    if dt_ is None:
        return None
    schema = lake.table_schema(dt_)
    partition_by = set(dt_.metadata().partition_columns)
    file_schema = pa.schema([f for f in schema if f.name not in partition_by])
    active = _active(dt_)
    actions = pa.table(dt_.get_add_actions(flatten=False))
    counted = actions.column("null_count").to_pylist() if "null_count" in actions.column_names else [None] * len(active)
    counts_by_path = {
        urllib.parse.unquote(str(p)): c or {} for p, c in zip(actions.column("path").to_pylist(), counted, strict=True)
    }
    also = set(also)
    delta_dir = lake.delta_dir(table.name)

    def needs(f: _Active) -> bool:
        if any(counts_by_path.get(f.relpath, {}).get(c.name) is None for c in file_schema):
            return True
        if f.relpath in also:
            written = pq.read_schema(delta_dir / f.relpath)
            return any(not written.field(c.name).type.equals(c.type) for c in file_schema if c.name in written.names)
        return False

    by_partition: dict[tuple[tuple[str, str | None], ...], list[_Active]] = {}
    for f in active:
        if needs(f):
            by_partition.setdefault(tuple(sorted(f.partition_values.items())), []).append(f)
    if not by_partition:
        return None
    groups = [sorted(g, key=lambda f: f.relpath) for _, g in sorted(by_partition.items())]
    commit, _ = _rewrite(
        lake, table.name, dt_, groups, target_file_bytes=lake_mod.TARGET_FILE_BYTES, run_id=run_id, mirror=mirror,
        ordered=False,
    )  # fmt: skip
    return commit


def _rewrite(
    lake: Lake,
    table: str,
    dt_: DeltaTable,
    groups: list[list[_Active]],
    *,
    target_file_bytes: int,
    run_id: str,
    mirror: bool = True,
    ordered: bool = True,
) -> tuple[DeltaCommit, list[WrittenFile]]:
    """Rewrite each group of one partition's files as compacted files with the table's whole
    schema, in one Delta commit that changes no data; with ``mirror``, make the Parquet dataset
    follow it (otherwise the caller does, and the staging folder is left to it)."""
    schema = lake.table_schema(dt_)
    partition_by = list(dt_.metadata().partition_columns)
    file_schema = pa.schema([f for f in schema if f.name not in partition_by])
    delta_dir = lake.delta_dir(table)
    staging = lake.staging_root / f"compaction-{uuid.uuid4().hex[:12]}"
    removed = [f for group in groups for f in group]
    committed = mirrored = False
    try:
        written = [
            w for group in groups for w in _coalesce(group, delta_dir, staging, file_schema, target_file_bytes, ordered=ordered)
        ]
        version = _commit(dt_, delta_dir, staging, written, removed, schema, partition_by, run_id)
        committed = True
        commit = DeltaCommit(table, version, [w.relpath for w in written], [f.relpath for f in removed])
        if mirror:
            lake.mirror_parquet(commit)
        mirrored = True
    finally:
        # Committed but not mirrored: the staging folder stays, so that the next run knows to
        # reconcile the Parquet dataset with the Delta log (as after any run that died). Unmirrored
        # on purpose, the caller's own staging folder marks the same until it mirrors.
        if mirrored or not committed:
            shutil.rmtree(staging, ignore_errors=True)
            lake.remove_empty_staging()
    return commit, written


def _coalesce(
    group: list[_Active],
    delta_dir: Path,
    staging: Path,
    schema: pa.Schema,
    target_file_bytes: int,
    *,
    ordered: bool = True,
) -> list[WrittenFile]:
    """One partition's files rewritten as compacted files under ``staging``: in (src_filename,
    src_row_number) order, or with ``ordered=False`` file after file as they are, streaming
    (conforming large files must not hold one in memory)."""
    folder = group[0].folder
    writer = _writer(staging / folder, schema, target_file_bytes)
    paths = [delta_dir / f.relpath for f in group]
    parts = _ordered(paths, schema) if ordered else (
        _conform(b, schema) for p in paths for b in pq.ParquetFile(p).iter_batches(batch_size=131_072)
    )
    try:
        for part in parts:
            writer.write(part)
        new = writer.close()
        step("rewrite.written")
    except BaseException:
        writer.abort()
        raise
    return _placed(new, folder, group[0].partition_values)


def _commit(
    dt_: DeltaTable,
    delta_dir: Path,
    staging: Path,
    written: list[WrittenFile],
    removed: list[_Active],
    schema: pa.Schema,
    partition_by: list[str],
    run_id: str,
) -> int:
    """Link the new files into the Delta folder and commit them, and the removal of the old
    ones, as one transaction that changes no data; return its version."""
    now_ms = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = []
    for w in written:
        actions.append(
            AddAction(
                path=lake_mod.uri_path(w.relpath),
                size=w.size,
                partition_values=w.partition_values,
                modification_time=now_ms,
                data_change=False,
                stats=w.stats,
            )
        )
    for f in removed:
        actions.append(RemoveAction(lake_mod.uri_path(f.relpath), False, now_ms, f.size, f.partition_values))
    linked: list[Path] = []
    try:
        for w in written:
            lake_mod._link(staging / w.relpath, delta_dir / w.relpath)
            linked.append(delta_dir / w.relpath)
        step("rewrite.linked")
        dt_.create_write_transaction(
            actions,
            mode="append",
            schema=schema,
            partition_by=partition_by or None,
            commit_properties=CommitProperties(
                custom_metadata={"bronze.operation": "compaction", "bronze.run_id": run_id}
            ),
        )
    except Exception:
        # Files the log does not reference would only wait for a full vacuum: unlink them,
        # unless the commit went through after all (then carry on as if it had said so).
        active = {f.relpath for f in _active(DeltaTable(str(delta_dir)))}
        if not written or not all(w.relpath in active for w in written):
            for path in linked:
                lake_mod._remove(path, within=delta_dir)
            raise
    step("rewrite.committed")
    dt_.update_incremental()
    return dt_.version()


def compact_lake(lake: Lake, tables: Iterable[Table], **kwargs: Any) -> list[CompactionResult]:
    """``compact_table`` over every table of ``tables`` that has a Delta table."""
    return [compact_table(lake, t, **kwargs) for t in tables if lake.delta_table(t.name) is not None]


def vacuum_table(lake: Lake, table: str, *, retention_hours: float = 168.0, full: bool = False) -> list[str]:
    """Delete the Delta table's files that it no longer references and that were removed more
    than ``retention_hours`` ago (with ``full``, also files never referenced, such as those of a
    commit that did not happen); return their paths. The Parquet dataset is untouched: its files
    are hard links of the active ones. Like compaction, run it under the ingestion's run lock.
    """
    if retention_hours < 0:
        raise ValueError(f"retention_hours must be >= 0, got {retention_hours}")
    dt_ = lake.delta_table(table)
    if dt_ is None:
        return []
    # The retention asked for is the policy: delta-rs's own minimum (7 days) would forbid the
    # shorter ones a lake that nobody reads old versions of can afford.
    return dt_.vacuum(
        retention_hours=math.ceil(retention_hours),
        dry_run=False,
        enforce_retention_duration=False,
        full=full,
    )


@dataclass
class MaintenanceResult:
    """What ``maintain`` did to one table: compaction of the bronze table and, for an upserted
    table, of its history; the files vacuum deleted from both."""

    table: str
    compaction: CompactionResult
    history: CompactionResult | None = None
    conformed_version: int | None = None
    vacuumed: int = 0


def maintain(
    settings: Settings,
    tables: Iterable[Table],
    *,
    retention_hours: float = 168.0,
    run_id: str = "",
) -> list[MaintenanceResult]:
    """The maintenance job: under the ingestion's run lock (so no run publishes meanwhile),
    finish what a dead run left, then per table rewrite files lacking evolved columns, coalesce
    small files toward ``settings.target_file_bytes`` and vacuum files removed more than
    ``retention_hours`` ago; upserted tables get the same for their history."""
    from bronze_assets.ingest import recover, run_lock

    results = []
    lake = Lake(settings.lake)
    tables = list(tables)
    with run_lock(settings):
        recover(lake, tables, run_id=run_id)
        for table in tables:
            if lake.delta_table(table.name) is None:
                continue
            conformed = conform_table(lake, table, run_id=run_id) if table.write_mode == "upsert" else None
            result = MaintenanceResult(
                table.name,
                compact_table(lake, table, target_file_bytes=settings.target_file_bytes, run_id=run_id),
                conformed_version=conformed.version if conformed is not None else None,
            )
            result.vacuumed = len(vacuum_table(lake, table.name, retention_hours=retention_hours))
            if table.write_mode == "upsert" and lake.history.delta_table(table.name) is not None:
                history = lake.history
                result.history = compact_table(history, table, target_file_bytes=settings.target_file_bytes, run_id=run_id)
                result.vacuumed += len(vacuum_table(history, table.name, retention_hours=retention_hours))
            results.append(result)
    return results
