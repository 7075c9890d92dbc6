"""Upserted tables (``write_mode = "upsert"``, returns): for each key, the latest record wins.

Every valid record of an upserted table is kept, by source, in a history Delta table under
``<lake>/_history/<table>/``, published exactly as an appended table's sources are (one commit
replaces a source's files). The bronze table is the latest-wins view of that history: after a
source's history commit, the winners of every key the source touches (in its new records and in
those it held before) are computed with DuckDB and MERGEd into the bronze Delta table, which the
Parquet dataset then follows. Since winners are always taken from the whole history, a source that
changes, is withdrawn (a strict-mode failure, a path that became a duplicate) or is ingested again
after a crash leaves the table exactly as one clean run over the same sources would.

The winner of a key has the latest ``order_by`` value (``updated_at``); ties go to the source
ingested last (``ingestion_ts``: sources are ingested one by one, in ``src_path`` order within a
run, then Delta source versions in order), then to the later record in it. A record whose
``op_column`` is ``D`` is a tombstone: it wins like any other and is stored with
``is_deleted = true`` (the flag and ``deleted_at`` are set in validation). A key whose every record
is gone from the history is deleted from the bronze table.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.transaction import AddAction, RemoveAction

from bronze_assets.compaction import conform_table
from bronze_assets.faults import step
from bronze_assets.lake import DeltaCommit, Lake, PartitionedWriter, WrittenFile, _link, uri_path
from bronze_assets.readers import normalize_schema
from schemas.schemas import Table

BATCH_ROWS = 131_072
DUCKDB_MEMORY = "512MB"  # the winners of a large load spill to the staging folder beyond this
_GONE = "src_filename"  # null in a merge source row only when its key has no record left


def app_id(table: str) -> str:
    """The application id under which a bronze table's merges record the history version they
    brought in (``DeltaTable.transaction_version``)."""
    return f"bronze.history.{table}"


def commit_upsert(
    lake: Lake,
    table: Table,
    *,
    src_paths: Sequence[str],
    schema: pa.Schema,
    files: Sequence[tuple[Path, WrittenFile]],
    scratch: Path,
    run_id: str,
) -> DeltaCommit | None:
    """Replace the records of ``src_paths`` in the history of ``table`` with ``files`` (each with
    the folder it was written in), then merge the new winners of the keys concerned into the
    bronze Delta table. Returns the bronze commit (None when the bronze table did not change)."""
    history = lake.history
    if not files and history.delta_table(table.name) is None:
        return None
    h = history.commit_delta(
        table=table.name,
        src_paths=src_paths,
        schema=schema,
        partition_by=(),
        files=files,
        scratch=scratch,
        run_id=run_id,
    )
    if h is None:
        return None
    step("history.committed")
    hdir = history.delta_dir(table.name)
    touched = [hdir / p for p in (*h.added, *h.removed)]
    return merge_winners(lake, table, touched=touched, history_version=h.version, run_id=run_id)


def merge_winners(
    lake: Lake,
    table: Table,
    *,
    touched: Sequence[Path],
    history_version: int,
    run_id: str,
) -> DeltaCommit | None:
    """MERGE into the bronze table the winners of the keys found in the history files
    ``touched``, where they differ from the rows it holds, and delete the keys left with no
    record."""
    history = lake.history
    hdt = history.delta_table(table.name)
    assert hdt is not None
    schema = normalize_schema(lake.table_schema(hdt))
    hdir = history.delta_dir(table.name)
    history_files = [str(hdir / p) for p, _, _ in history.active_files(hdt)]
    bronze = lake.ensure_delta(table.name, schema, ())
    bdir = lake.delta_dir(table.name)
    bronze_files = [str(bdir / p) for p, _, _ in lake.active_files(bronze)]
    key = list(table.key)
    tmp = lake.staging_root / f"merge-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(config={"memory_limit": DUCKDB_MEMORY, "temp_directory": str(tmp)})
    props = CommitProperties(
        app_transactions=[Transaction(app_id=app_id(table.name), version=history_version)],
        custom_metadata={"bronze.run_id": run_id, "bronze.operation": "upsert"},
    )
    try:
        if not bronze_files:
            # An empty table (the first load): it gets the winner of every key of the history,
            # all inserts. They are streamed into Parquet files of this project's and committed
            # with the same application transaction: one write, where a MERGE and its rewrite
            # would cost two and hold the whole load in memory.
            # A bounded stream, not the dataset: DuckDB's scan of a pyarrow dataset reads many
            # batches of several files ahead (5M returns: 2.3 GB peak against 1.4 GB this way).
            con.register("history", _scan(_dataset(history_files, schema), None))
            winners = con.sql(f"SELECT * FROM history QUALIFY {_latest(table)} = 1").to_arrow_reader(BATCH_ROWS)
            return _insert(lake, table, bronze, schema, (_conform(b, schema) for b in winners), props, tmp)
        changes = _changes(con, table, schema, key, [str(p) for p in touched], history_files, bronze_files)
        first = next(changes, None)
        if first is None:
            _add_new_columns(lake, bronze, schema)
            return None
        reader = pa.RecordBatchReader.from_batches(schema, _chain(first, changes))
        on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in key)
        (
            bronze.merge(reader, predicate=on, source_alias="s", target_alias="t", merge_schema=True, commit_properties=props)
            .when_matched_delete(predicate=f"s.{_q(_GONE)} IS NULL")
            .when_matched_update_all(predicate=f"s.{_q(_GONE)} IS NOT NULL")
            .when_not_matched_insert_all(predicate=f"s.{_q(_GONE)} IS NOT NULL")
            .execute()
        )
    finally:
        con.close()
        shutil.rmtree(tmp, ignore_errors=True)
    step("merge.committed")
    bronze.update_incremental()
    merged = lake.commit_actions(table.name, bronze.version())
    conformed = conform_table(lake, table, also=merged.added, mirror=False, run_id=run_id)
    return merged if conformed is None else merged.then(conformed)


def _insert(
    lake: Lake,
    table: Table,
    bronze: DeltaTable,
    schema: pa.Schema,
    rows: Iterator[pa.RecordBatch],
    props: CommitProperties,
    tmp: Path,
) -> DeltaCommit | None:
    """Write ``rows`` as new files of the (empty) bronze table, in one commit."""
    token = uuid.uuid4().hex[:12]
    writer = PartitionedWriter(tmp / "insert", schema, partition_by=(), prefix=f"batch-{token}")
    try:
        for batch in rows:
            writer.write(pa.Table.from_batches([batch]))
        files = writer.close()
    except BaseException:
        writer.abort()
        raise
    if not files:
        return None
    bdir = lake.delta_dir(table.name)
    now_ms = int(time.time() * 1000)
    actions: list[AddAction | RemoveAction] = []
    for f in files:
        _link(tmp / "insert" / f.relpath, bdir / f.relpath)
        actions.append(AddAction(path=uri_path(f.relpath), size=f.size, partition_values={}, modification_time=now_ms,
                                 data_change=True, stats=f.stats))  # fmt: skip
    step("merge.linked")
    lake._add_new_columns(bronze, schema)
    bronze.create_write_transaction(actions, mode="append", schema=lake.table_schema(bronze), commit_properties=props)
    step("merge.committed")
    bronze.update_incremental()
    return DeltaCommit(table.name, bronze.version(), [f.relpath for f in files], [])


def catch_up(lake: Lake, table: Table, *, run_id: str) -> DeltaCommit | None:
    """Bring the bronze table up to its history after a run that died between the two: the
    history commits of sources after the one the bronze table's last MERGE recorded (its
    application transaction) are merged now, and mirrored. A no-op when they agree."""
    history = lake.history
    hdt = history.delta_table(table.name)
    if hdt is None:
        return None
    bronze = lake.delta_table(table.name)
    done = (bronze.transaction_version(app_id(table.name)) if bronze is not None else None) or -1
    touched: list[Path] = []
    hdir = history.delta_dir(table.name)
    for version in range(done + 1, hdt.version() + 1):
        if _commit_info(hdir, version).get("bronze.operation") != "ingest":
            continue  # table creation, compaction: no record changed
        commit = history.commit_actions(table.name, version)
        touched += [hdir / p for p in (*commit.added, *commit.removed)]
    if not touched:
        return None
    merged = merge_winners(lake, table, touched=touched, history_version=hdt.version(), run_id=run_id)
    if merged is not None:
        lake.mirror_parquet(merged)
    return merged


def _commit_info(table_dir: Path, version: int) -> dict[str, object]:
    with open(table_dir / "_delta_log" / f"{version:020d}.json", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith('{"commitInfo"'):
                info: dict[str, object] = json.loads(line)["commitInfo"]
                return info
    return {}


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest


def _changes(
    con: duckdb.DuckDBPyConnection,
    table: Table,
    schema: pa.Schema,
    key: list[str],
    touched: list[str],
    history_files: list[str],
    bronze_files: list[str],
) -> Iterator[pa.RecordBatch]:
    """The merge source, in batches of ``schema``: each key's winner where the bronze table does
    not already hold that very record, then a row of only the key (``src_filename`` null) for
    each key the bronze table holds that has no record left."""
    keys = ", ".join(_q(k) for k in key)
    identity = [*key, "src_filename", "src_row_number", "ingestion_ts"]
    con.register("touched", _dataset(touched, pa.schema([schema.field(k) for k in key])))
    con.execute(f"CREATE TEMP TABLE keys AS SELECT DISTINCT {keys} FROM touched")
    # Only the records of the touched keys are read (pyarrow filters each batch and skips row
    # groups by their statistics), a few batches ahead at most: the history may be far larger
    # than what a batch touches.
    first_keys = con.sql(f"SELECT {_q(key[0])} FROM keys").to_arrow_table().column(0)
    wanted = pads.field(key[0]).isin(first_keys)
    con.register("history", _scan(_dataset(history_files, schema), wanted))
    con.register("bronze", _scan(_dataset(bronze_files, pa.schema([schema.field(c) for c in identity])), wanted))
    # DuckDB only picks the rows (the latest record per key); delta-rs's MERGE applies them.
    con.execute(f"CREATE TEMP TABLE winners AS SELECT * FROM history SEMI JOIN keys USING ({keys}) QUALIFY {_latest(table)} = 1")
    con.execute(f"CREATE TEMP TABLE held AS SELECT * FROM bronze SEMI JOIN keys USING ({keys})")
    same = " AND ".join(f"w.{_q(c)} IS NOT DISTINCT FROM h.{_q(c)}" for c in identity)
    columns = ", ".join(f"w.{_q(f.name)}" for f in schema)
    changed = con.sql(f"SELECT {columns} FROM winners w ANTI JOIN held h ON {same}").to_arrow_reader(BATCH_ROWS)
    for batch in changed:
        if batch.num_rows:
            yield _conform(batch, schema)
    gone = con.sql(f"SELECT {keys} FROM held ANTI JOIN winners USING ({keys})").to_arrow_table()
    if gone.num_rows:
        n = gone.num_rows
        arrays = [gone.column(f.name).cast(f.type) if f.name in key else pa.nulls(n, f.type) for f in schema]
        yield from pa.Table.from_arrays(arrays, schema=schema).to_batches(BATCH_ROWS)


def _latest(table: Table) -> str:
    """The rank of a record among its key's, the winner first: the latest ``order_by``, then
    the source ingested last, then the later record in it."""
    assert table.order_by is not None
    keys = ", ".join(_q(k) for k in table.key)
    order = f"{_q(table.order_by)} DESC, ingestion_ts DESC, src_row_number DESC, src_filename DESC"
    return f"row_number() OVER (PARTITION BY {keys} ORDER BY {order})"


def _scan(dataset: pads.Dataset, flt: pads.Expression | None) -> pa.RecordBatchReader:
    return dataset.scanner(filter=flt, batch_size=65_536, batch_readahead=2, fragment_readahead=1).to_reader()


def _dataset(files: list[str], schema: pa.Schema) -> pads.Dataset:
    """The files as one dataset of ``schema`` (columns a file lacks read as null)."""
    if not files:
        return pads.dataset(schema.empty_table())
    return pads.dataset(files, schema=schema, format="parquet")


def _conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([batch.column(i).cast(f.type) for i, f in enumerate(schema)], schema=schema)


def _add_new_columns(lake: Lake, bronze: DeltaTable, schema: pa.Schema) -> None:
    """Columns the history gained although no winner carries them yet: added to the bronze table
    all the same (a MERGE adds them itself when it has rows)."""
    lake._add_new_columns(bronze, schema)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
