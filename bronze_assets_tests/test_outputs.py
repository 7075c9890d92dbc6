"""The bronze outputs: types, audit columns, hive layout, Parquet = Delta, readers (CONTRACT 6 and 11)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from bronze_assets.validation import row_digest_input
from bronze_assets_tests.conftest import (
    CUSTOMER_HEADER,
    ORDER_COLUMNS,
    LakeRun,
    RawFiles,
    csv_text,
    customer_row,
    event,
    jsonl_text,
    order,
    orders_csv,
    product,
    products_csv,
    sensor,
    sensors_parquet,
    shared_lake,
    store,
    xlsx_bytes,
)
from schemas.schemas import TABLES, TABLES_BY_NAME, Table

UTC = dt.UTC
TABLE_NAMES = [t.name for t in TABLES]
AUDIT = {
    "ingestion_ts": pa.timestamp("us", tz="UTC"),
    "src_filename": pa.string(),
    "src_row_number": pa.int64(),
    "src_row_hash": pa.string(),
}
RETURNS_COLUMNS = (
    "return_id", "order_id", "product_id", "return_ts", "quantity", "reason", "refund_amount", "status", "updated_at", "op",
)  # fmt: skip

FILES = RawFiles()
ORDERS = FILES.add(
    "orders/orders_2024-01-02.csv",
    orders_csv(
        order(order_id=1),
        order(order_id=2, order_ts="2024-01-02T23:30:00-05:00"),
        order(order_id=3, order_dt="2024-01-03", order_ts="2024-01-03T08:00:00+01:00"),
        order(order_id=4, quantity="0"),  # rejected
        order(order_id=5, order_dt="2023-12-31"),
    ),
)
EVENTS = FILES.add(
    "events/events.jsonl",
    jsonl_text(
        [
            event(event_id="a", event_ts="2024-01-02T10:00:00Z"),
            event(event_id="b", event_ts="2024-01-02T23:30:00-05:00"),  # 2024-01-03 in UTC
            event(event_id="c", event_ts="2024-01-03T00:30:00+02:00"),  # 2024-01-02 in UTC
            event(event_id="d", event_ts="2024-01-02T12:00:00", properties={"k": [1, {"z": None}]}),
        ]
    ),
)
SENSORS = FILES.add(
    "sensors/sensors.parquet",
    sensors_parquet(
        [
            sensor(store_id=1, sensor_id="a", reading_ts=dt.datetime(2024, 1, 15, tzinfo=UTC)),
            sensor(
                store_id=1,
                sensor_id="b",
                reading_ts=dt.datetime(2024, 1, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2))),
            ),
            sensor(store_id=2, sensor_id="c", reading_ts=dt.datetime(2024, 1, 31, 23, 30, tzinfo=UTC)),
            sensor(
                store_id=2,
                sensor_id="d",
                reading_ts=dt.datetime(2024, 2, 1, 0, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))),
            ),
        ]
    ),
)
STORES = FILES.add("stores/stores.json", json.dumps([store(store_id=1), store(store_id=2, city=None, note="x")]))
CUSTOMERS = FILES.add(
    "customers.xlsx",
    xlsx_bytes([CUSTOMER_HEADER, customer_row(customer_id=1), customer_row(customer_id=2, email=None)]),
)
PRODUCTS = FILES.add(
    "products/products.csv",
    products_csv(product(product_id=1), product(product_id=2, updated_at="2024-01-01T00:00:00+05:30")),
)
RETURNS = FILES.add(
    "returns/returns_2024-01.csv",
    csv_text(
        RETURNS_COLUMNS,
        [
            [1, 10, 100, "2024-01-05T10:00:00Z", 1, "broken", "9.99", "OPEN", "2024-01-05T10:00:00+01:00", "I"],
            [2, 11, 101, "2024-01-06T10:00:00Z", 2, None, None, "OPEN", "2024-01-06T10:00:00Z", "D"],
        ],
    ),
)
# Hashes: the same raw record in two files, and records that differ by one character.
SAME_A = ",".join(str(v) for v in order(order_id=70).values())
HASH_1 = FILES.add(
    "orders/hash_1.csv", "\n".join([",".join(ORDER_COLUMNS), SAME_A, SAME_A.replace("card", "cash")]) + "\n"
)
HASH_2 = FILES.add(
    "orders/hash_2.csv", "\n".join([",".join(ORDER_COLUMNS), SAME_A, SAME_A.replace("card", "card ")]) + "\n"
)
PARQUET_HASH_1 = FILES.add(
    "sensors/hash_1.parquet",
    sensors_parquet([sensor(sensor_id="same"), sensor(sensor_id="same", co2_ppm=421), sensor(sensor_id="ab", battery_v=None)]),
)
PARQUET_HASH_2 = FILES.add(
    "sensors/hash_2.parquet",
    sensors_parquet([sensor(sensor_id="same"), sensor(sensor_id="same", temperature_c=21.25), sensor(sensor_id="abc")]),
)
SOURCES_BY_TABLE = Counter(
    p.split("/")[0] if "/" in p else next(t for t in TABLE_NAMES if p.startswith(t)) for p in FILES
)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeRun:
    return shared_lake(tmp_path_factory, "outputs", FILES)


def expected_schema(table: Table) -> dict[str, pa.DataType]:
    """Every column of the bronze table and its type, as the contract declares them."""
    fields = {c.name: c.type for c in table.columns}
    fields |= {d.name: (pa.date32() if d.kind == "utc_date" else pa.string()) for d in table.derived}
    if table.new_columns == "rescue":
        fields["_rescued_data"] = pa.string()
    fields |= AUDIT
    if table.op_column:
        fields |= {"is_deleted": pa.bool_(), "deleted_at": pa.timestamp("us", tz="UTC")}
    return fields


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and "_delta_log" not in p.parts)


def test_the_shared_lake_loaded_every_source(lake):
    assert sorted(lake.outcomes) == sorted(FILES)
    assert {o.status for o in lake.result.outcomes} == {"success"}
    assert set(SOURCES_BY_TABLE) == set(TABLE_NAMES)


# ------------------------------------------------------------------------------------------
# Types
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_delta_has_exactly_the_declared_columns_and_types(lake, name):
    expected = expected_schema(TABLES_BY_NAME[name])
    schema = pa.schema(DeltaTable(str(lake.delta_dir(name))).schema().to_arrow())  # type: ignore[arg-type]
    assert {f.name: f.type for f in schema} == expected
    data = lake.delta(name)
    assert {f.name: f.type for f in data.schema} == expected
    for f in data.schema:
        if pa.types.is_timestamp(f.type):
            assert (f.type.unit, f.type.tz) == ("us", "UTC"), f.name


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_parquet_files_hold_the_declared_types_without_partition_columns(lake, name):
    table = TABLES_BY_NAME[name]
    expected = expected_schema(table)
    files = data_files(lake.parquet_dir(name))
    assert files
    for path in files:
        schema = pq.ParquetFile(path).schema_arrow
        # Partition columns live only in the folder names.
        assert {f.name: f.type for f in schema} == {k: v for k, v in expected.items() if k not in table.partition_by}
        for f in schema:
            if pa.types.is_timestamp(f.type):
                assert (f.type.unit, f.type.tz) == ("us", "UTC"), f.name


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_delta_data_files_do_not_store_partition_columns(lake, name):
    table = TABLES_BY_NAME[name]
    for path in data_files(lake.delta_dir(name)):
        assert not set(table.partition_by) & set(pq.ParquetFile(path).schema_arrow.names), path


def test_values_with_offsets_are_stored_in_utc(lake):
    orders = {r["order_id"]: r for r in lake.rows("orders", ORDERS)}
    assert orders[2]["order_ts"] == dt.datetime(2024, 1, 3, 4, 30, tzinfo=UTC)
    assert orders[3]["order_ts"] == dt.datetime(2024, 1, 3, 7, tzinfo=UTC)
    products = {r["product_id"]: r for r in lake.rows("products", PRODUCTS)}
    assert products[2]["updated_at"] == dt.datetime(2023, 12, 31, 18, 30, tzinfo=UTC)
    returns = {r["return_id"]: r for r in lake.rows("returns", RETURNS)}
    assert returns[1]["updated_at"] == dt.datetime(2024, 1, 5, 9, tzinfo=UTC)
    assert (returns[2]["is_deleted"], returns[2]["deleted_at"]) == (True, dt.datetime(2024, 1, 6, 10, tzinfo=UTC))


# ------------------------------------------------------------------------------------------
# Audit columns
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_audit_columns_are_complete(lake, name):
    rows = lake.rows(name)
    assert rows
    for row in rows:
        for column in AUDIT:
            assert row[column] is not None, (column, row)
        assert re.fullmatch(r"[0-9a-f]{16,}", row["src_row_hash"]), row["src_row_hash"]
        assert row["src_filename"] in FILES  # relative to the raw root, '/'-separated
        assert row["ingestion_ts"].utcoffset() == dt.timedelta(0)
    per_source: dict[str, set[dt.datetime]] = {}
    for row in rows:
        per_source.setdefault(row["src_filename"], set()).add(row["ingestion_ts"])
    assert all(len(v) == 1 for v in per_source.values()), per_source  # one value per ingestion


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_row_numbers_of_rows_and_rejects_cover_every_record(lake, name):
    for src, o in lake.outcomes.items():
        if o.table != name:
            continue
        written = [r["src_row_number"] for r in lake.rows(name, src)]
        rejected = [r["src_row_number"] for r in lake.rejects(name, src)]
        assert sorted(written + rejected) == list(range(1, o.rows + o.reject_count + 1)), src


def test_ingestion_ts_of_rejects_matches_the_rows(lake):
    [reject] = lake.rejects("orders", ORDERS)
    [ts] = {r["ingestion_ts"] for r in lake.rows("orders", ORDERS)}
    assert dt.datetime.fromisoformat(reject["ingestion_ts"].replace("Z", "+00:00")) == ts


def test_src_row_hash_depends_only_on_the_raw_record(lake):
    h1 = {r["src_row_number"]: r["src_row_hash"] for r in lake.rows("orders", HASH_1)}
    h2 = {r["src_row_number"]: r["src_row_hash"] for r in lake.rows("orders", HASH_2)}
    assert h1[1] == h2[1]  # the same raw record in two files
    assert len({h1[1], h1[2], h2[2]}) == 3  # differ by one character
    again = {HASH_2, PARQUET_HASH_2}  # their first records are those of HASH_1 and PARQUET_HASH_1
    every = [r["src_row_hash"] for t in TABLE_NAMES for r in lake.rows(t) if r["src_filename"] not in again]
    assert len(every) == len(set(every))


def test_src_row_hash_of_a_parquet_row_depends_only_on_its_values(lake):
    h1 = {r["src_row_number"]: r["src_row_hash"] for r in lake.rows("sensors", PARQUET_HASH_1)}
    h2 = {r["src_row_number"]: r["src_row_hash"] for r in lake.rows("sensors", PARQUET_HASH_2)}
    assert h1[1] == h2[1]  # the same values in two files
    assert len({h1[1], h1[2], h2[2], h1[3], h2[3]}) == 5  # one value differs, or is null
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in [*h1.values(), *h2.values()])


def _digests(batch: pa.RecordBatch) -> list[bytes]:
    return row_digest_input(batch, batch.schema.names).to_pylist()


def test_row_digest_input_lays_out_each_type_and_tells_rows_apart():
    t = pa.table(
        {
            "i8": pa.array([1, 1, None, 1], pa.int8()),
            "u64": pa.array([2**64 - 1, 2**64 - 1, 0, 2**64 - 1], pa.uint64()),
            "f": pa.array([0.5, 0.5, None, 0.5], pa.float32()),
            "b": pa.array([True, True, None, False]),
            "d": pa.array([dt.date(2024, 1, 2)] * 3 + [None], pa.date32()),
            "ts": pa.array([dt.datetime(2024, 1, 2, tzinfo=UTC)] * 4, pa.timestamp("us", tz="UTC")),
            "dec": pa.array([Decimal("1.50")] * 4, pa.decimal128(10, 2)),
            "s": pa.array(["ab", "ab", None, ""]),
            "bin": pa.array([b"c", b"c", b"", None], pa.binary()),
        }
    )
    rows = _digests(t.to_batches()[0])
    assert rows[0] == rows[1]
    assert len(set(rows)) == 3
    # i8: valid byte then the value; u64 little-endian; bool as one byte; s and bin as lengths, then bytes.
    assert rows[0][:2] == b"\x01\x01" and rows[0][2:11] == b"\x01" + b"\xff" * 8
    assert rows[2][:2] == b"\x00\x00"  # null: invalid and zeroed, whatever the buffer held
    assert rows[0].endswith(b"\x02\x00\x00\x00\x01\x00\x00\x00abc")
    assert rows[3].endswith(b"\x00\x00\x00\x00\xff\xff\xff\xff")  # "" (length 0), then null (-1)
    # A slice gives the rows' own bytes (the offset is honoured); no rows, no values.
    assert _digests(t.slice(1, 3).to_batches()[0]) == rows[1:]
    assert _digests(pa.RecordBatch.from_pylist([], schema=t.schema)) == []


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"x": ["ab"], "y": ["c"]}, {"x": ["a"], "y": ["bc"]}),  # text boundaries move
        ({"x": pa.array([None], pa.string()), "y": ["c"]}, {"x": [""], "y": ["c"]}),  # null against empty
        ({"x": [1.0], "y": ["c"]}, {"x": [-1.0], "y": ["c"]}),
    ],
)
def test_row_digest_input_differs_when_values_differ(a, b):
    assert _digests(pa.RecordBatch.from_pydict(a)) != _digests(pa.RecordBatch.from_pydict(b))


# ------------------------------------------------------------------------------------------
# Parquet and Delta hold the same rows
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_parquet_and_delta_hold_the_same_rows(lake, name):
    parquet, delta = lake.parquet(name), lake.delta(name)
    assert parquet.num_rows == delta.num_rows > 0
    assert sorted(parquet.column_names) == sorted(delta.column_names)
    assert parquet.select(delta.column_names).equals(delta)


# ------------------------------------------------------------------------------------------
# Hive layout
# ------------------------------------------------------------------------------------------


def partition_dirs(folder: Path) -> set[str]:
    return {p.parent.relative_to(folder).as_posix() for p in data_files(folder)}


@pytest.mark.parametrize("output", ["parquet", "delta"])
def test_hive_partition_folders(lake, output):
    folder = lake.parquet_dir if output == "parquet" else lake.delta_dir
    assert partition_dirs(folder("orders")) == {"order_dt=2023-12-31", "order_dt=2024-01-02", "order_dt=2024-01-03"}
    assert partition_dirs(folder("events")) == {"event_dt=2024-01-02", "event_dt=2024-01-03"}
    assert partition_dirs(folder("sensors")) == {
        "store_id=1/reading_month=2024-01",
        "store_id=1/reading_month=2024-02",
        "store_id=2/reading_month=2024-01",
    }
    for name in ("customers", "products", "stores", "returns"):
        assert partition_dirs(folder(name)) == {"."}, name


def test_rows_are_in_the_folder_of_their_partition_values(lake):
    events = {r["event_id"]: r["event_dt"] for r in lake.rows("events")}
    assert events == {
        "a": dt.date(2024, 1, 2),
        "b": dt.date(2024, 1, 3),
        "c": dt.date(2024, 1, 2),
        "d": dt.date(2024, 1, 2),
    }
    sensors = {r["sensor_id"]: (r["store_id"], r["reading_month"]) for r in lake.rows("sensors", SENSORS)}
    assert sensors == {"a": (1, "2024-01"), "b": (1, "2024-02"), "c": (2, "2024-01"), "d": (2, "2024-01")}
    # Each folder holds only rows with its values.
    for path in data_files(lake.parquet_dir("events")):
        day = dt.date.fromisoformat(path.parent.name.removeprefix("event_dt="))
        ids = pq.read_table(path, partitioning=None).column("event_id").to_pylist()
        assert all(events[i] == day for i in ids)


# ------------------------------------------------------------------------------------------
# No stray files; any reader reads them
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_no_stray_files_in_the_parquet_dataset(lake, name):
    folder = lake.parquet_dir(name)
    for path in folder.rglob("*"):
        assert not path.name.startswith((".", "_")), path
        assert path.is_dir() or path.suffix == ".parquet", path
    with duckdb.connect() as con:
        [(count,)] = con.execute(
            "SELECT count(*) FROM read_parquet(?, hive_partitioning = true)", [f"{folder}/**/*.parquet"]
        ).fetchall()
    assert count == len(lake.rows(name))


def test_rejects_folder_holds_one_csv_per_source(lake):
    root = lake.lake / "_rejects"
    csvs = [p for p in root.rglob("*") if p.is_file()]
    assert all(p.suffix == ".csv" for p in csvs), csvs
    assert Counter(p.parent.name for p in csvs) == SOURCES_BY_TABLE
    for path in csvs:
        with open(path, encoding="utf-8") as fh:
            header = fh.readline()
        assert [h.strip('"') for h in header.strip().split(",")][:6] == [
            "src_filename",
            "src_row_number",
            "reason_code",
            "reason_detail",
            "raw_record",
            "ingestion_ts",
        ]


@pytest.mark.parametrize("name", TABLE_NAMES)
def test_duckdb_reads_the_parquet_dataset_with_hive_partitioning(lake, name):
    folder = lake.parquet_dir(name)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        got = con.sql(
            "SELECT * FROM read_parquet($glob, hive_partitioning = true) ORDER BY src_filename, src_row_number",
            params={"glob": f"{folder}/**/*.parquet"},
        ).to_arrow_table()
    expected = lake.delta(name)
    assert sorted(got.column_names) == sorted(expected.column_names)  # partition columns once
    assert got.num_rows == expected.num_rows
    for column in ("src_filename", "src_row_number", "src_row_hash", *TABLES_BY_NAME[name].required):
        assert got.column(column).to_pylist() == expected.column(column).to_pylist(), column
    for column in TABLES_BY_NAME[name].partition_by:
        assert [str(v) for v in got.column(column).to_pylist()] == [str(v) for v in expected.column(column).to_pylist()]


def test_duckdb_delta_extension_reads_the_delta_tables(lake):
    with duckdb.connect(config={"autoinstall_known_extensions": False}) as con:
        installed = con.execute("SELECT installed FROM duckdb_extensions() WHERE extension_name = 'delta'").fetchall()
        if not installed or not installed[0][0]:
            pytest.skip("the DuckDB delta extension is not installed (INSTALL needs the network)")
        con.execute("LOAD delta")
        for name in TABLE_NAMES:
            [(count,)] = con.execute("SELECT count(*) FROM delta_scan(?)", [str(lake.delta_dir(name))]).fetchall()
            assert count == lake.delta(name).num_rows, name


# ------------------------------------------------------------------------------------------
# Awkward source file names
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src_path",
    ["orders/o'brien 2024 ü.csv", 'orders/ça va; "quoted" %20 #1 = x\'--.csv', "orders_d'été 2024.csv"],
)
def test_awkward_file_name_loads_reruns_and_replaces(lake_run, src_path):
    first = orders_csv(order(order_id=1), order(order_id=2, quantity="0"), order(order_id=3, order_dt="2024-01-03"))
    lr = lake_run({src_path: first})

    o = lr.outcome(src_path)
    assert (o.status, o.rows, o.reject_count) == ("success", 2, 1)
    assert [(r["src_filename"], r["order_id"]) for r in lr.rows("orders")] == [(src_path, 1), (src_path, 3)]
    assert [(r["src_filename"], r["src_row_number"]) for r in lr.rejects("orders")] == [(src_path, 2)]
    assert list(lr.manifest_rows()) == [src_path]
    version = DeltaTable(str(lr.delta_dir("orders"))).version()
    before = (lr.rows("orders"), lr.rejects("orders"), data_files(lr.parquet_dir("orders")))

    # Re-running with nothing new is a no-op.
    lr.run()
    assert lr.result.outcomes == []
    assert lr.result.exit_code == 0
    assert DeltaTable(str(lr.delta_dir("orders"))).version() == version
    assert (lr.rows("orders"), lr.rejects("orders"), data_files(lr.parquet_dir("orders"))) == before

    # New content under the same name replaces that source's rows and rejects.
    lr.run({src_path: orders_csv(order(order_id=7), order(order_id=8, status="paid"))})
    assert (lr.outcome(src_path).rows, lr.outcome(src_path).reject_count) == (1, 1)
    rows = lr.rows("orders")
    assert [(r["src_filename"], r["order_id"]) for r in rows] == [(src_path, 7)]
    assert rows[0]["ingestion_ts"] > before[0][0]["ingestion_ts"]
    assert [(r["src_row_number"], r["reason_code"]) for r in lr.rejects("orders")] == [(2, "CONSTRAINT_VIOLATION")]
    assert len(list((lr.lake / "_rejects" / "orders").glob("*.csv"))) == 1
    assert partition_dirs(lr.parquet_dir("orders")) == {"order_dt=2024-01-02"}
    with duckdb.connect() as con:
        [(count,)] = con.execute(
            "SELECT count(*) FROM read_parquet(?, hive_partitioning = true)",
            [f"{lr.parquet_dir('orders')}/**/*.parquet"],
        ).fetchall()
    assert count == 1
    assert os.listdir(lr.raw) == [src_path.split("/")[0]]  # the raw file is never moved


# ------------------------------------------------------------------------------------------
# Delta statistics: any filter finds every row
# ------------------------------------------------------------------------------------------


def test_delta_filters_on_any_column_find_every_matching_row(lake_run):
    # A long source name, long strings and decimals: columns whose statistics a writer might
    # leave out, which makes delta-rs's pyarrow dataset skip the file on any filter over them.
    long_name = "orders/orders_" + "x" * 60 + "_2024-01-02.csv"
    long_text = "a very long payment method name, longer than thirty-two characters " * 3
    lr = lake_run(
        {
            long_name: orders_csv(
                order(order_id=1, payment_method=long_text, discount_pct=""),
                order(order_id=2, unit_price="12.34", order_dt="2024-01-03"),
                order(order_id=3, payment_method="\U0010ffff" * 40),
            ),
            "products.csv": products_csv(product(product_id=1, is_discontinued="yes"), product(product_id=2)),
        }
    )
    for name in ("orders", "products"):
        dt_ = DeltaTable(str(lr.delta_dir(name)))
        everything = dt_.to_pyarrow_table()
        assert everything.num_rows >= 2
        for column in everything.column_names:
            for value in everything.column(column).unique().to_pylist():
                expected = sum(v == value for v in everything.column(column).to_pylist()) if value is not None else None
                flt = pads.field(column).is_null() if value is None else pads.field(column) == value
                got = dt_.to_pyarrow_dataset().to_table(filter=flt).num_rows
                if expected is None:
                    expected = everything.column(column).null_count
                assert got == expected, (name, column, value)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "interleaved"])
def test_partitioned_writer_makes_one_file_per_partition_in_input_order(tmp_path, grouped):
    """Rows that arrive grouped by partition are written as they come; interleaved ones are
    grouped first. Either way each partition gets one file holding its rows in arrival order."""
    from bronze_assets.lake import PartitionedWriter

    n = 1_000
    days = [dt.date(2024, 1, 1 + (i // 250 if grouped else i % 4)) for i in range(n)]
    schema = pa.schema([("k", pa.int64()), ("name", pa.string()), ("day", pa.date32())])
    writer = PartitionedWriter(tmp_path / "out", schema, partition_by=("day",), prefix="t")
    for start in range(0, n, 300):
        stop = min(n, start + 300)
        writer.write(
            pa.table({"k": list(range(start, stop)), "name": [f"n{i}" for i in range(start, stop)], "day": days[start:stop]}, schema=schema)
        )
    files = writer.close()
    assert sorted(f.partition_values["day"] for f in files) == [f"2024-01-0{d}" for d in range(1, 5)]
    assert sum(f.rows for f in files) == n
    # No partition folders of its own: those are made where the files are published.
    assert all(p.is_file() for p in (tmp_path / "out").iterdir())
    assert all(f.relpath == f"day={f.partition_values['day']}/{f.staged}" for f in files)
    for f in files:
        got = pq.read_table(f.staged_path(tmp_path / "out"))
        day = dt.date.fromisoformat(f.partition_values["day"])
        want = [i for i in range(n) if days[i] == day]
        assert got.column("k").to_pylist() == want
        assert got.column("name").to_pylist() == [f"n{i}" for i in want]
        assert got.schema.names == ["k", "name"]


def test_text_columns_are_dictionary_encoded_only_where_their_values_repeat(tmp_path):
    """A file keeps Parquet's dictionary for a text column whose first rows repeat values, and
    stores a column of unique values (and the per-row audit columns) plain; the values read
    back the same either way."""
    from bronze_assets.lake import PartitionedWriter

    n = 5_000
    schema = pa.schema(
        [("id", pa.string()), ("kind", pa.string()), ("empty", pa.string()), ("src_row_hash", pa.string()), ("day", pa.date32())]
    )
    data = {
        "id": [f"evt-{i:08d}" for i in range(n)],
        "kind": [("view", "click", "buy")[i % 3] for i in range(n)],
        "empty": [None] * n,
        "src_row_hash": [hashlib.md5(str(i).encode()).hexdigest() for i in range(n)],
        "day": [dt.date(2024, 1, 1 + i % 2) for i in range(n)],
    }
    writer = PartitionedWriter(tmp_path / "out", schema, partition_by=("day",), prefix="t")
    writer.write(pa.table(data, schema=schema))
    files = writer.close()
    assert len(files) == 2
    for f in files:
        meta = pq.ParquetFile(f.staged_path(tmp_path / "out")).metadata
        columns = {meta.row_group(0).column(c).path_in_schema: meta.row_group(0).column(c) for c in range(meta.num_columns)}
        assert columns["kind"].has_dictionary_page and columns["empty"].has_dictionary_page
        assert not columns["id"].has_dictionary_page and not columns["src_row_hash"].has_dictionary_page
        got = pq.read_table(f.staged_path(tmp_path / "out"))
        day = dt.date.fromisoformat(f.partition_values["day"])
        rows = [i for i in range(n) if data["day"][i] == day]
        assert got.column("id").to_pylist() == [data["id"][i] for i in rows]
        assert got.column("kind").to_pylist() == [data["kind"][i] for i in rows]
        assert got.column("empty").null_count == len(rows)


def test_rows_keep_record_order_within_each_partition_and_rejects_keep_record_order(lake_run):
    """The validating statement orders its result by validity and partition: each partition's
    rows must still be in record order in its file, and the rejects CSV in record order."""
    records = []
    for n in range(1, 301):
        over: dict[str, object] = {"order_id": n, "order_dt": f"2024-01-0{1 + n % 3}"}
        if n % 7 == 0:
            over["quantity"] = "many"  # TYPE_MISMATCH
        if n % 11 == 0:
            over["status"] = "paid"  # CONSTRAINT_VIOLATION
        records.append(order(**over))
    lr = lake_run({"orders/ordered.csv": orders_csv(*records)})
    data = lr.lake / "bronze" / "parquet" / "orders"
    files = sorted(data.rglob("*.parquet"))
    assert len(files) == 3
    for f in files:
        numbers = pq.read_table(f).column("src_row_number").to_pylist()
        assert numbers == sorted(numbers) and numbers
    (reject_file,) = (lr.lake / "_rejects" / "orders").glob("*.csv")
    with reject_file.open(newline="", encoding="utf-8") as fh:
        import csv

        numbers = [int(r["src_row_number"]) for r in csv.DictReader(fh)]
    expected = [n for n in range(1, 301) if n % 7 == 0 or n % 11 == 0]
    assert numbers == expected


@pytest.mark.parametrize("many", [False, True], ids=["one-source", "many-sources"])
def test_validated_rows_come_grouped_by_a_partition_key_of_several_columns(many):
    """Sensors partition by store and month: the validating statement must hand the writer each
    partition's rows together, in record order, and the rejects after them in record order."""
    from bronze_assets.readers import normalize_native
    from bronze_assets.validation import Validator, output_schema

    table = TABLES_BY_NAME["sensors"]
    n = 2_000
    start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    batch = pa.RecordBatch.from_pydict(
        {
            "_row": pa.array(range(1, n + 1), pa.int64()),
            "_raw": pa.array([None] * n, pa.string()),
            "_bad": pa.array([None] * n, pa.string()),
            "store_id": pa.array([i % 5 for i in range(n)], pa.int32()),
            "sensor_id": [f"s{i % 3}" for i in range(n)],
            "reading_ts": pa.array([start + dt.timedelta(days=(i * 7) % 150) for i in range(n)], pa.timestamp("us", tz="UTC")),
            "temperature_c": [20.0] * n,
            "humidity_pct": [150.0 if i % 97 == 0 else 40.0 for i in range(n)],  # CONSTRAINT_VIOLATION
            "co2_ppm": pa.array([400] * n, pa.int32()),
            "battery_v": [3.1] * n,
        }
    )
    batch = normalize_native(batch)
    validator = Validator(table, source_schema=batch.schema, raw_kind="row", output_schema=output_schema(table))
    its = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    try:
        if many:
            results = validator.run_many([([batch.slice(0, 700)], "sensors/a.parquet", its), ([batch.slice(700)], "sensors/b.parquet", its)])
        else:
            results = [validator.run(batch, src_filename="sensors/a.parquet", ingestion_ts=its)]
    finally:
        validator.close()
    seen_rows = 0
    for result in results:
        valid = result.valid.to_pylist()
        keys = [(r["store_id"], r["reading_month"]) for r in valid]
        runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
        assert len(runs) == len(set(keys)), "a partition's rows are split"
        for key in set(keys):
            numbers = [r["src_row_number"] for r in valid if (r["store_id"], r["reading_month"]) == key]
            assert numbers == sorted(numbers)
        rejected = result.rejects.column("src_row_number").to_pylist()
        assert rejected == sorted(rejected) and rejected
        assert set(result.rejects.column("reason_code").to_pylist()) == {"CONSTRAINT_VIOLATION"}
        seen_rows += len(valid) + len(rejected)
    assert seen_rows == n


def _spilling_writer(tmp_path, **kw):
    from bronze_assets.lake import PartitionedWriter

    schema = pa.schema([("k", pa.int64()), ("name", pa.string()), ("day", pa.date32())])
    return schema, PartitionedWriter(tmp_path / "out", schema, partition_by=("day",), prefix="t", buffer_bytes=1, **kw)


def _feed(writer, schema, n: int, *, step: int = 50) -> list[dt.date]:
    days = [dt.date(2024, 1, 1 + i % 4) for i in range(n)]  # every batch touches every partition
    for start in range(0, n, step):
        stop = min(n, start + step)
        writer.write(
            pa.table({"k": list(range(start, stop)), "name": [f"n{i}" for i in range(start, stop)], "day": days[start:stop]}, schema=schema)
        )
    return days


def test_rows_set_aside_on_disk_make_one_row_group_per_partition_in_record_order(tmp_path):
    """Past its buffer the writer sets each partition's rows aside on disk instead of writing a
    sliver of a row group per partition: a partition smaller than a row group still gets one."""
    schema, writer = _spilling_writer(tmp_path)
    n = 2_000
    days = _feed(writer, schema, n)
    assert (tmp_path / "out" / "_spill").is_dir()  # it did set rows aside
    files = writer.close()
    assert not (tmp_path / "out" / "_spill").exists()
    # The files sit flat in the writer's folder; their paths in the table name the partitions.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f.staged for f in files)
    assert sorted(f.relpath.split("/")[0] for f in files) == [f"day=2024-01-0{d}" for d in range(1, 5)]
    assert len(files) == 4 and sum(f.rows for f in files) == n
    for f in files:
        pf = pq.ParquetFile(f.staged_path(tmp_path / "out"))
        assert pf.metadata.num_row_groups == 1
        day = dt.date.fromisoformat(f.partition_values["day"])
        want = [i for i in range(n) if days[i] == day]
        got = pf.read()
        assert got.column("k").to_pylist() == want
        assert got.column("name").to_pylist() == [f"n{i}" for i in want]
        assert json.loads(f.stats)["numRecords"] == len(want)


def test_rows_set_aside_on_disk_are_written_once_a_row_group_fills(tmp_path):
    schema, writer = _spilling_writer(tmp_path, row_group_rows=120)
    n = 2_000
    days = _feed(writer, schema, n, step=30)
    files = writer.close()
    assert sum(f.rows for f in files) == n
    for f in files:
        pf = pq.ParquetFile(f.staged_path(tmp_path / "out"))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        assert len(sizes) > 1 and all(s >= 120 for s in sizes[:-1]), sizes
        day = dt.date.fromisoformat(f.partition_values["day"])
        assert pf.read().column("k").to_pylist() == [i for i in range(n) if days[i] == day]


def test_a_writer_of_one_source_carries_its_constant_columns_only_in_the_files(tmp_path):
    """Columns the caller declares constant (a source's name and ingestion time) are not set
    aside on disk with the rows; every file gets them back, typed and in schema order, however
    many row groups and spills its rows went through."""
    from bronze_assets.lake import PartitionedWriter

    ts = dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC)
    schema = pa.schema([("k", pa.int64()), ("src", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("day", pa.date32())])
    writer = PartitionedWriter(
        tmp_path / "out", schema, partition_by=("day",), prefix="t", buffer_bytes=1, row_group_rows=300,
        constants={"src": "orders/a.csv", "ts": ts},
    )  # fmt: skip
    n, looked = 2_000, 0
    days = [dt.date(2024, 1, 1 + i % 4) for i in range(n)]
    for start in range(0, n, 30):
        stop = min(n, start + 30)
        writer.write(pa.table({"k": range(start, stop), "src": ["orders/a.csv"] * (stop - start), "ts": [ts] * (stop - start), "day": days[start:stop]}, schema=schema))
        spills = sorted((tmp_path / "out" / "_spill").glob("*.arrow"))
        if spills:  # what is set aside holds the other columns only
            with pa.memory_map(str(spills[-1])) as m:
                assert pa.ipc.open_stream(m).schema.names == ["k"]
            looked += 1
    assert looked
    files = writer.close()
    assert sum(f.rows for f in files) == n
    for f in files:
        pf = pq.ParquetFile(f.staged_path(tmp_path / "out"))
        assert pf.metadata.num_row_groups > 1
        got = pf.read()
        assert got.schema == pa.schema([("k", pa.int64()), ("src", pa.string()), ("ts", pa.timestamp("us", tz="UTC"))])
        day = dt.date.fromisoformat(f.partition_values["day"])
        assert got.column("k").to_pylist() == [i for i in range(n) if days[i] == day]
        assert set(got.column("src").to_pylist()) == {"orders/a.csv"} and set(got.column("ts").to_pylist()) == {ts}
        assert json.loads(f.stats)["minValues"]["src"] == "orders/a.csv"
    # Rows that do not hold the declared value are a caller's mistake, refused before buffering.
    writer = PartitionedWriter(tmp_path / "again", schema, partition_by=("day",), prefix="t", constants={"src": "orders/a.csv", "ts": ts})
    with pytest.raises(ValueError, match="src is not"):
        writer.write(pa.table({"k": [1, 2], "src": ["orders/a.csv", "orders/b.csv"], "ts": [ts, ts], "day": days[:2]}, schema=schema))
    writer.abort()


def test_an_aborted_writer_leaves_no_rows_set_aside(tmp_path):
    schema, writer = _spilling_writer(tmp_path)
    _feed(writer, schema, 500)
    assert any((tmp_path / "out" / "_spill").iterdir())
    writer.abort()
    assert not (tmp_path / "out" / "_spill").exists()


def test_the_partition_folders_of_both_outputs_are_made_while_a_source_streams(tmp_path):
    """The writer has its partitions' folders made in the outputs as it meets them, so that
    publishing only links files into them; an aborted writer removes those still empty and
    leaves the ones that hold files (from earlier sources) as they are."""
    from bronze_assets.lake import FolderMaker

    roots = [tmp_path / "delta" / "t", tmp_path / "parquet" / "t"]
    kept = roots[1] / "day=2024-01-02" / "earlier.parquet"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x")
    schema, writer = _spilling_writer(tmp_path, folders=FolderMaker(roots))
    _feed(writer, schema, 200)
    writer.close()
    for root in roots:
        assert sorted(p.name for p in root.iterdir()) == [f"day=2024-01-0{d}" for d in range(1, 5)]
    schema, writer = _spilling_writer(tmp_path / "again", folders=FolderMaker(roots))
    for root in roots:  # a fresh pair of outputs for the aborted writer
        for d in range(1, 5):
            folder = root / f"day=2024-01-0{d}"
            if not any(folder.iterdir()):
                folder.rmdir()
    _feed(writer, schema, 200)
    writer.abort()
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.glob("*/t/*"))] == ["parquet/t/day=2024-01-02"]
    assert kept.read_bytes() == b"x"


@pytest.mark.parametrize("table_name", ["sensors", "orders"])
def test_a_validated_batch_comes_out_valid_rows_first_grouped_by_partition_then_rejects_in_record_order(table_name):
    """The validating statement keeps record order and the rows are put in write order after it:
    valid rows first, each partition's rows together and in record order (partitions in order of
    first appearance), then the rejects in record order. Sensors group by a hash of two columns,
    orders by one date column."""
    from bronze_assets.validation import Validator, output_schema

    table = TABLES_BY_NAME[table_name]
    n = 600
    bad = {i for i in range(n) if i % 7 == 3}
    if table_name == "sensors":
        columns = {
            "store_id": pa.array([i % 5 for i in range(n)], pa.int32()),
            "sensor_id": pa.array([f"s{i}" for i in range(n)]),
            "reading_ts": pa.array(
                [dt.datetime(2024, 1 + i % 3, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=i) for i in range(n)],
                pa.timestamp("us", tz="UTC"),
            ),
            "temperature_c": pa.array([float(i) for i in range(n)]),
            "humidity_pct": pa.array([500.0 if i in bad else 50.0 for i in range(n)]),  # over 100: rejected
            "co2_ppm": pa.array([400] * n, pa.int32()),
            "battery_v": pa.array([3.0] * n),
        }
        kind = "row"
    else:
        columns = {c.name: pa.array(["x"] * n) for c in table.columns}
        columns.update(
            order_id=pa.array([str(i) for i in range(n)]),
            customer_id=pa.array(["1"] * n),
            store_id=pa.array(["1"] * n),
            product_id=pa.array(["1"] * n),
            order_dt=pa.array([f"2024-01-0{1 + (i * 5) % 9}" for i in range(n)]),
            order_ts=pa.array(["2024-01-01T00:00:00Z"] * n),
            quantity=pa.array(["0" if i in bad else "2" for i in range(n)]),  # 0: rejected
            unit_price=pa.array(["1.50"] * n),
            discount_pct=pa.array(["0"] * n),
            currency=pa.array(["EUR"] * n),
            status=pa.array(["PAID"] * n),
            payment_method=pa.array(["card"] * n),
        )
        columns = {"_raw": pa.array([f"line {i}" for i in range(n)]), **columns}
        kind = "text"
    batch = pa.RecordBatch.from_pydict(
        {"_row": pa.array(range(1, n + 1), pa.int64()), "_bad": pa.nulls(n, pa.string()), **columns}
    )
    validator = Validator(table, source_schema=batch.schema, raw_kind=kind, output_schema=output_schema(table))
    try:
        result = validator.run(batch, src_filename=f"{table_name}/x", ingestion_ts=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    finally:
        validator.close()
    assert result.rejects.column("src_row_number").to_pylist() == [i + 1 for i in sorted(bad)]
    valid = result.valid.select([*table.partition_by, "src_row_number"]).to_pylist()
    assert sorted(r["src_row_number"] for r in valid) == [i + 1 for i in range(n) if i not in bad]
    keys = [tuple(r[c] for c in table.partition_by) for r in valid]
    runs = [k for i, k in enumerate(keys) if i == 0 or keys[i - 1] != k]
    assert len(runs) == len(set(keys)) > 1  # each partition's rows together
    first_seen = list(dict.fromkeys(keys))
    assert runs == first_seen  # in order of first appearance
    for key in runs:
        numbers = [r["src_row_number"] for r, k in zip(valid, keys, strict=True) if k == key]
        assert numbers == sorted(numbers)  # record order within the partition
    # Every column moved with its row (the row hash and identifiers of one width are gathered as
    # fixed-size binary, the others by Arrow's take, the source's name and time not at all).
    out = result.valid.to_pylist()
    assert {r["src_filename"] for r in out} == {f"{table_name}/x"}
    if table_name == "orders":
        assert all(r["src_row_hash"] == hashlib.md5(f"line {r['src_row_number'] - 1}".encode()).hexdigest() for r in out)
        assert all(r["order_id"] == r["src_row_number"] - 1 for r in out)
    else:
        assert all(r["sensor_id"] == f"s{r['src_row_number'] - 1}" for r in out)


@pytest.mark.parametrize(
    "values",
    [
        [f"{i:032x}" for i in range(50)],  # one width
        [f"é{i:03d}" for i in range(50)],  # one width in bytes, not in characters
        [f"v{i}" for i in range(50)],  # several widths
        [None if i % 9 == 0 else f"{i:04d}" for i in range(50)],  # nulls
        ["" for _ in range(50)],
    ],
)
@pytest.mark.parametrize("sliced", [False, True])
def test_gathering_a_text_column_equals_arrows_take(values, sliced):
    from bronze_assets.validation import _gathered

    column = pa.chunked_array([pa.array(values[:20]), pa.array(values[20:])])
    if sliced:
        column = column.slice(3, 40)
    order = pa.array(list(range(len(column)))[::-3] + [i for i in range(len(column)) if (len(column) - 1 - i) % 3], pa.int64())
    got = _gathered(column, order)
    assert pa.chunked_array([got]).combine_chunks().equals(column.take(order).combine_chunks())


def test_the_row_hash_is_stored_uncompressed_and_the_other_columns_with_snappy(tmp_path):
    from bronze_assets.lake import PartitionedWriter

    schema = pa.schema([("k", pa.int64()), ("src_row_hash", pa.string()), ("day", pa.date32())])
    writer = PartitionedWriter(tmp_path / "out", schema, partition_by=("day",), prefix="t")
    writer.write(pa.table({"k": [1, 2], "src_row_hash": ["ab" * 16, "cd" * 16], "day": [dt.date(2024, 1, 1)] * 2}, schema=schema))
    (f,) = writer.close()
    meta = pq.ParquetFile(f.staged_path(tmp_path / "out")).metadata.row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(meta.num_columns)}
    assert codecs == {"k": "SNAPPY", "src_row_hash": "UNCOMPRESSED"}


@pytest.mark.parametrize("threads", [1, 2])
def test_lines_that_do_not_parse_are_rejected_without_failing_their_batch(threads):
    """Invalid JSON in every vector of a batch (DuckDB works 2,048 rows at a time) reaches none
    of the JSON functions: each such line is MALFORMED_RECORD with its detail, and every other
    line of the batch is validated as usual, rescue of undeclared keys included."""
    from bronze_assets.validation import Validator, output_schema
    from schemas.schemas import Column, Table

    table = Table(name="t", columns=(Column("id", pa.int64(), required=True), Column("note", pa.string())))
    broken = ['{"id": 1, "note": ', "{", '{"id": 2 "note": "x"}', '{"id": "\\x"}', "{not json}", '{"id": tru}', '{"id": 1} trailing']
    kinds = {"[1, 2]": "a JSON array, not an object", '"text"': "a JSON string, not an object", "  7": "a JSON ubigint, not an object"}
    lines, want = [], {}
    for i in range(1, 10_001):
        if i % 5 == 0:
            text = broken[i % len(broken)]
            want[i] = "invalid JSON"
        elif i % 5 == 2 and i % 3 == 0:
            text = list(kinds)[i % len(kinds)]
            want[i] = kinds[text]
        else:
            text = f'{{"id": {i}, "note": "n{i}", "other": {i % 2}}}' if i % 7 == 0 else f'  {{"id": {i}, "note": "n{i}"}}'
        lines.append(text)
    n = len(lines)
    batch = pa.RecordBatch.from_pydict({"_row": pa.array(range(1, n + 1), pa.int64()), "_bad": pa.nulls(n, pa.string()), "_raw": pa.array(lines)})
    validator = Validator(table, source_schema=batch.schema, raw_kind="json", output_schema=output_schema(table), threads=threads)
    try:
        result = validator.run(batch, src_filename="t/x.jsonl", ingestion_ts=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    finally:
        validator.close()
    rejects = result.rejects.to_pylist()
    assert {r["src_row_number"]: r["reason_detail"] for r in rejects} == want
    assert {r["reason_code"] for r in rejects} == {"MALFORMED_RECORD"}
    valid = result.valid.to_pylist()
    assert [r["src_row_number"] for r in valid] == [i for i in range(1, n + 1) if i not in want]
    assert all(r["id"] == r["src_row_number"] and r["note"] == f"n{r['id']}" for r in valid)
    assert {r["src_row_number"] for r in valid if r["_rescued_data"]} == {i for i in range(7, n + 1, 7) if i not in want}


def test_json_values_are_read_by_exact_key_first_one_wins_nested_as_json_text():
    """A JSON line's declared keys are read in one pass into a struct of text: keys match
    exactly, the first of a repeated key wins, a nested value is kept as its JSON text, an
    undeclared key goes to _rescued_data, and a line that is not an object is malformed."""
    from bronze_assets.validation import Validator, output_schema
    from schemas.schemas import Column, Table

    first, note, third = "id", "note", "extra"
    table = Table(
        name="t",
        columns=(Column(first, pa.int64(), required=True), Column(note, pa.string()), Column(third, pa.string())),
    )
    lines = [
        '{"id": 1, "note": "a", "id": 2}',
        '{"id": 3, "Note": "upper", "note": {"k": [1, 2]}}',
        f'{{"id": 4, "{third}": "third", "other": 5}}',
        '[1, 2]',
    ]
    n = len(lines)
    batch = pa.RecordBatch.from_pydict(
        {"_row": pa.array(range(1, n + 1), pa.int64()), "_bad": pa.nulls(n, pa.string()), "_raw": pa.array(lines)}
    )
    validator = Validator(table, source_schema=batch.schema, raw_kind="json", output_schema=output_schema(table))
    try:
        result = validator.run(batch, src_filename="t/x.jsonl", ingestion_ts=dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
    finally:
        validator.close()
    rows = {r["src_row_number"]: r for r in result.valid.to_pylist()}
    assert [rows[k][first] for k in (1, 2, 3)] == [1, 3, 4]
    assert rows[1][note] == "a"
    assert rows[2][note] == '{"k":[1,2]}'
    assert json.loads(rows[2]["_rescued_data"]) == {"Note": "upper"}
    assert rows[3][third] == "third"
    assert json.loads(rows[3]["_rescued_data"]) == {"other": 5}
    assert result.rejects.column("src_row_number").to_pylist() == [4]
    assert result.rejects.column("reason_code").to_pylist() == ["MALFORMED_RECORD"]
