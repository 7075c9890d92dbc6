"""Returns: upsert on return_id, tombstones, schema evolution, Delta sources read by version
(CONTRACT sections 4, 7 and 11). Every step checks that both outputs hold the same rows, one per
key, with the declared types."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from bronze_assets.ingest import RunResult, Settings, run
from bronze_assets.upsert import app_id
from schemas.schemas import TABLES_BY_NAME

UTC = dt.UTC
RETURNS = TABLES_BY_NAME["returns"]
COLUMNS = ["return_id", "order_id", "product_id", "return_ts", "quantity", "reason", "refund_amount", "status", "updated_at", "op"]
T0 = dt.datetime(2024, 3, 1, 12, 0, tzinfo=UTC)


def at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def rec(rid: int, hours: float, *, op: str = "", status: str = "requested", **extra: object) -> dict[str, object]:
    """A returns record updated ``hours`` after T0."""
    return {
        "return_id": rid,
        "order_id": 1000 + rid,
        "product_id": 7,
        "return_ts": "2024-03-01T08:00:00Z",
        "quantity": 1,
        "reason": "damaged",
        "refund_amount": "10.50",
        "status": status,
        "updated_at": at(hours).isoformat().replace("+00:00", "Z"),
        "op": op,
        **extra,
    }


def returns_csv(*records: dict[str, object], columns: list[str] | None = None) -> str:
    cols = columns or COLUMNS
    lines = [",".join(cols)] + [",".join(str(r.get(c, "")) for c in cols) for r in records]
    return "\n".join(lines) + "\n"


DELTA_SCHEMA = pa.schema(
    [
        ("return_id", pa.int64()),
        ("order_id", pa.int64()),
        ("product_id", pa.int64()),
        ("return_ts", pa.timestamp("us", tz="UTC")),
        ("quantity", pa.int32()),
        ("status", pa.string()),
        ("updated_at", pa.timestamp("us", tz="UTC")),
        ("op", pa.string()),
    ]
)


def delta_batch(*records: tuple[int, float, str, str]) -> pa.Table:
    """(return_id, hours after T0, op, status) records as a Delta source batch."""
    return pa.table(
        {
            "return_id": [r[0] for r in records],
            "order_id": [1000 + r[0] for r in records],
            "product_id": [7] * len(records),
            "return_ts": [dt.datetime(2024, 3, 1, 8, tzinfo=UTC)] * len(records),
            "quantity": [1] * len(records),
            "status": [r[3] for r in records],
            "updated_at": [at(r[1]) for r in records],
            "op": [r[2] for r in records],
        },
        schema=DELTA_SCHEMA,
    )


class Lake:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw = root / "raw"
        (self.raw / "returns").mkdir(parents=True)

    @property
    def delta_dir(self) -> Path:
        return self.root / "lake" / "bronze" / "delta" / "returns"

    @property
    def parquet_dir(self) -> Path:
        return self.root / "lake" / "bronze" / "parquet" / "returns"

    @property
    def changes(self) -> Path:
        return self.raw / "returns" / "changes"

    def put(self, name: str, text: str) -> None:
        path = self.raw / "returns" / name
        path.write_text(text)

    def run(self, **overrides: Any) -> RunResult:
        settings = Settings(
            raw=self.raw, lake=self.root / "lake", manifest=self.root / "m.duckdb", tables=("returns",), **overrides
        )
        result = run(settings)
        self.check_outputs()
        return result

    def version(self) -> int:
        return DeltaTable(str(self.delta_dir)).version()

    def history_version(self) -> int:
        return DeltaTable(str(self.root / "lake" / "_history" / "returns")).version()

    def rows(self) -> dict[int, dict[str, Any]]:
        """The bronze returns table by return_id (Delta; the Parquet dataset is checked equal)."""
        table = DeltaTable(str(self.delta_dir)).to_pyarrow_table()
        return {r["return_id"]: r for r in table.to_pylist()}

    def check_outputs(self) -> None:
        """Both outputs: the same rows, one per key, the declared types in every Parquet file."""
        if not (self.delta_dir / "_delta_log").is_dir():
            return
        dt_ = DeltaTable(str(self.delta_dir))
        delta = dt_.to_pyarrow_table()
        schema = pa.schema(dt_.schema().to_arrow())  # type: ignore[arg-type]
        files = sorted(self.parquet_dir.glob("*.parquet"))
        active = sorted(dt_.file_uris())
        assert [f.name for f in files] == sorted(Path(u).name for u in active)
        for f in [*files, *(self.delta_dir / Path(u).name for u in active)]:
            file_schema = pq.read_schema(f)
            for field in file_schema:
                assert field.type == schema.field(field.name).type, (f.name, field)
        parquet = pads.dataset([str(f) for f in files], schema=schema).to_table() if files else schema.empty_table()
        key = ["return_id"]
        assert sorted(parquet.to_pylist(), key=lambda r: r["return_id"]) == sorted(
            delta.select(parquet.column_names).to_pylist(), key=lambda r: r["return_id"]
        )
        ids = delta.column(key[0]).to_pylist()
        assert len(ids) == len(set(ids)), "one row per return_id"
        # Filters work on the Delta table (pyarrow compares the files' types with the table's).
        for name in set(delta.column("src_filename").to_pylist()):
            selected = dt_.to_pyarrow_dataset().to_table(filter=pads.field("src_filename") == name)
            assert selected.num_rows == delta.column("src_filename").to_pylist().count(name)

    def manifest(self) -> dict[str, dict[str, Any]]:
        with duckdb.connect(str(self.root / "m.duckdb"), read_only=True) as con:
            cur = con.execute("SELECT * FROM manifest_processed_files")
            names = [d[0] for d in cur.description]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


@pytest.fixture
def lake(tmp_path: Path) -> Iterator[Lake]:
    yield Lake(tmp_path)


def winner(rows: dict[int, dict[str, Any]], rid: int) -> tuple[str, dt.datetime, str]:
    r = rows[rid]
    return r["src_filename"], r["updated_at"], r["status"]


# ------------------------------------------------------------------------------------------
# Latest wins
# ------------------------------------------------------------------------------------------


def test_latest_updated_at_wins_across_files_within_a_file_and_out_of_order(lake: Lake) -> None:
    lake.put(
        "r1.csv",
        returns_csv(
            rec(1, 1, status="old"),
            rec(2, 5, status="newest-in-earlier-file"),
            rec(3, 9, status="latest-first-in-file"),
            rec(3, 2, status="older-later-in-file"),
        ),
    )
    lake.put("r2.csv", returns_csv(rec(1, 2, status="new"), rec(2, 3, status="older-in-later-file")))
    res = lake.run()
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [
        ("returns/r1.csv", "success", 4),  # row_count: valid records read, before the merge
        ("returns/r2.csv", "success", 2),
    ]
    rows = lake.rows()
    assert sorted(rows) == [1, 2, 3]
    assert winner(rows, 1) == ("returns/r2.csv", at(2), "new")
    assert winner(rows, 2) == ("returns/r1.csv", at(5), "newest-in-earlier-file")
    assert winner(rows, 3) == ("returns/r1.csv", at(9), "latest-first-in-file")
    assert rows[3]["src_row_number"] == 3
    # Records arriving in a later run that are older than what the table holds lose too.
    lake.put("r3.csv", returns_csv(rec(2, 4, status="still-older")))
    lake.run()
    assert winner(lake.rows(), 2) == ("returns/r1.csv", at(5), "newest-in-earlier-file")


def test_ties_go_to_the_later_record_and_the_later_ingested_source(lake: Lake) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 1, status="first"), rec(1, 1, status="second-in-file"), rec(2, 1, status="a")))
    lake.put("r2.csv", returns_csv(rec(2, 1, status="b")))
    lake.run()
    rows = lake.rows()
    assert winner(rows, 1) == ("returns/r1.csv", at(1), "second-in-file")
    assert winner(rows, 2) == ("returns/r2.csv", at(1), "b")  # r2 sorts after r1: ingested later
    # A source of a later run wins a tie against the earlier ones.
    lake.put("r0.csv", returns_csv(rec(2, 1, status="c")))
    lake.run()
    assert winner(lake.rows(), 2) == ("returns/r0.csv", at(1), "c")


# ------------------------------------------------------------------------------------------
# Tombstones
# ------------------------------------------------------------------------------------------


def test_tombstone_revive_and_tombstone_for_an_unseen_key(lake: Lake) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 1, op="I"), rec(2, 1)))
    lake.put("r2.csv", returns_csv(rec(1, 3, op="D", status="cancelled"), rec(9, 2, op="D", status="gone")))
    lake.run()
    rows = lake.rows()
    assert sorted(rows) == [1, 2, 9]
    assert (rows[1]["is_deleted"], rows[1]["deleted_at"], rows[1]["op"], rows[1]["status"]) == (True, at(3), "D", "cancelled")
    assert rows[1]["src_filename"] == "returns/r2.csv"  # the tombstone record itself is stored
    assert (rows[9]["is_deleted"], rows[9]["deleted_at"]) == (True, at(2))
    assert (rows[2]["is_deleted"], rows[2]["deleted_at"]) == (False, None)

    lake.put("r3.csv", returns_csv(rec(1, 4, op="U", status="reopened")))
    lake.run()
    rows = lake.rows()
    assert (rows[1]["is_deleted"], rows[1]["deleted_at"], rows[1]["status"]) == (False, None, "reopened")
    # An older tombstone arriving later does not delete the newer record.
    lake.put("r4.csv", returns_csv(rec(1, 3.5, op="D")))
    lake.run()
    assert lake.rows()[1]["is_deleted"] is False


# ------------------------------------------------------------------------------------------
# Schema evolution
# ------------------------------------------------------------------------------------------


def test_a_later_file_adds_a_column_and_a_later_winner_without_it_clears_it(lake: Lake) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 1), rec(2, 1), rec(3, 1)))
    lake.run()
    evolved = [*COLUMNS[:7], "refund_method", *COLUMNS[7:]]
    lake.put("r2.csv", returns_csv(rec(2, 2, refund_method="card"), rec(4, 2, refund_method="voucher"), columns=evolved))
    lake.run()
    rows = lake.rows()
    assert {rid: r["refund_method"] for rid, r in rows.items()} == {1: None, 2: "card", 3: None, 4: "voucher"}
    schema = pa.schema(DeltaTable(str(lake.delta_dir)).schema().to_arrow())  # type: ignore[arg-type]
    assert schema.field("refund_method").type == pa.string()  # from CSV: string
    for name in [c.name for c in RETURNS.columns]:
        assert schema.field(name).type == RETURNS.column(name).type
    with duckdb.connect(str(lake.root / "m.duckdb"), read_only=True) as con:
        history = con.execute(
            "SELECT src_path, change FROM schema_history WHERE table_name = 'returns' ORDER BY detected_at"
        ).fetchall()
    assert history[-1] == ("returns/r2.csv", "added: refund_method")

    lake.put("r3.csv", returns_csv(rec(2, 3, status="later")))
    lake.run()
    rows = lake.rows()
    assert (rows[2]["status"], rows[2]["refund_method"]) == ("later", None)
    assert rows[4]["refund_method"] == "voucher"


# ------------------------------------------------------------------------------------------
# Idempotency: rerun, reprocess, changed and withdrawn sources
# ------------------------------------------------------------------------------------------


def test_rerun_writes_nothing_and_reprocess_keeps_the_same_rows(lake: Lake) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 1), rec(2, 1), rec(3, 5)))
    lake.put("r2.csv", returns_csv(rec(1, 2), rec(3, 4)))
    lake.run()
    before = lake.rows()
    versions = (lake.version(), lake.history_version())

    again = lake.run()
    assert again.outcomes == [] and again.exit_code == 0
    assert (lake.version(), lake.history_version()) == versions

    res = lake.run(reprocess=("returns/r1.csv",))
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [("returns/r1.csv", "success", 3)]
    after = lake.rows()

    def strip(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {k: {c: v for c, v in r.items() if c != "ingestion_ts"} for k, r in rows.items()}

    assert strip(after) == strip(before)
    assert after[2]["ingestion_ts"] > before[2]["ingestion_ts"]  # r1's winners were ingested again
    assert after[1]["ingestion_ts"] == before[1]["ingestion_ts"]  # r2's winner untouched
    assert DeltaTable(str(lake.delta_dir)).transaction_version(app_id("returns")) == lake.history_version()


def test_a_changed_source_gives_what_one_clean_run_over_the_new_content_gives(lake: Lake, tmp_path: Path) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 5, status="r1-wins"), rec(2, 1, status="only-r1"), rec(3, 1)))
    lake.put("r2.csv", returns_csv(rec(1, 2, status="r2-older"), rec(3, 2, status="r2")))
    lake.run()
    assert winner(lake.rows(), 1)[2] == "r1-wins"

    # r1 changes: key 1 and key 2 are no longer in it.
    lake.put("r1.csv", returns_csv(rec(3, 9, status="r1-new")))
    res = lake.run()
    assert [(o.src_path, o.status) for o in res.outcomes] == [("returns/r1.csv", "success")]
    rows = lake.rows()
    assert sorted(rows) == [1, 3]  # key 2 had no other record: gone
    assert winner(rows, 1) == ("returns/r2.csv", at(2), "r2-older")  # r2's record wins again
    assert winner(rows, 3) == ("returns/r1.csv", at(9), "r1-new")

    clean = Lake(tmp_path / "clean")
    clean.put("r1.csv", returns_csv(rec(3, 9, status="r1-new")))
    clean.put("r2.csv", returns_csv(rec(1, 2, status="r2-older"), rec(3, 2, status="r2")))
    clean.run()

    def content(rows: dict[int, dict[str, Any]]) -> dict[int, tuple[Any, ...]]:
        return {k: tuple(v for c, v in sorted(r.items()) if c != "ingestion_ts") for k, r in rows.items()}

    assert content(lake.rows()) == content(clean.rows())


def test_strict_failure_withdraws_the_sources_records(lake: Lake) -> None:
    lake.put("r1.csv", returns_csv(rec(1, 1, status="r1")))
    lake.put("r2.csv", returns_csv(rec(1, 2, status="r2"), rec(2, 2)))
    lake.run()
    assert winner(lake.rows(), 1)[2] == "r2"
    lake.put("r2.csv", returns_csv(rec(1, 3, status="r2-new"), rec(2, 3, op="bad")))
    res = lake.run(validation_mode="strict")
    assert [(o.src_path, o.status) for o in res.outcomes] == [("returns/r2.csv", "failed")]
    assert res.exit_code == 2
    rows = lake.rows()
    assert sorted(rows) == [1]
    assert winner(rows, 1) == ("returns/r1.csv", at(1), "r1")


# ------------------------------------------------------------------------------------------
# Delta sources
# ------------------------------------------------------------------------------------------


def test_delta_source_across_three_runs_with_optimize_and_delete_upstream(lake: Lake) -> None:
    src = str(lake.changes)
    write_deltalake(src, delta_batch((1, 1, "I", "new"), (2, 1, "I", "new"), (3, 1, "I", "new")))  # v0
    write_deltalake(src, delta_batch((4, 1, "I", "new")), mode="append")  # v1
    first = lake.run()
    assert [(o.src_path, o.rows) for o in first.outcomes] == [("returns/changes@v0", 3), ("returns/changes@v1", 1)]
    assert sorted(lake.rows()) == [1, 2, 3, 4]
    assert {r["src_filename"] for r in lake.rows().values()} == {"returns/changes@v0", "returns/changes@v1"}

    # Upstream: an update and a tombstone (v2), then an OPTIMIZE (v3): no new records.
    write_deltalake(src, delta_batch((2, 2, "U", "approved"), (3, 2, "D", "cancelled")), mode="append")
    DeltaTable(src).optimize.compact()
    second = lake.run()
    assert [(o.src_path, o.status, o.rows) for o in second.outcomes] == [
        ("returns/changes@v2", "success", 2),
        ("returns/changes@v3", "success", 0),
    ]
    rows = lake.rows()
    assert winner(rows, 2) == ("returns/changes@v2", at(2), "approved")
    assert (rows[3]["is_deleted"], rows[3]["deleted_at"]) == (True, at(2))
    assert sorted(rows) == [1, 2, 3, 4]

    # Upstream: a DELETE of key 1's rows (v4: a rewrite that re-adds the rows it keeps) and a
    # revival of key 3 (v5). Bronze keeps key 1 (bronze keeps history) and nothing is doubled.
    DeltaTable(src).delete("return_id = 1")
    write_deltalake(src, delta_batch((3, 3, "U", "reopened")), mode="append")
    third = lake.run()
    assert [o.src_path for o in third.outcomes] == ["returns/changes@v4", "returns/changes@v5"]
    rows = lake.rows()
    assert sorted(rows) == [1, 2, 3, 4]
    assert (rows[3]["is_deleted"], rows[3]["deleted_at"], rows[3]["status"]) == (False, None, "reopened")
    assert winner(rows, 2)[1:] == (at(2), "approved")
    assert rows[1]["status"] == "new"
    with duckdb.connect(str(lake.root / "m.duckdb"), read_only=True) as con:
        [(last,)] = con.execute("SELECT last_version FROM watermarks WHERE source_path = 'returns/changes'").fetchall()
    assert last == 5
    assert {p for p in lake.manifest()} == {f"returns/changes@v{v}" for v in range(6)}

    # Nothing new upstream: nothing is read or written.
    versions = (lake.version(), lake.history_version())
    assert lake.run().outcomes == []
    assert (lake.version(), lake.history_version()) == versions


def test_delta_source_with_change_data_feed_reads_inserts_and_update_post_images(lake: Lake) -> None:
    src = str(lake.changes)
    write_deltalake(
        src, delta_batch((1, 1, "I", "new"), (2, 1, "I", "new")), configuration={"delta.enableChangeDataFeed": "true"}
    )
    lake.run()
    DeltaTable(src).update(updates={"status": "'approved'", "updated_at": f"'{at(5).isoformat()}'"}, predicate="return_id = 2")
    DeltaTable(src).delete("return_id = 1")
    write_deltalake(src, delta_batch((3, 1, "I", "new")), mode="append")
    assert DeltaTable(src).optimize.compact()["numFilesRemoved"] == 2
    res = lake.run()
    assert [(o.src_path, o.rows) for o in res.outcomes] == [
        ("returns/changes@v1", 1),  # the update's post-image only
        ("returns/changes@v2", 0),  # a delete brings no record
        ("returns/changes@v3", 1),
        ("returns/changes@v4", 0),  # nor does OPTIMIZE
    ]
    rows = lake.rows()
    assert sorted(rows) == [1, 2, 3]
    assert winner(rows, 2) == ("returns/changes@v1", at(5), "approved")


# ------------------------------------------------------------------------------------------
# The bundled sample
# ------------------------------------------------------------------------------------------


def test_the_bundled_sample_returns_state(tmp_path: Path) -> None:
    import shutil

    sample = Path(__file__).resolve().parents[1] / "data_raw" / "returns"
    lake = Lake(tmp_path)
    shutil.rmtree(lake.raw / "returns")
    shutil.copytree(sample, lake.raw / "returns")
    lake.run()
    rows = lake.rows()
    deleted = sorted(k for k, r in rows.items() if r["is_deleted"])
    assert deleted == [10, 45, 320, 9999]
    assert (rows[5]["is_deleted"], rows[5]["status"], rows[5]["src_filename"]) == (False, "reopened", "returns/changes@v2")
    assert rows[21]["status"] == "tie-later-record-wins"
    assert (rows[303]["status"], rows[303]["src_filename"]) == ("refunded", "returns/changes@v1")
    assert rows[302]["status"] == "closed"
    assert 77 not in rows and 190 not in rows  # their only records were rejected
    assert rows[150]["refund_method"] in {"card", "voucher", "bank_transfer", None}
    assert json.dumps(sorted(rows)) == json.dumps(sorted(set(rows)))
    assert len(rows) == 259


def test_every_parquet_file_carries_an_added_column(lake: Lake) -> None:
    """A MERGE rewrites only the files holding matched keys; the files it leaves alone are
    rewritten with the new column, so that a reader taking the schema from any one file sees it."""
    lake.put("r1.csv", returns_csv(rec(1, 1), rec(2, 1)))
    lake.run()
    lake.put("r2.csv", returns_csv(rec(3, 1), rec(4, 1)))  # new keys only: a second file
    lake.run()
    assert len(list(lake.parquet_dir.glob("*.parquet"))) == 2
    evolved = [*COLUMNS[:7], "refund_method", *COLUMNS[7:]]
    lake.put("r3.csv", returns_csv(rec(5, 1, refund_method="card"), columns=evolved))
    lake.run()
    files = sorted(lake.parquet_dir.glob("*.parquet"))
    assert files and all("refund_method" in pq.read_schema(f).names for f in files)
    assert {r["return_id"]: r["refund_method"] for r in lake.rows().values()} == {1: None, 2: None, 3: None, 4: None, 5: "card"}
    with duckdb.connect() as con:
        [(n, methods)] = con.execute(
            "SELECT count(*), count(refund_method) FROM read_parquet(?)", [str(lake.parquet_dir / "*.parquet")]
        ).fetchall()
    assert (n, methods) == (5, 1)


def test_maintenance_compacts_bronze_and_history_and_keeps_the_rows(lake: Lake) -> None:
    from bronze_assets.compaction import maintain

    for i in range(4):
        lake.put(f"r{i}.csv", returns_csv(rec(10 * i + 1, 1), rec(10 * i + 2, 1), rec(1, i, status=f"v{i}")))
        lake.run()
    before = lake.rows()
    history = lake.root / "lake" / "_history" / "returns"
    assert len(DeltaTable(str(history)).file_uris()) == 4
    settings = Settings(raw=lake.raw, lake=lake.root / "lake", manifest=lake.root / "m.duckdb")
    [result] = [r for r in maintain(settings, [RETURNS], retention_hours=0) if r.table == "returns"]
    assert result.history is not None and result.history.files_after == 1
    assert len(DeltaTable(str(history)).file_uris()) == 1
    lake.check_outputs()
    assert lake.rows() == before
    # Replacing a source still works on the compacted history.
    lake.put("r3.csv", returns_csv(rec(31, 1)))
    lake.run()
    rows = lake.rows()
    assert 32 not in rows and winner(rows, 1)[2] == "v2"


def test_a_history_commit_without_its_merge_is_caught_up_by_the_next_run(lake: Lake) -> None:
    """The state a run leaves when it dies between a source's history commit and its MERGE: the
    next run merges what the bronze table's application transaction says it has not seen."""
    from bronze_assets.ingest import recover
    from bronze_assets.lake import Lake as LakeFiles

    lake.put("r1.csv", returns_csv(rec(1, 1, status="r1"), rec(2, 1)))
    lake.run()
    files = LakeFiles(lake.root / "lake")
    bronze = DeltaTable(str(lake.delta_dir))
    assert bronze.transaction_version(app_id("returns")) == lake.history_version()

    # r2's records reach the history, but no MERGE follows (as if killed right there).
    import bronze_assets.upsert as upsert_module

    real = upsert_module.merge_winners
    upsert_module.merge_winners = lambda *a, **k: None  # type: ignore[assignment]
    try:
        lake.put("r2.csv", returns_csv(rec(1, 2, status="r2")))
        lake.run()
    finally:
        upsert_module.merge_winners = real  # type: ignore[assignment]
    assert winner(lake.rows(), 1)[2] == "r1"
    (files.staging_root / "left-over").mkdir(parents=True)  # what a killed run leaves

    recover(files, [RETURNS], run_id="test")
    assert winner(lake.rows(), 1) == ("returns/r2.csv", at(2), "r2")
    assert DeltaTable(str(lake.delta_dir)).transaction_version(app_id("returns")) == lake.history_version()
    assert not files.staging_root.exists()
    lake.check_outputs()
