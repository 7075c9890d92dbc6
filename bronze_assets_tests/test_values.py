"""Value conversion: lossless or rejected (CONTRACT section 4 and the "Values" rules of section 11).

Each group of cases is one raw source of a lake shared by the module; case k is record k of its
source, so a test finds its record by ``src_row_number`` and checks the stored value or the reject.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pyarrow as pa
import pytest

from bronze_assets_tests.conftest import (
    CUSTOMER_HEADER,
    ORDER_COLUMNS,
    SENSOR_SCHEMA,
    LakeRun,
    RawFiles,
    assert_accounted,
    csv_text,
    customer_row,
    event,
    jsonl_text,
    order,
    orders_csv,
    parquet_bytes,
    product,
    products_csv,
    sensor,
    sensors_parquet,
    shared_lake,
    store,
    xlsx_bytes,
)

UTC = dt.UTC
FILES = RawFiles()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeRun:
    return shared_lake(tmp_path_factory, "values", FILES)


@dataclass(frozen=True)
class Ok:
    """The record loads and ``column`` holds ``value``."""

    column: str
    value: Any


@dataclass(frozen=True)
class Rejected:
    """The record is rejected with ``reason``, and reason_detail names ``column``."""

    reason: str
    column: str


Expect = Ok | Rejected


def check(lake: LakeRun, table: str, src_path: str, row: int, expect: Expect) -> None:
    written = {r["src_row_number"]: r for r in lake.rows(table, src_path)}
    rejected = {r["src_row_number"]: r for r in lake.rejects(table, src_path)}
    if isinstance(expect, Ok):
        assert row not in rejected, rejected.get(row)
        assert written[row][expect.column] == expect.value
        assert type(written[row][expect.column]) is type(expect.value)
    else:
        assert row not in written, written.get(row)
        assert rejected[row]["reason_code"] == expect.reason
        assert expect.column in rejected[row]["reason_detail"]


def ts(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> dt.datetime:
    return dt.datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# ------------------------------------------------------------------------------------------
# Text values (CSV): numbers, dates, timestamps, whitespace, nulls
# ------------------------------------------------------------------------------------------

ORDER_CASES: dict[str, tuple[dict[str, object], Expect]] = {
    "decimal-trailing-zero-12.340": ({"unit_price": "12.340"}, Ok("unit_price", Decimal("12.34"))),
    "decimal-lossy-12.345": ({"unit_price": "12.345"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-integer": ({"unit_price": "12"}, Ok("unit_price", Decimal("12.00"))),
    "decimal-whitespace": ({"unit_price": " 7.5 "}, Ok("unit_price", Decimal("7.50"))),
    "decimal-too-many-digits": ({"unit_price": "123456789.00"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-max": ({"unit_price": "99999999.99"}, Ok("unit_price", Decimal("99999999.99"))),
    "decimal-5-2": ({"discount_pct": "12.50"}, Ok("discount_pct", Decimal("12.50"))),
    "int-3.0": ({"quantity": "3.0"}, Ok("quantity", 3)),
    "int-3.5": ({"quantity": "3.5"}, Rejected("TYPE_MISMATCH", "quantity")),
    "int-whitespace": ({"quantity": " 4 "}, Ok("quantity", 4)),
    "int-plus-sign": ({"quantity": "+5"}, Ok("quantity", 5)),
    "int-leading-zeros": ({"quantity": "007"}, Ok("quantity", 7)),
    "int-hex-is-not-an-integer": ({"quantity": "0x1F"}, Rejected("TYPE_MISMATCH", "quantity")),
    "int-exponent-is-not-an-integer": ({"quantity": "1e3"}, Rejected("TYPE_MISMATCH", "quantity")),
    "int-underscores-are-not-an-integer": ({"quantity": "1_000"}, Rejected("TYPE_MISMATCH", "quantity")),
    "int-trailing-dot": ({"quantity": "6."}, Ok("quantity", 6)),
    "decimal-canonical": ({"unit_price": "4.05"}, Ok("unit_price", Decimal("4.05"))),
    "decimal-leading-dot": ({"unit_price": ".5"}, Ok("unit_price", Decimal("0.50"))),
    "decimal-exponent-is-not-a-decimal": ({"unit_price": "1e1"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-leading-zeros": ({"unit_price": "0012.30"}, Ok("unit_price", Decimal("12.30"))),
    "decimal-many-trailing-zeros": ({"unit_price": "12.34000000000000000000000"}, Ok("unit_price", Decimal("12.34"))),
    "decimal-trailing-dot": ({"unit_price": "7."}, Ok("unit_price", Decimal("7.00"))),
    "decimal-signed-whitespace": ({"unit_price": " +7.5 "}, Ok("unit_price", Decimal("7.50"))),
    "decimal-digit-past-18-places": ({"unit_price": "12.3400000000000000001"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-tiny": ({"unit_price": "0.0000000000000000000001"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-leading-dot-too-fine": ({"unit_price": ".001"}, Rejected("TYPE_MISMATCH", "unit_price")),
    "decimal-only-a-dot": ({"unit_price": "."}, Rejected("TYPE_MISMATCH", "unit_price")),
    "int32-max": ({"store_id": "2147483647"}, Ok("store_id", 2147483647)),
    "int32-overflow": ({"store_id": "2147483648"}, Rejected("TYPE_MISMATCH", "store_id")),
    "int32-underflow": ({"store_id": "-2147483649"}, Rejected("TYPE_MISMATCH", "store_id")),
    "int64-max": ({"customer_id": "9223372036854775807"}, Ok("customer_id", 9223372036854775807)),
    "int64-overflow": ({"customer_id": "9223372036854775808"}, Rejected("TYPE_MISMATCH", "customer_id")),
    "date-whitespace": ({"order_dt": " 2024-01-03 "}, Ok("order_dt", dt.date(2024, 1, 3))),
    "date-feb-30": ({"order_dt": "2024-02-30"}, Rejected("TYPE_MISMATCH", "order_dt")),
    "date-leap-day": ({"order_dt": "2024-02-29"}, Ok("order_dt", dt.date(2024, 2, 29))),
    "date-slashes": ({"order_dt": "2024/01/02"}, Rejected("TYPE_MISMATCH", "order_dt")),
    "date-unpadded": ({"order_dt": "2024-1-2"}, Rejected("TYPE_MISMATCH", "order_dt")),
    "date-bc": ({"order_dt": "2024-01-02 (BC)"}, Rejected("TYPE_MISMATCH", "order_dt")),
    "date-five-digit-year": ({"order_dt": "12024-01-02"}, Rejected("TYPE_MISMATCH", "order_dt")),
    "ts-offset": ({"order_ts": "2024-01-02T10:00:00+02:00"}, Ok("order_ts", ts(2024, 1, 2, 8))),
    "ts-negative-offset": ({"order_ts": "2024-01-02T22:30:00-05:00"}, Ok("order_ts", ts(2024, 1, 3, 3, 30))),
    "ts-zulu": ({"order_ts": "2024-01-02T10:00:00Z"}, Ok("order_ts", ts(2024, 1, 2, 10))),
    "ts-no-offset-is-utc": ({"order_ts": "2024-01-02T10:00:00"}, Ok("order_ts", ts(2024, 1, 2, 10))),
    "ts-nanoseconds-truncated": (
        {"order_ts": "2024-01-02T10:00:00.123456789Z"},
        Ok("order_ts", ts(2024, 1, 2, 10, 0, 0, 123456)),
    ),
    "ts-microseconds": ({"order_ts": "2024-01-02T10:00:00.000001+00:00"}, Ok("order_ts", ts(2024, 1, 2, 10, 0, 0, 1))),
    "ts-whitespace": ({"order_ts": "  2024-01-02T10:00:00Z "}, Ok("order_ts", ts(2024, 1, 2, 10))),
    "ts-invalid-hour": ({"order_ts": "2024-01-02T25:00:00Z"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-space-separator": ({"order_ts": "2024-01-02 10:00:00"}, Ok("order_ts", ts(2024, 1, 2, 10))),
    "ts-minutes-only": ({"order_ts": "2024-01-02T10:30Z"}, Ok("order_ts", ts(2024, 1, 2, 10, 30))),
    "ts-date-only-is-midnight": ({"order_ts": "2024-01-02"}, Ok("order_ts", ts(2024, 1, 2, 0))),
    "ts-offset-without-colon": ({"order_ts": "2024-01-02T10:00:00+0530"}, Ok("order_ts", ts(2024, 1, 2, 4, 30))),
    "ts-offset-hours-only": ({"order_ts": "2024-01-02T10:00:00-02"}, Ok("order_ts", ts(2024, 1, 2, 12))),
    "ts-slashes": ({"order_ts": "2024/01/02 10:00:00"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-unpadded": ({"order_ts": "2024-1-2T10:00:00Z"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-three-digit-year": ({"order_ts": " 024-01-02T10:00:00Z"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-negative-year": ({"order_ts": "-024-01-02T10:00:00Z"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-unpadded-hour": ({"order_ts": "2024-01-02T 1:00:00Z"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-infinity": ({"order_ts": "infinity"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-epoch": ({"order_ts": "epoch"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-zone-name": ({"order_ts": "2024-01-02T10:00:00 America/New_York"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-zone-abbreviation": ({"order_ts": "2024-01-02 10:00:00 UTC"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-bc": ({"order_ts": "2024-01-02 (BC)"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-offset-with-seconds": ({"order_ts": "2024-01-02T10:00:00+02:00:00"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "ts-epoch-seconds": ({"order_ts": "1704189600"}, Rejected("TYPE_MISMATCH", "order_ts")),
    "string-kept-exactly": ({"currency": " EUR "}, Ok("currency", " EUR ")),
    "optional-string-kept-exactly": ({"payment_method": "  card\t"}, Ok("payment_method", "  card\t")),
    "optional-string-whitespace-kept": ({"payment_method": "   "}, Ok("payment_method", "   ")),
    "optional-decimal-whitespace-is-null": ({"discount_pct": "   "}, Ok("discount_pct", None)),
    "optional-decimal-empty-is-null": ({"discount_pct": None}, Ok("discount_pct", None)),
    "optional-string-empty-is-null": ({"payment_method": None}, Ok("payment_method", None)),
    "required-whitespace-is-missing": ({"quantity": "  "}, Rejected("MISSING_REQUIRED", "quantity")),
}
ORDERS_SRC = FILES.add(
    "orders/values.csv", orders_csv(*(order(order_id=n, **over) for n, (over, _) in enumerate(ORDER_CASES.values(), 1)))
)


@pytest.mark.parametrize("case", ORDER_CASES)
def test_csv_values(lake, case):
    check(lake, "orders", ORDERS_SRC, list(ORDER_CASES).index(case) + 1, ORDER_CASES[case][1])


def test_csv_values_are_all_accounted(lake):
    assert_accounted(lake, ORDERS_SRC, len(ORDER_CASES))


BOOLEANS: dict[str, Expect] = {
    **{w: Ok("is_discontinued", True) for w in ("true", "TRUE", "True", "t", "T", "yes", "YES", "Yes", "y", "Y", "1")},
    **{w: Ok("is_discontinued", False) for w in ("false", "FALSE", "False", "f", "F", "no", "NO", "No", "n", "N", "0")},
    " yes ": Ok("is_discontinued", True),
    "\tF ": Ok("is_discontinued", False),
    "   ": Ok("is_discontinued", None),
    "": Ok("is_discontinued", None),
    "maybe": Rejected("TYPE_MISMATCH", "is_discontinued"),
    "2": Rejected("TYPE_MISMATCH", "is_discontinued"),
    "yess": Rejected("TYPE_MISMATCH", "is_discontinued"),
    "1.0": Rejected("TYPE_MISMATCH", "is_discontinued"),
}
BOOLEANS_SRC = FILES.add(
    "products/booleans.csv",
    products_csv(*(product(product_id=n, sku=f"S{n}", is_discontinued=w) for n, w in enumerate(BOOLEANS, 1))),
)


@pytest.mark.parametrize("word", BOOLEANS, ids=[repr(w) for w in BOOLEANS])
def test_csv_booleans(lake, word):
    check(lake, "products", BOOLEANS_SRC, list(BOOLEANS).index(word) + 1, BOOLEANS[word])


PRODUCT_CASES: dict[str, tuple[dict[str, object], Expect]] = {
    "optional-timestamp-whitespace-is-null": ({"updated_at": "  "}, Ok("updated_at", None)),
    "optional-timestamp-empty-is-null": ({"updated_at": None}, Ok("updated_at", None)),
    "optional-timestamp-invalid": ({"updated_at": "2024-13-01T00:00:00Z"}, Rejected("TYPE_MISMATCH", "updated_at")),
    "required-decimal-whitespace-is-missing": ({"unit_price": " "}, Rejected("MISSING_REQUIRED", "unit_price")),
    "required-string-whitespace-is-missing": ({"sku": " \t "}, Rejected("MISSING_REQUIRED", "sku")),
    "string-with-spaces-kept": ({"product_name": "  Big  Widget "}, Ok("product_name", "  Big  Widget ")),
}
PRODUCTS_SRC = FILES.add(
    "products/values.csv",
    products_csv(*(product(product_id=100 + n, **over) for n, (over, _) in enumerate(PRODUCT_CASES.values(), 1))),
)


@pytest.mark.parametrize("case", PRODUCT_CASES)
def test_csv_product_values(lake, case):
    check(lake, "products", PRODUCTS_SRC, list(PRODUCT_CASES).index(case) + 1, PRODUCT_CASES[case][1])


# ------------------------------------------------------------------------------------------
# CSV text: BOM, quoting, line terminators
# ------------------------------------------------------------------------------------------

BOM = b"\xef\xbb\xbf"
BOM_FILES = {
    FILES.add("orders/bom.csv", BOM + orders_csv(order(order_id=71)).encode()): ("orders", "order_id", 71),
    FILES.add("events/bom.jsonl", BOM + jsonl_text([event(event_id="bom")]).encode()): ("events", "event_id", "bom"),
    FILES.add("stores/bom.json", BOM + json.dumps([store(store_id=72)]).encode()): ("stores", "store_id", 72),
}


@pytest.mark.parametrize("src_path", BOM_FILES)
def test_utf8_bom_is_ignored(lake, src_path):
    table, key, value = BOM_FILES[src_path]

    o = lake.outcome(src_path)
    assert (o.status, o.rows, o.reject_count) == ("success", 1, 0)
    [row] = lake.rows(table, src_path)
    assert row[key] == value
    assert row["_rescued_data"] is None  # the first column name carries no BOM


QUOTED = {
    "comma": "a, b",
    "newline": "line1\nline2",
    "crlf": "line1\r\nline2",
    "escaped-quotes": 'say "hi"',
    "only-quotes": '""',
    "unicode": "carte bleue – é 日本",
    "leading-trailing-space": "  spaced  ",
}
QUOTED_SRC = FILES.add(
    "orders/quoted.csv",
    # csv quotes every field that needs it (and doubles inner quotes).
    orders_csv(*(order(order_id=n, payment_method=v) for n, v in enumerate(QUOTED.values(), 1))),
)


@pytest.mark.parametrize("case", QUOTED)
def test_quoted_csv_fields_are_kept_exactly(lake, case):
    check(lake, "orders", QUOTED_SRC, list(QUOTED).index(case) + 1, Ok("payment_method", QUOTED[case]))


def test_quoted_csv_source_is_all_loaded(lake):
    assert_accounted(lake, QUOTED_SRC, len(QUOTED))
    assert lake.rejects("orders", QUOTED_SRC) == []


_crlf_doc = csv_text(
    ORDER_COLUMNS, [[order(order_id=n, quantity=q)[c] for c in ORDER_COLUMNS] for n, q in ((1, 2), (2, 0))]
)
CRLF_SRC = FILES.add("orders/crlf.csv", _crlf_doc.replace("\n", "\r\n"))


def test_crlf_line_terminators(lake):
    [row] = lake.rows("orders", CRLF_SRC)
    assert (row["order_id"], row["payment_method"], row["src_row_number"]) == (1, "card", 1)
    [reject] = lake.rejects("orders", CRLF_SRC)
    assert reject["src_row_number"] == 2
    assert reject["raw_record"] == _crlf_doc.splitlines()[2]  # no terminator, no CR


# ------------------------------------------------------------------------------------------
# Native values: Parquet
# ------------------------------------------------------------------------------------------

_int64_schema = pa.schema(
    [
        ("store_id", pa.int64()),
        ("sensor_id", pa.string()),
        ("reading_ts", pa.timestamp("us", tz="UTC")),
        ("temperature_c", pa.float32()),
        ("humidity_pct", pa.int64()),
        ("co2_ppm", pa.float64()),
        ("battery_v", pa.float64()),
    ]
)
PARQUET_NATIVE: dict[str, tuple[dict[str, object], Expect]] = {
    "int64-fits-int32": ({"store_id": 5}, Ok("store_id", 5)),
    "int64-too-big-for-int32": ({"store_id": 2**40}, Rejected("TYPE_MISMATCH", "store_id")),
    "float-3.0-into-int": ({"co2_ppm": 3.0}, Ok("co2_ppm", 3)),
    "float-3.5-into-int": ({"co2_ppm": 3.5}, Rejected("TYPE_MISMATCH", "co2_ppm")),
    "float-too-big-for-int32": ({"co2_ppm": 3e10}, Rejected("TYPE_MISMATCH", "co2_ppm")),
    "int-into-float": ({"humidity_pct": 40}, Ok("humidity_pct", 40.0)),
    "float32-into-float64": ({"temperature_c": 21.5}, Ok("temperature_c", 21.5)),
    "null-optional": ({"co2_ppm": None}, Ok("co2_ppm", None)),
    "native-infinity-kept": ({"battery_v": float("inf")}, Ok("battery_v", float("inf"))),
}
PARQUET_NATIVE_SRC = FILES.add(
    "sensors/native.parquet",
    sensors_parquet(
        [sensor(sensor_id=f"n{n}", **over) for n, (over, _) in enumerate(PARQUET_NATIVE.values(), 1)], _int64_schema
    ),
)


@pytest.mark.parametrize("case", PARQUET_NATIVE)
def test_parquet_native_values(lake, case):
    check(lake, "sensors", PARQUET_NATIVE_SRC, list(PARQUET_NATIVE).index(case) + 1, PARQUET_NATIVE[case][1])


_string_schema = pa.schema([(f.name, pa.string()) for f in SENSOR_SCHEMA])
PARQUET_STRINGS: dict[str, tuple[dict[str, object], Expect]] = {
    "numeric-string-into-int": ({"store_id": "7"}, Ok("store_id", 7)),
    "numeric-string-3.0-into-int": ({"co2_ppm": "400.0"}, Ok("co2_ppm", 400)),
    "numeric-string-3.5-into-int": ({"co2_ppm": "400.5"}, Rejected("TYPE_MISMATCH", "co2_ppm")),
    "numeric-string-into-float": ({"temperature_c": " 21.5 "}, Ok("temperature_c", 21.5)),
    "text-into-float": ({"battery_v": "abc"}, Rejected("TYPE_MISMATCH", "battery_v")),
    "exponent-into-float": ({"battery_v": "3.7e0"}, Ok("battery_v", 3.7)),
    "leading-dot-into-float": ({"battery_v": "-.5"}, Ok("battery_v", -0.5)),
    "underscores-are-not-a-float": ({"battery_v": "1_000.5"}, Rejected("TYPE_MISMATCH", "battery_v")),
    "float-overflow": ({"battery_v": "1e400"}, Rejected("TYPE_MISMATCH", "battery_v")),
    "nan-text-is-not-a-float": ({"battery_v": "nan"}, Rejected("TYPE_MISMATCH", "battery_v")),
    "inf-text-is-not-a-float": ({"battery_v": "Infinity"}, Rejected("TYPE_MISMATCH", "battery_v")),
    "timestamp-string-not-iso": ({"reading_ts": "2024/01/02 10:00:00"}, Rejected("TYPE_MISMATCH", "reading_ts")),
    "timestamp-string-with-offset": ({"reading_ts": "2024-01-02T10:00:00+01:00"}, Ok("reading_ts", ts(2024, 1, 2, 9))),
    "blank-optional-is-null": ({"battery_v": "  "}, Ok("battery_v", None)),
}


def _as_strings(over: dict[str, object]) -> dict[str, object]:
    base = {"store_id": "1", "sensor_id": "s", "reading_ts": "2024-01-02T10:00:00Z", "humidity_pct": "50"}
    return base | over


PARQUET_STRINGS_SRC = FILES.add(
    "sensors/strings.parquet",
    sensors_parquet([_as_strings(over) for over, _ in PARQUET_STRINGS.values()], _string_schema),
)


@pytest.mark.parametrize("case", PARQUET_STRINGS)
def test_parquet_string_values(lake, case):
    check(lake, "sensors", PARQUET_STRINGS_SRC, list(PARQUET_STRINGS).index(case) + 1, PARQUET_STRINGS[case][1])


PARQUET_TS = {
    # src_path -> (Arrow type of reading_ts, value written, stored UTC value)
    FILES.add(
        "sensors/ts-naive-ns.parquet",
        parquet_bytes(
            pa.Table.from_pylist(
                [sensor(sensor_id="naive")], pa.schema([f for f in SENSOR_SCHEMA if f.name != "reading_ts"])
            ).append_column(
                "reading_ts", pa.array([1704189600123456789], pa.timestamp("ns"))
            )  # 2024-01-02T10:00:00.123456789
        ),
    ): ts(2024, 1, 2, 10, 0, 0, 123456),
    FILES.add(
        "sensors/ts-utc-ns.parquet",
        parquet_bytes(
            pa.Table.from_pylist(
                [sensor(sensor_id="utc-ns")], pa.schema([f for f in SENSOR_SCHEMA if f.name != "reading_ts"])
            ).append_column(
                "reading_ts", pa.array([1704189600999999999], pa.timestamp("ns", tz="UTC"))
            )  # 2024-01-02T10:00:00.999999999Z: truncated, not rounded up to the next second
        ),
    ): ts(2024, 1, 2, 10, 0, 0, 999999),
    FILES.add(
        "sensors/ts-paris.parquet",
        sensors_parquet(
            [sensor(sensor_id="paris", reading_ts=ts(2024, 7, 1, 12))],
            pa.schema(
                [
                    pa.field("reading_ts", pa.timestamp("ms", tz="Europe/Paris")) if f.name == "reading_ts" else f
                    for f in SENSOR_SCHEMA
                ]
            ),
        ),
    ): ts(2024, 7, 1, 12),
    FILES.add(
        "sensors/ts-naive-s.parquet",
        sensors_parquet(
            [sensor(sensor_id="seconds", reading_ts=dt.datetime(2024, 3, 31, 23, 59, 59))],
            pa.schema(
                [pa.field("reading_ts", pa.timestamp("s")) if f.name == "reading_ts" else f for f in SENSOR_SCHEMA]
            ),
        ),
    ): ts(2024, 3, 31, 23, 59, 59),
}


@pytest.mark.parametrize("src_path", PARQUET_TS)
def test_parquet_timestamps_are_stored_in_utc(lake, src_path):
    [row] = lake.rows("sensors", src_path)
    assert row["reading_ts"] == PARQUET_TS[src_path]
    assert row["reading_ts"].utcoffset() == dt.timedelta(0)


# ------------------------------------------------------------------------------------------
# Native values: JSON
# ------------------------------------------------------------------------------------------

JSON_CASES: dict[str, tuple[dict[str, object], Expect]] = {
    "number": ({"customer_id": 10}, Ok("customer_id", 10)),
    "numeric-string": ({"customer_id": "11"}, Ok("customer_id", 11)),
    "numeric-string-whitespace": ({"customer_id": " 13 "}, Ok("customer_id", 13)),
    "float-12.0": ({"customer_id": 12.0}, Ok("customer_id", 12)),
    "float-12.5": ({"customer_id": 12.5}, Rejected("TYPE_MISMATCH", "customer_id")),
    "int64-overflow": ({"customer_id": 2**63}, Rejected("TYPE_MISMATCH", "customer_id")),
    "text": ({"customer_id": "ten"}, Rejected("TYPE_MISMATCH", "customer_id")),
    "optional-null": ({"customer_id": None}, Ok("customer_id", None)),
    "optional-absent": ({"customer_id": ...}, Ok("customer_id", None)),
    "optional-whitespace-is-null": ({"customer_id": "  "}, Ok("customer_id", None)),
    "ts-offset": ({"event_ts": "2024-01-02T10:00:00-03:00"}, Ok("event_ts", ts(2024, 1, 2, 13))),
    "ts-no-offset": ({"event_ts": "2024-01-02T10:00:00"}, Ok("event_ts", ts(2024, 1, 2, 10))),
    "ts-not-iso": ({"event_ts": "2024/01/02 10:00:00"}, Rejected("TYPE_MISMATCH", "event_ts")),
    "ts-infinity": ({"event_ts": "infinity"}, Rejected("TYPE_MISMATCH", "event_ts")),
    "string-kept-exactly": ({"page_url": "  /a b "}, Ok("page_url", "  /a b ")),
    "properties-object-as-json-text": ({"properties": {"a": 1, "b": [1, 2], "c": {"d": "é"}}}, Ok("properties", ...)),
    "properties-absent": ({}, Ok("properties", None)),
}


def _event(n: int, over: dict[str, object]) -> dict[str, object]:
    rec = event(event_id=f"j{n}") | over
    return {k: v for k, v in rec.items() if v is not ...}


EVENTS_SRC = FILES.add(
    "events/values.jsonl", jsonl_text(_event(n, over) for n, (over, _) in enumerate(JSON_CASES.values(), 1))
)


@pytest.mark.parametrize("case", [c for c in JSON_CASES if not c.startswith("properties-object")])
def test_json_values(lake, case):
    check(lake, "events", EVENTS_SRC, list(JSON_CASES).index(case) + 1, JSON_CASES[case][1])


def test_json_properties_kept_as_json_text(lake):
    row_number = list(JSON_CASES).index("properties-object-as-json-text") + 1
    row = {r["src_row_number"]: r for r in lake.rows("events", EVENTS_SRC)}[row_number]
    assert isinstance(row["properties"], str)
    assert json.loads(row["properties"]) == {"a": 1, "b": [1, 2], "c": {"d": "é"}}
    assert row["_rescued_data"] is None


STORE_CASES: dict[str, tuple[dict[str, object], Expect]] = {
    "int32-from-string": ({"square_meters": "850"}, Ok("square_meters", 850)),
    "int32-overflow": ({"square_meters": 2**31}, Rejected("TYPE_MISMATCH", "square_meters")),
    "date-string": ({"opened_dt": "2021-12-31"}, Ok("opened_dt", dt.date(2021, 12, 31))),
    "date-feb-30": ({"opened_dt": "2021-02-30"}, Rejected("TYPE_MISMATCH", "opened_dt")),
    "date-not-iso": ({"opened_dt": "31/12/2021"}, Rejected("TYPE_MISMATCH", "opened_dt")),
}
STORES_SRC = FILES.add(
    "stores/values.json", json.dumps([store(store_id=n, **over) for n, (over, _) in enumerate(STORE_CASES.values(), 1)])
)


@pytest.mark.parametrize("case", STORE_CASES)
def test_json_array_values(lake, case):
    check(lake, "stores", STORES_SRC, list(STORE_CASES).index(case) + 1, STORE_CASES[case][1])


# ------------------------------------------------------------------------------------------
# Native values: XLSX
# ------------------------------------------------------------------------------------------

XLSX_CASES: dict[str, tuple[dict[str, object], Expect]] = {
    "native-int": ({"customer_id": 5}, Ok("customer_id", 5)),
    "native-float-6.0": ({"customer_id": 6.0}, Ok("customer_id", 6)),
    "native-float-7.5": ({"customer_id": 7.5}, Rejected("TYPE_MISMATCH", "customer_id")),
    "numeric-text": ({"customer_id": "8"}, Ok("customer_id", 8)),
    "native-datetime-midnight": ({"signup_dt": dt.datetime(2023, 5, 4)}, Ok("signup_dt", dt.date(2023, 5, 4))),
    "native-date": ({"signup_dt": dt.date(2022, 2, 28)}, Ok("signup_dt", dt.date(2022, 2, 28))),
    "text-date": ({"signup_dt": "2021-01-15"}, Ok("signup_dt", dt.date(2021, 1, 15))),
    "native-true": ({"is_active": True}, Ok("is_active", True)),
    "native-false": ({"is_active": False}, Ok("is_active", False)),
    "text-yes": ({"is_active": "Yes"}, Ok("is_active", True)),
    "text-maybe": ({"is_active": "maybe"}, Rejected("TYPE_MISMATCH", "is_active")),
    "empty-optional": ({"loyalty_tier": None}, Ok("loyalty_tier", None)),
    "string-kept-exactly": ({"first_name": " Ann "}, Ok("first_name", " Ann ")),
}
XLSX_SRC = FILES.add(
    "customers/values.xlsx",
    xlsx_bytes(
        [
            CUSTOMER_HEADER,
            *(customer_row(**({"customer_id": 1000 + n} | over)) for n, (over, _) in enumerate(XLSX_CASES.values(), 1)),
        ]
    ),
)


@pytest.mark.parametrize("case", XLSX_CASES)
def test_xlsx_values(lake, case):
    check(lake, "customers", XLSX_SRC, list(XLSX_CASES).index(case) + 1, XLSX_CASES[case][1])


# ------------------------------------------------------------------------------------------
# _rescued_data: undeclared fields, per record
# ------------------------------------------------------------------------------------------

RESCUE_CSV = FILES.add(
    "orders/rescue.csv",
    orders_csv(
        order(order_id=1, note="hello", channel=None),
        order(order_id=2, note=None, channel=None),
        order(order_id=3, note="5", channel="web, app"),
        columns=[*ORDER_COLUMNS, "note", "channel"],
    ),
)
RESCUE_JSON = FILES.add(
    "events/rescue.jsonl",
    jsonl_text(
        [
            event(event_id="r1", ab=1, flag=True, nested={"x": [1, 2]}, ratio=0.5),
            event(event_id="r2"),
            event(event_id="r3", extra=None),
            event(event_id="r4", extra=""),
            event(event_id="r5", extra="text", empty=None),
        ]
    ),
)
_rescue_schema = pa.schema([*SENSOR_SCHEMA, ("firmware", pa.int64()), ("label", pa.string())])
RESCUE_PARQUET = FILES.add(
    "sensors/rescue.parquet",
    parquet_bytes(
        pa.Table.from_pylist(
            [
                sensor(sensor_id="p1", firmware=7, label="a"),
                sensor(sensor_id="p2", firmware=None, label=None),
                sensor(sensor_id="p3", firmware=8, label=None),
            ],
            schema=_rescue_schema,
        )
    ),
)
RESCUE_XLSX = FILES.add(
    "customers/rescue.xlsx",
    xlsx_bytes(
        [
            [*CUSTOMER_HEADER, "note", "score"],
            [*customer_row(customer_id=1), "vip", 5],
            [*customer_row(customer_id=2), None, None],
            [*customer_row(customer_id=3), None, 2.5],
        ]
    ),
)
RESCUED = {
    # src_path: (table, {src_row_number: expected object or None})
    RESCUE_CSV: ("orders", {1: {"note": "hello"}, 2: None, 3: {"note": "5", "channel": "web, app"}}),
    RESCUE_JSON: (
        "events",
        {
            1: {"ab": 1, "flag": True, "nested": {"x": [1, 2]}, "ratio": 0.5},
            2: None,
            3: None,
            4: None,
            5: {"extra": "text"},
        },
    ),
    RESCUE_PARQUET: ("sensors", {1: {"firmware": 7, "label": "a"}, 2: None, 3: {"firmware": 8}}),
    RESCUE_XLSX: ("customers", {1: {"note": "vip", "score": "5"}, 2: None, 3: {"score": "2.5"}}),
}


@pytest.mark.parametrize("src_path", RESCUED)
def test_rescued_data_holds_undeclared_fields_as_read(lake, src_path):
    table, expected = RESCUED[src_path]
    rows = lake.rows(table, src_path)

    assert lake.rejects(table, src_path) == []
    got = {r["src_row_number"]: (None if r["_rescued_data"] is None else json.loads(r["_rescued_data"])) for r in rows}
    assert got == expected
    # Undeclared fields never become columns.
    assert not {"note", "channel", "ab", "extra", "firmware", "label", "score"} & set(rows[0])


def test_rescued_values_keep_their_json_types(lake):
    """Typed from JSON and Parquet, strings from CSV and XLSX: compare the types, not only values."""
    csv_row = {r["src_row_number"]: r for r in lake.rows("orders", RESCUE_CSV)}[3]
    assert json.loads(csv_row["_rescued_data"])["note"] == "5"
    xlsx_row = {r["src_row_number"]: r for r in lake.rows("customers", RESCUE_XLSX)}[1]
    assert isinstance(json.loads(xlsx_row["_rescued_data"])["score"], str)
    parquet_row = {r["src_row_number"]: r for r in lake.rows("sensors", RESCUE_PARQUET)}[1]
    assert isinstance(json.loads(parquet_row["_rescued_data"])["firmware"], int)
    json_row = {r["src_row_number"]: r for r in lake.rows("events", RESCUE_JSON)}[1]
    assert json.loads(json_row["_rescued_data"])["flag"] is True


NON_FINITE_PARQUET = FILES.add(
    "sensors/non_finite.parquet",
    sensors_parquet(
        [
            sensor(sensor_id="f1", temperature_c=math.nan, gain=math.nan),
            sensor(sensor_id="f2", battery_v=-math.inf, gain=math.inf),
            sensor(sensor_id="f3", humidity_pct=math.nan, gain=-math.inf),  # humidity NaN is outside 0-100
            sensor(sensor_id="f4", gain=1.5),
        ],
        pa.schema([*SENSOR_SCHEMA, pa.field("gain", pa.float64())]),
    ),
)


def _strict_json(text: str) -> Any:
    """json.loads as a standard JSON parser reads: NaN and Infinity are not JSON."""

    def refuse(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_floats_are_kept_and_written_as_json_strings_in_json_text(lake):
    """A Parquet float's NaN or infinity is a native value: kept in its declared column, and
    written as the string "NaN", "Infinity" or "-Infinity" where the row becomes JSON (the
    rescued fields, a reject's raw_record), so that the JSON stays JSON."""
    rows = {r["sensor_id"]: r for r in lake.rows("sensors", NON_FINITE_PARQUET)}
    assert sorted(rows) == ["f1", "f2", "f4"]
    assert math.isnan(rows["f1"]["temperature_c"]) and rows["f2"]["battery_v"] == -math.inf
    assert {k: _strict_json(r["_rescued_data"]) for k, r in rows.items()} == {
        "f1": {"gain": "NaN"},
        "f2": {"gain": "Infinity"},
        "f4": {"gain": 1.5},
    }
    [reject] = lake.rejects("sensors", NON_FINITE_PARQUET)
    assert reject["reason_code"] == "CONSTRAINT_VIOLATION"
    raw = _strict_json(reject["raw_record"])
    assert (raw["sensor_id"], raw["humidity_pct"], raw["gain"], raw["temperature_c"]) == ("f3", "NaN", "-Infinity", 21.5)


def test_every_source_of_the_shared_lake_was_ingested(lake):
    """Guards the shared lake itself: no case became a duplicate or an unmatched file."""
    assert sorted(lake.outcomes) == sorted(FILES)
    assert not lake.result.unmatched
    assert {o.status for o in lake.result.outcomes} == {"success"}
