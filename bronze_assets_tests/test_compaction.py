"""Compaction, replace-by-source on compacted files, and vacuum (CONTRACT 6-8)."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from bronze_assets.compaction import (
    COMPACTED_PREFIX,
    compact_lake,
    compact_table,
    rewrite_without_sources,
    vacuum_table,
)
from bronze_assets.ingest import RunResult, Settings, run
from bronze_assets.lake import Lake, uri_path
from schemas.schemas import TABLES, TABLES_BY_NAME

ORDERS = TABLES_BY_NAME["orders"]
RETURNS = TABLES_BY_NAME["returns"]
BIG = 1 << 30  # a target no test file comes near: every partition compacts to one file
ORDERS_HEADER = (
    "order_id,customer_id,store_id,product_id,order_dt,order_ts,quantity,unit_price,"
    "discount_pct,currency,status,payment_method"
)
RETURNS_HEADER = "return_id,order_id,product_id,return_ts,quantity,reason,refund_amount,status,updated_at,op"
DAYS = ("2024-01-02", "2024-01-03", "2024-01-04")
# Five sources over three days: one name with a quote and a space (never pasted into a predicate),
# one too long for the min/max statistics of ingestion (compaction records them all the same).
LONG = "orders/nested/folder/a-source-name-longer-than-32-characters.csv"
SOURCES = {
    "orders/a.csv": 100,
    "orders/b.csv": 200,
    "orders/c o'brien.csv": 300,
    "orders/d.csv": 400,
    LONG: 500,
}


def orders_csv(first_id: int, n: int = 6, *, quantity: int = 2) -> bytes:
    lines = [ORDERS_HEADER]
    for i in range(first_id, first_id + n):
        day = DAYS[i % len(DAYS)]
        lines.append(f"{i},{i % 13},3,{100 + i % 5},{day},{day}T10:00:00Z,{quantity},9.99,5.00,EUR,PAID,card")
    return ("\n".join(lines) + "\n").encode()


def write(path: Path, data: bytes) -> None:
    """Write ``data``; the modification time moves back on every write so a rewrite is always seen."""
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    path.write_bytes(data)
    t = dt.datetime.now().timestamp() - (5 if existed else 60)
    os.utime(path, (t, t))


class LakeEnv:
    """A raw folder, a lake and a manifest under one temporary folder, with ways to read both outputs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw, self.lake_root, self.manifest = root / "raw", root / "lake", root / "m.duckdb"
        self.lake = Lake(self.lake_root)

    def ingest(self, files: dict[str, bytes] | None = None, **overrides: Any) -> RunResult:
        for rel, data in (files or {}).items():
            write(self.raw / rel, data)
        return run(Settings(raw=self.raw, lake=self.lake_root, manifest=self.manifest, **overrides))

    def delta(self, table: str = "orders") -> DeltaTable:
        found = self.lake.delta_table(table)
        assert found is not None
        return found

    def rows(self, table: str = "orders") -> list[dict[str, Any]]:
        """The table's rows, checked to be the same in the Parquet dataset and the Delta table
        (same columns, same multiset of rows), sorted by (src_filename, src_row_number)."""
        t = TABLES_BY_NAME[table]
        types = {c.name: c.type for c in t.columns}
        part = (
            ds.partitioning(pa.schema([(c, types[c]) for c in t.partition_by]), flavor="hive")
            if t.partition_by
            else None
        )
        files = sorted(str(p) for p in self.lake.parquet_dir(table).rglob("*.parquet"))
        # The schema of the newest columns: an older file may lack an evolved column.
        schema = self.lake.table_schema(self.delta(table))
        parquet = ds.dataset(files, schema=schema, format="parquet", partitioning=part,
                             partition_base_dir=str(self.lake.parquet_dir(table))).to_table()  # fmt: skip
        delta = self.delta(table).to_pyarrow_table()
        assert set(parquet.column_names) == set(delta.column_names)
        keys = [("src_filename", "ascending"), ("src_row_number", "ascending")]
        p = parquet.select(delta.column_names).sort_by(keys).to_pylist()
        d = delta.sort_by(keys).to_pylist()
        assert p == d
        return d

    def files(self, table: str = "orders") -> list[str]:
        """The Delta table's active files; asserts the Parquet dataset holds exactly those."""
        active = sorted(p for p, _, _ in self.lake.active_files(self.delta(table)))
        pdir = self.lake.parquet_dir(table)
        assert sorted(p.relative_to(pdir).as_posix() for p in pdir.rglob("*") if p.is_file()) == active
        return active

    def last_commit(self, table: str = "orders") -> list[dict[str, Any]]:
        dt_ = self.delta(table)
        log = self.lake.delta_dir(table) / "_delta_log" / f"{dt_.version():020d}.json"
        return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An orders lake with five sources over three days, each ingested by a run of its own (five
    small files per partition: one run coalesces its small sources into shared files)."""
    env = LakeEnv(tmp_path_factory.mktemp("base"))
    for src, first in SOURCES.items():
        result = env.ingest({src: orders_csv(first)})
        assert [(o.src_path, o.status, o.rows) for o in result.outcomes] == [(src, "success", 6)]
    return env.root


@pytest.fixture
def env(base: Path, tmp_path: Path) -> LakeEnv:
    """A copy of the base lake of one's own (the copies of hard links are plain files: same bytes)."""
    shutil.copytree(base, tmp_path / "env", copy_function=shutil.copy2)
    return LakeEnv(tmp_path / "env")


@pytest.fixture
def compacted(env: LakeEnv) -> LakeEnv:
    result = compact_table(env.lake, ORDERS, target_file_bytes=BIG)
    assert result.delta_version is not None
    return env


def by_source(rows: list[dict[str, Any]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r["src_filename"], []).append(r["order_id"])
    return out


def test_compaction_leaves_one_ordered_file_per_partition_with_the_same_rows(env: LakeEnv) -> None:
    before_rows, before_files = env.rows(), env.files()
    before_bytes = sum(size for _, size, _ in env.lake.active_files(env.delta()))
    version = env.delta().version()
    schema = env.lake.table_schema(env.delta())
    assert len(before_files) == len(SOURCES) * len(DAYS)

    result = compact_table(env.lake, ORDERS, target_file_bytes=BIG, run_id="r1")

    assert (result.table, result.partitions_compacted, result.delta_version) == ("orders", 3, version + 1)
    assert (result.files_before, result.files_after) == (15, 3)
    after = env.files()
    assert result.bytes_before == before_bytes
    assert result.bytes_after == sum(size for _, size, _ in env.lake.active_files(env.delta()))
    assert sorted(p.split("/")[0] for p in after) == [f"order_dt={d}" for d in DAYS]
    assert all(p.split("/")[1].startswith(COMPACTED_PREFIX) for p in after)
    assert env.rows() == before_rows
    assert env.lake.table_schema(env.delta()) == schema
    for rel in after:
        data = pq.read_table(env.lake.parquet_dir("orders") / rel)
        assert "order_dt" not in data.column_names
        keys = list(
            zip(data.column("src_filename").to_pylist(), data.column("src_row_number").to_pylist(), strict=True)
        )
        assert keys == sorted(keys)
    # One commit: the new files added and the old ones removed, none of it a change of data.
    actions = env.last_commit()
    assert env.delta().version() == version + 1
    adds = [a["add"] for a in actions if "add" in a]
    removes = [a["remove"] for a in actions if "remove" in a]
    assert sorted(a["path"] for a in adds) == after
    assert sorted(r["path"] for r in removes) == sorted(uri_path(p) for p in before_files)
    assert all(a["dataChange"] is False for a in adds + removes)
    assert all(a["partitionValues"]["order_dt"] == a["path"][9:19] for a in adds)
    info = next(a["commitInfo"] for a in actions if "commitInfo" in a)
    assert (info["bronze.operation"], info["bronze.run_id"]) == ("compaction", "r1")
    # Stats carry src_filename bounds (cut to 32 characters, as Delta writers do), so
    # replace-by-source can skip files.
    stats = json.loads(adds[0]["stats"])
    assert stats["minValues"]["src_filename"] == "orders/a.csv"
    assert stats["maxValues"]["src_filename"] > LONG and len(stats["maxValues"]["src_filename"]) <= 32
    assert not env.lake.staging_root.exists()


def test_compacting_again_is_a_no_op(compacted: LakeEnv) -> None:
    version, files = compacted.delta().version(), compacted.files()
    result = compact_table(compacted.lake, ORDERS, target_file_bytes=BIG)
    assert result.delta_version is None
    assert (result.partitions_compacted, result.files_before, result.files_after) == (0, 3, 3)
    assert compacted.delta().version() == version
    assert compacted.files() == files


def test_only_small_files_are_compacted(env: LakeEnv) -> None:
    # One big source on one day: its file is not small, so it keeps its name; the others compact.
    big = [ORDERS_HEADER] + [
        f"{i},1,3,100,2024-01-02,2024-01-02T10:00:00Z,2,9.99,5.00,EUR,PAID,card" for i in range(5000, 9000)
    ]
    env.ingest({"orders/big.csv": ("\n".join(big) + "\n").encode()}, small_source_bytes=0)  # files of its own
    ((big_file, big_size, _),) = env.lake.source_files(env.delta(), ["orders/big.csv"])
    rows = env.rows()

    result = compact_table(env.lake, ORDERS, target_file_bytes=2 * big_size, small_file_bytes=big_size)

    assert result.partitions_compacted == 3
    assert big_file in env.files()
    assert len(env.files()) == 4
    assert env.rows() == rows


def test_a_partition_with_one_small_file_is_left_alone(tmp_path: Path) -> None:
    env = LakeEnv(tmp_path)
    env.ingest({"orders/a.csv": orders_csv(100, 3)})  # one file in each of three partitions
    result = compact_table(env.lake, ORDERS, target_file_bytes=BIG)
    assert (result.delta_version, result.partitions_compacted) == (None, 0)
    assert compact_lake(env.lake, TABLES, target_file_bytes=BIG) == [result]


@pytest.mark.parametrize("src", ["orders/c o'brien.csv", LONG])
def test_a_changed_source_replaces_exactly_its_rows_in_compacted_files(compacted: LakeEnv, src: str) -> None:
    rows = compacted.rows()
    result = compacted.ingest({src: orders_csv(700, 4, quantity=5)})

    assert [(o.src_path, o.status, o.rows) for o in result.outcomes] == [(src, "success", 4)]
    after = compacted.rows()
    got = by_source(after)
    assert got[src] == [700, 701, 702, 703]
    assert all(r["quantity"] == 5 for r in after if r["src_filename"] == src)
    assert [r for r in after if r["src_filename"] != src] == [r for r in rows if r["src_filename"] != src]
    files = compacted.files()
    # The compacted files were rewritten without the source (no empty file), its new files added.
    assert sum(p.split("/")[1].startswith(COMPACTED_PREFIX) for p in files) == 3
    assert len(files) == 3 + len({r["order_dt"] for r in after if r["src_filename"] == src})

    # And again, now that a compacted file and the source's own file overlap: compaction re-sorts.
    again = compact_table(compacted.lake, ORDERS, target_file_bytes=BIG)
    assert again.partitions_compacted == 3
    assert compacted.rows() == after
    for rel in compacted.files():
        data = pq.read_table(compacted.lake.parquet_dir("orders") / rel)
        keys = list(
            zip(data.column("src_filename").to_pylist(), data.column("src_row_number").to_pylist(), strict=True)
        )
        assert keys == sorted(keys)
    compacted.ingest({src: orders_csv(700, 4, quantity=6)})
    assert [r["quantity"] for r in compacted.rows() if r["src_filename"] == src] == [6] * 4


def test_a_compacted_file_left_without_rows_is_removed(tmp_path: Path) -> None:
    env = LakeEnv(tmp_path)
    # a: one row on each day; b: one row on 2024-01-04, where compaction merges it with a's.
    env.ingest({"orders/a.csv": orders_csv(100, 3)})
    env.ingest({"orders/b.csv": orders_csv(200, 1)})
    assert compact_table(env.lake, ORDERS, target_file_bytes=BIG).partitions_compacted == 1
    env.ingest({"orders/b.csv": orders_csv(201, 1)})  # b moves to 2024-01-02: the compacted file keeps a's row
    assert sum(p.startswith("order_dt=2024-01-04/" + COMPACTED_PREFIX) for p in env.files()) == 1
    env.ingest({"orders/a.csv": orders_csv(102, 1)})  # a keeps only a row on 2024-01-02

    assert by_source(env.rows()) == {"orders/a.csv": [102], "orders/b.csv": [201]}
    assert [p.split("/")[0] for p in env.files()] == ["order_dt=2024-01-02"] * 2
    assert not (env.lake.parquet_dir("orders") / "order_dt=2024-01-04").exists()


@pytest.mark.parametrize("how", ["duplicate", "reprocess"])
def test_duplicates_and_reprocessing_work_after_compaction(compacted: LakeEnv, how: str) -> None:
    rows = compacted.rows()
    if how == "duplicate":
        # d.csv becomes a byte copy of a.csv: it is a duplicate and gives its rows up.
        result = compacted.ingest({"orders/d.csv": orders_csv(SOURCES["orders/a.csv"])})
        assert [(o.src_path, o.status) for o in result.outcomes] == [("orders/d.csv", "duplicate")]
        assert compacted.rows() == [r for r in rows if r["src_filename"] != "orders/d.csv"]
    else:
        result = compacted.ingest(reprocess=("orders/b.csv",))
        assert [(o.src_path, o.status, o.rows) for o in result.outcomes] == [("orders/b.csv", "success", 6)]
        after = compacted.rows()
        assert by_source(after) == by_source(rows)
        assert [r for r in after if r["src_filename"] != "orders/b.csv"] == [
            r for r in rows if r["src_filename"] != "orders/b.csv"
        ]
    compacted.files()


def test_rewrite_without_source_skips_files_by_statistics(compacted: LakeEnv, tmp_path: Path) -> None:
    dt_ = compacted.delta()
    staged = tmp_path / "staged"
    # Outside every file's src_filename range, and inside the range but absent: nothing to do.
    assert rewrite_without_sources(compacted.lake, dt_, "orders", ["orders/zz.csv"], staged) == ([], [])
    assert rewrite_without_sources(compacted.lake, dt_, "orders", ["orders/aa.csv"], staged) == ([], [])
    removed, written = rewrite_without_sources(compacted.lake, dt_, "orders", ["orders/b.csv"], staged)
    assert sorted(p for p, _, _ in removed) == compacted.files()
    assert all(values == {"order_dt": p[9:19]} for p, _, values in removed)
    assert sorted(w.relpath for w in written) != sorted(p for p, _, _ in removed)
    for w in written:
        data = pq.read_table(staged / w.relpath)
        assert w.partition_values == {"order_dt": w.relpath[9:19]}
        assert w.rows == data.num_rows == 8  # 2 rows from each of the 4 other sources
        assert "orders/b.csv" not in data.column("src_filename").to_pylist()
        assert w.relpath.split("/")[1].startswith(COMPACTED_PREFIX)
    assert sum(w.rows for w in written) == 24


def test_vacuum_removes_the_replaced_files_from_the_delta_folder(compacted: LakeEnv) -> None:
    rows = compacted.rows()
    ddir = compacted.lake.delta_dir("orders")

    def data_files() -> list[str]:
        return sorted(p.relative_to(ddir).as_posix() for p in ddir.rglob("*.parquet") if "_delta_log" not in p.parts)

    assert len(data_files()) == 15 + 3
    assert vacuum_table(compacted.lake, "orders") == []  # within the default retention
    removed = vacuum_table(compacted.lake, "orders", retention_hours=0)
    assert len(removed) == 15
    assert data_files() == compacted.files()
    assert compacted.rows() == rows


def test_an_evolved_column_is_null_in_the_older_rows_in_every_file(tmp_path: Path) -> None:
    env = LakeEnv(tmp_path)
    old = (
        RETURNS_HEADER
        + "\n"
        + "\n".join(f"{i},{i},1,2024-01-05T10:00:00Z,1,damaged,9.99,OPEN,2024-01-05T10:00:00Z,I" for i in (1, 2))
    )
    new = (
        RETURNS_HEADER
        + ",refund_method\n"
        + "\n".join(f"{i},{i},1,2024-01-06T10:00:00Z,1,late,5.00,OPEN,2024-01-06T10:00:00Z,I,card" for i in (3, 4))
    )
    env.ingest({"returns/r1.csv": (old + "\n").encode(), "returns/r2.csv": (new + "\n").encode()})
    before = env.rows("returns")
    schema = env.lake.table_schema(env.delta("returns"))

    # The ingestion already rewrote the older file with the new column (and the MERGE's file with
    # the declared types): nothing is left for compaction to coalesce.
    result = compact_table(env.lake, RETURNS, target_file_bytes=BIG)

    assert (result.partitions_compacted, result.files_after) == (0, 1)
    after = env.rows("returns")
    assert after == before
    assert [(r["return_id"], r["refund_method"]) for r in after] == [(1, None), (2, None), (3, "card"), (4, "card")]
    (only,) = env.files("returns")
    assert pq.read_schema(env.lake.parquet_dir("returns") / only).field("refund_method").type == pa.string()
    assert env.lake.table_schema(env.delta("returns")) == schema


def test_compaction_needs_a_table_and_sane_sizes(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    assert compact_table(lake, ORDERS).delta_version is None
    assert compact_lake(lake, TABLES) == []
    assert vacuum_table(lake, "orders") == []
    with pytest.raises(ValueError):
        compact_table(lake, ORDERS, target_file_bytes=100, small_file_bytes=200)


def test_a_compaction_that_fails_before_its_commit_changes_nothing(
    env: LakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, files, version = env.rows(), env.files(), env.delta().version()
    ddir = env.lake.delta_dir("orders")
    on_disk = sorted(p for p in ddir.rglob("*.parquet"))

    def refuse(*_: Any, **__: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(DeltaTable, "create_write_transaction", refuse)
    with pytest.raises(OSError):
        compact_table(env.lake, ORDERS, target_file_bytes=BIG)
    monkeypatch.undo()

    assert env.delta().version() == version
    assert (env.rows(), env.files()) == (rows, files)
    assert sorted(p for p in ddir.rglob("*.parquet")) == on_disk  # the new files were unlinked again
    assert not env.lake.staging_root.exists()


def test_a_compaction_that_dies_before_the_mirror_is_finished_by_the_next_run(
    env: LakeEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = env.rows()

    def die(*_: Any, **__: Any) -> None:
        raise OSError("killed")

    monkeypatch.setattr(Lake, "mirror_parquet", die)
    with pytest.raises(OSError):
        compact_table(env.lake, ORDERS, target_file_bytes=BIG)
    monkeypatch.undo()
    assert env.lake.staging_left_over()  # the mark that the Parquet mirror may lag the Delta log

    result = env.ingest()
    assert result.outcomes == []
    assert not env.lake.staging_root.exists()
    assert len(env.files()) == 3
    assert env.rows() == rows
