"""Reading every format and rejecting with every reason code (CONTRACT sections 3, 5 and 11).

Most cases are sources of one shared lake, ingested once for the module (``FILES``); each test
looks at its own source. Tests about a whole run (exit codes, discovery) get a lake of their own.
"""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from bronze_assets_tests.conftest import (
    CUSTOMER_HEADER,
    ORDER_COLUMNS,
    SENSOR_SCHEMA,
    LakeRun,
    RawFiles,
    assert_accounted,
    customer_row,
    event,
    gz,
    jsonl_text,
    order,
    orders_csv,
    product,
    products_csv,
    reasons_by_row,
    sensor,
    sensors_parquet,
    shared_lake,
    store,
    xlsx_bytes,
)

FILES = RawFiles()


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LakeRun:
    return shared_lake(tmp_path_factory, "formats", FILES)


def line(**overrides: object) -> str:
    """One orders CSV record (no terminator) in ORDER_COLUMNS order."""
    rec = order(**overrides)
    return ",".join("" if rec[c] is None else str(rec[c]) for c in ORDER_COLUMNS)


HEADER = ",".join(ORDER_COLUMNS)


def orders_doc(*lines: str) -> str:
    return "\n".join([HEADER, *lines]) + "\n"


def without(record: dict[str, object], key: str) -> dict[str, object]:
    return {k: v for k, v in record.items() if k != key}


# ------------------------------------------------------------------------------------------
# UNREADABLE_FILE: one reject row for the file, status 'rejected', nothing written
# ------------------------------------------------------------------------------------------

_orders_200 = gz(orders_csv(*(order(order_id=i) for i in range(1, 200))))
_events_200 = gz(jsonl_text(event(event_id=f"e{i}") for i in range(1, 200)))
_stores_200 = gz(json.dumps([store(store_id=i) for i in range(1, 200)]))
UNREADABLE = [
    FILES.add("sensors/corrupt.parquet", b"PAR1" + b"\x00garbage, not a parquet file" * 4 + b"PAR1"),
    FILES.add("sensors/truncated.parquet", sensors_parquet([sensor(sensor_id="cut")])[:-30]),
    FILES.add("customers/text.xlsx", "customer_id,email\n1,a@example.com\n"),
    FILES.add("customers/zip-but-no-workbook.xlsx", gz("no workbook in here")),
    FILES.add("orders/truncated.csv.gz", _orders_200[: len(_orders_200) // 2]),
    FILES.add("events/truncated.jsonl.gz", _events_200[: len(_events_200) // 2]),
    FILES.add("events/plain-text.ndjson.gz", jsonl_text([event(event_id="plain")])),
    FILES.add("stores/truncated.json.gz", _stores_200[: len(_stores_200) // 2]),
]


@pytest.mark.parametrize("src_path", UNREADABLE)
def test_unreadable_file_is_one_reject_and_status_rejected(lake, src_path):
    table = src_path.split("/")[0]

    o = lake.outcome(src_path)
    assert (o.status, o.rows, o.rejects) == ("rejected", 0, Counter({"UNREADABLE_FILE": 1}))
    rejects = lake.rejects(table, src_path)
    assert [r["reason_code"] for r in rejects] == ["UNREADABLE_FILE"]
    assert rejects[0]["reason_detail"]
    assert lake.rows(table, src_path) == []
    m = lake.manifest_rows()[src_path]
    assert (m["status"], m["row_count"], m["reject_count"]) == ("rejected", 0, 1)


def test_unreadable_file_does_not_stop_the_other_sources(lake_run):
    lr = lake_run({"sensors/bad.parquet": b"not parquet at all", "sensors/good.parquet": sensors_parquet([sensor()])})

    assert lr.outcome("sensors/bad.parquet").status == "rejected"
    good = lr.outcome("sensors/good.parquet")
    assert (good.status, good.rows, good.reject_count) == ("success", 1, 0)
    assert [r["src_filename"] for r in lr.rows("sensors")] == ["sensors/good.parquet"]
    assert lr.result.exit_code == 1


# ------------------------------------------------------------------------------------------
# SCHEMA_MISMATCH: a required column absent from the whole file
# ------------------------------------------------------------------------------------------

_no_customer_cols = [c for c in ORDER_COLUMNS if c != "customer_id"]
_customers_no_email = [
    [v for c, v in zip(CUSTOMER_HEADER, customer_row(customer_id=i), strict=True) if c != "email"] for i in (1, 2)
]
SCHEMA_MISMATCH = [
    # (src_path, records, missing column). The CSV's third record also has the wrong number of
    # fields: SCHEMA_MISMATCH comes first.
    (
        FILES.add(
            "orders/no_customer.csv",
            "\n".join(
                [",".join(_no_customer_cols), *(line(order_id=i).replace(",10,", ",", 1) for i in (1, 2)), "3,3,4"]
            )
            + "\n",
        ),
        3,
        "customer_id",
    ),
    (
        FILES.add(
            "customers/no_email.xlsx", xlsx_bytes([[c for c in CUSTOMER_HEADER if c != "email"], *_customers_no_email])
        ),
        2,
        "email",
    ),
    (
        FILES.add(
            "sensors/no_sensor_id.parquet",
            sensors_parquet(
                [without(sensor(store_id=i), "sensor_id") for i in (1, 2, 3, 4)],
                pa.schema([f for f in SENSOR_SCHEMA if f.name != "sensor_id"]),
            ),
        ),
        4,
        "sensor_id",
    ),
    (
        FILES.add(
            "events/no_session.jsonl", jsonl_text(without(event(event_id=f"ns{i}"), "session_id") for i in (1, 2))
        ),
        2,
        "session_id",
    ),
    (
        FILES.add("stores/no_name.json", json.dumps([without(store(store_id=i), "store_name") for i in (1, 2, 3)])),
        3,
        "store_name",
    ),
]


@pytest.mark.parametrize(("src_path", "records", "column"), SCHEMA_MISMATCH)
def test_schema_mismatch_rejects_every_record(lake, src_path, records, column):
    table = src_path.split("/")[0]

    o = lake.outcome(src_path)
    assert (o.status, o.rows, o.rejects) == ("rejected", 0, Counter({"SCHEMA_MISMATCH": records}))
    rejects = lake.rejects(table, src_path)
    assert [r["src_row_number"] for r in rejects] == list(range(1, records + 1))
    assert {r["reason_code"] for r in rejects} == {"SCHEMA_MISMATCH"}
    assert all(column in r["reason_detail"] for r in rejects)
    assert all(r["raw_record"] for r in rejects)
    assert lake.rows(table, src_path) == []
    m = lake.manifest_rows()[src_path]
    assert (m["status"], m["row_count"], m["reject_count"]) == ("rejected", 0, records)


_partial = [event(event_id="p1"), without(event(event_id="p2"), "session_id"), event(event_id="p3")]
PARTIAL_KEYS = [
    FILES.add("events/partial.jsonl", jsonl_text(_partial)),
    FILES.add("events/partial.json", json.dumps(_partial)),
]


@pytest.mark.parametrize("src_path", PARTIAL_KEYS)
def test_key_missing_from_some_records_is_missing_required(lake, src_path):
    o = lake.outcome(src_path)
    assert (o.status, o.rows, o.rejects) == ("success", 2, Counter({"MISSING_REQUIRED": 1}))
    [reject] = lake.rejects("events", src_path)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "MISSING_REQUIRED")
    assert "session_id" in reject["reason_detail"]
    assert [r["event_id"] for r in lake.rows("events", src_path)] == ["p1", "p3"]


# ------------------------------------------------------------------------------------------
# MALFORMED_RECORD
# ------------------------------------------------------------------------------------------

CSV_MALFORMED = {
    "too-few-fields": "1,2,3",
    "too-many-fields": line(order_id=9) + ",extra",
    "text-after-closing-quote": line(order_id=9, payment_method='"card"x'),
    "quote-inside-quoted-field": line(order_id=9, payment_method='"ca"rd"x'),
}
# One file: a valid record, the bad ones (record k + 2 for the k-th case), a valid record.
CSV_MALFORMED_SRC = FILES.add(
    "orders/malformed.csv", orders_doc(line(order_id=1), *CSV_MALFORMED.values(), line(order_id=2))
)


@pytest.mark.parametrize("case", CSV_MALFORMED)
def test_csv_malformed_record(lake, case):
    row = list(CSV_MALFORMED).index(case) + 2

    reject = {r["src_row_number"]: r for r in lake.rejects("orders", CSV_MALFORMED_SRC)}[row]
    assert reject["reason_code"] == "MALFORMED_RECORD"
    assert reject["raw_record"] == CSV_MALFORMED[case]
    assert [(r["order_id"], r["src_row_number"]) for r in lake.rows("orders", CSV_MALFORMED_SRC)] == [
        (1, 1),
        (2, len(CSV_MALFORMED) + 2),
    ]
    assert_accounted(lake, CSV_MALFORMED_SRC, len(CSV_MALFORMED) + 2)


_unclosed_rest = [line(order_id=2, payment_method='"never closed'), line(order_id=3), line(order_id=4)]
UNCLOSED = FILES.add("orders/unclosed.csv", orders_doc(line(order_id=1), *_unclosed_rest))


def test_csv_unclosed_quote_makes_the_rest_of_the_file_one_record(lake):
    [reject] = lake.rejects("orders", UNCLOSED)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "MALFORMED_RECORD")
    assert reject["raw_record"].rstrip("\n") == "\n".join(_unclosed_rest)
    assert [r["order_id"] for r in lake.rows("orders", UNCLOSED)] == [1]
    assert_accounted(lake, UNCLOSED, 2)


BAD_UTF8_CSV = FILES.add(
    "orders/bad-utf8.csv",
    b"\n".join(
        [
            HEADER.encode(),
            line(order_id=1).encode(),
            line(order_id=2, payment_method="ca\udcffrd").encode("utf-8", "surrogateescape"),
            line(order_id=3, payment_method="carte bleue é").encode(),
        ]
    )
    + b"\n",
)


def test_csv_invalid_utf8_is_malformed_with_escapes_in_raw_record(lake):
    [reject] = lake.rejects("orders", BAD_UTF8_CSV)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "MALFORMED_RECORD")
    assert reject["raw_record"] == line(order_id=2, payment_method="ca\\xffrd")
    rows = lake.rows("orders", BAD_UTF8_CSV)
    assert [(r["order_id"], r["payment_method"]) for r in rows] == [(1, "card"), (3, "carte bleue é")]
    assert_accounted(lake, BAD_UTF8_CSV, 3)


JSONL_MALFORMED = {
    # id: (line, expected raw_record: compact JSON text when it parses, else the line as read)
    "array": ("[1, 2]", "[1,2]"),
    "string": ('"just a string"', '"just a string"'),
    "number": ("42", "42"),
    "null": ("null", "null"),
    "truncated-json": ('{"event_id": "e2", "event_ts": ', '{"event_id": "e2", "event_ts": '),
    "not-json": ("not json at all", "not json at all"),
    "indented-array": ("\t [3, 4]", "[3,4]"),
}
JSONL_MALFORMED_SRC = FILES.add(
    "events/malformed.jsonl",
    "\n".join(
        [
            json.dumps(event(event_id="first")),
            *(bad for bad, _ in JSONL_MALFORMED.values()),
            json.dumps(event(event_id="last")),
        ]
    )
    + "\n",
)


@pytest.mark.parametrize("case", JSONL_MALFORMED)
def test_jsonl_line_not_an_object_is_malformed(lake, case):
    row = list(JSONL_MALFORMED).index(case) + 2

    reject = {r["src_row_number"]: r for r in lake.rejects("events", JSONL_MALFORMED_SRC)}[row]
    assert reject["reason_code"] == "MALFORMED_RECORD"
    assert reject["raw_record"] == JSONL_MALFORMED[case][1]
    assert [r["event_id"] for r in lake.rows("events", JSONL_MALFORMED_SRC)] == ["first", "last"]
    assert_accounted(lake, JSONL_MALFORMED_SRC, len(JSONL_MALFORMED) + 2)


INDENTED_JSONL = FILES.add(
    "events/indented.jsonl", "  " + json.dumps(event(event_id="i1")) + "\n\t" + json.dumps(event(event_id="i2")) + "\n"
)


def test_jsonl_object_after_leading_whitespace_loads(lake):
    # Whether a line is an object is read from its first character; whitespace before it is parsed.
    assert [r["event_id"] for r in lake.rows("events", INDENTED_JSONL)] == ["i1", "i2"]
    assert_accounted(lake, INDENTED_JSONL, 2)


BAD_UTF8_JSONL = FILES.add(
    "events/bad-utf8.jsonl",
    b"\n".join(
        [
            json.dumps(event(event_id="u1")).encode(),
            b'{"event_id": "u2", "page_url": "/\xfe"}',
            json.dumps(event(event_id="u3")).encode(),
        ]
    )
    + b"\n",
)


def test_jsonl_invalid_utf8_is_malformed_with_escapes(lake):
    [reject] = lake.rejects("events", BAD_UTF8_JSONL)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "MALFORMED_RECORD")
    assert "\\xfe" in reject["raw_record"]
    assert [r["event_id"] for r in lake.rows("events", BAD_UTF8_JSONL)] == ["u1", "u3"]
    assert_accounted(lake, BAD_UTF8_JSONL, 3)


JSON_MALFORMED = {
    "number": (42, "42"),
    "string": ("a store", '"a store"'),
    "array": ([1, 2], "[1,2]"),
    "null": (None, "null"),
}
JSON_MALFORMED_SRC = FILES.add(
    "stores/malformed.json",
    json.dumps(
        [store(store_id=101), *(element for element, _ in JSON_MALFORMED.values()), store(store_id=102)], indent=2
    ),
)


@pytest.mark.parametrize("case", JSON_MALFORMED)
def test_json_array_element_not_an_object_is_malformed(lake, case):
    row = list(JSON_MALFORMED).index(case) + 2

    reject = {r["src_row_number"]: r for r in lake.rejects("stores", JSON_MALFORMED_SRC)}[row]
    assert reject["reason_code"] == "MALFORMED_RECORD"
    assert reject["raw_record"] == JSON_MALFORMED[case][1]
    assert [r["store_id"] for r in lake.rows("stores", JSON_MALFORMED_SRC)] == [101, 102]
    assert_accounted(lake, JSON_MALFORMED_SRC, len(JSON_MALFORMED) + 2)


COMPACT = FILES.add(
    "stores/indented.json", json.dumps([store(store_id=7), {"store_id": None, "store_name": "No id"}], indent=4)
)


def test_json_array_raw_record_is_compact_json(lake):
    [reject] = lake.rejects("stores", COMPACT)
    assert reject["reason_code"] == "MISSING_REQUIRED"
    assert reject["raw_record"] == '{"store_id":null,"store_name":"No id"}'


# ------------------------------------------------------------------------------------------
# MISSING_REQUIRED, TYPE_MISMATCH and CONSTRAINT_VIOLATION in every format
# ------------------------------------------------------------------------------------------

CSV_MISSING = {"empty-field": '""', "unquoted-empty": "", "spaces": "   ", "tab": "\t", "quoted-spaces": '"  "'}
CSV_MISSING_SRC = FILES.add(
    "orders/missing.csv",
    orders_doc(
        line(order_id=1),
        *(line(order_id=n + 2, currency=v) for n, v in enumerate(CSV_MISSING.values())),
        line(order_id=99),
    ),
)


@pytest.mark.parametrize("case", CSV_MISSING)
def test_csv_missing_required(lake, case):
    row = list(CSV_MISSING).index(case) + 2

    reject = {r["src_row_number"]: r for r in lake.rejects("orders", CSV_MISSING_SRC)}[row]
    assert reject["reason_code"] == "MISSING_REQUIRED"
    assert "currency" in reject["reason_detail"]
    assert [r["order_id"] for r in lake.rows("orders", CSV_MISSING_SRC)] == [1, 99]
    assert_accounted(lake, CSV_MISSING_SRC, len(CSV_MISSING) + 2)


JSON_MISSING = {"null": None, "empty": "", "whitespace": "  "}
JSON_MISSING_SRC = FILES.add(
    "events/missing.jsonl",
    jsonl_text([event(event_id="m1"), *(event(event_id=f"m-{k}", event_type=v) for k, v in JSON_MISSING.items())]),
)


@pytest.mark.parametrize("case", JSON_MISSING)
def test_json_missing_required(lake, case):
    row = list(JSON_MISSING).index(case) + 2

    reject = {r["src_row_number"]: r for r in lake.rejects("events", JSON_MISSING_SRC)}[row]
    assert reject["reason_code"] == "MISSING_REQUIRED"
    assert "event_type" in reject["reason_detail"]
    assert [r["event_id"] for r in lake.rows("events", JSON_MISSING_SRC)] == ["m1"]
    assert_accounted(lake, JSON_MISSING_SRC, len(JSON_MISSING) + 1)


PARQUET_MIXED = FILES.add(
    "sensors/mixed.parquet",
    sensors_parquet(
        [
            sensor(store_id="1", sensor_id="ok"),
            sensor(store_id="1", sensor_id=None),
            sensor(store_id="x1", sensor_id="bad-store"),
            sensor(store_id="1", sensor_id="wet", humidity_pct=120.0),
            sensor(store_id="1", sensor_id="dry", humidity_pct=-0.5),
            sensor(store_id="1", sensor_id="edge", humidity_pct=100.0),
            sensor(store_id=None, sensor_id="no-store"),
        ],
        pa.schema([*(f for f in SENSOR_SCHEMA if f.name != "store_id"), ("store_id", pa.string())]),
    ),
)


def test_parquet_missing_required_type_mismatch_and_constraint(lake):
    rejects = lake.rejects("sensors", PARQUET_MIXED)
    assert reasons_by_row(rejects) == {
        2: "MISSING_REQUIRED",
        3: "TYPE_MISMATCH",
        4: "CONSTRAINT_VIOLATION",
        5: "CONSTRAINT_VIOLATION",
        7: "MISSING_REQUIRED",
    }
    by_row = {r["src_row_number"]: r for r in rejects}
    assert "sensor_id" in by_row[2]["reason_detail"]
    assert "store_id" in by_row[3]["reason_detail"] and "x1" in by_row[3]["reason_detail"]
    assert "humidity_pct" in by_row[4]["reason_detail"] and "120" in by_row[4]["reason_detail"]
    assert "store_id" in by_row[7]["reason_detail"]
    # raw_record of a Parquet row: its values as JSON.
    assert json.loads(by_row[3]["raw_record"])["store_id"] == "x1"
    assert [r["sensor_id"] for r in lake.rows("sensors", PARQUET_MIXED)] == ["ok", "edge"]
    assert_accounted(lake, PARQUET_MIXED, 7)


XLSX_MIXED = FILES.add(
    "customers/mixed.xlsx",
    xlsx_bytes(
        [
            CUSTOMER_HEADER,
            customer_row(customer_id=1),
            customer_row(customer_id=2, email=None),
            customer_row(customer_id=3, email="   "),
            customer_row(customer_id="abc"),
            customer_row(customer_id=5, is_active="maybe"),
            customer_row(customer_id=6, signup_dt="2024-13-01"),
        ]
    ),
)


def test_xlsx_missing_required_and_type_mismatch(lake):
    rejects = lake.rejects("customers", XLSX_MIXED)
    assert reasons_by_row(rejects) == {
        2: "MISSING_REQUIRED",
        3: "MISSING_REQUIRED",
        4: "TYPE_MISMATCH",
        5: "TYPE_MISMATCH",
        6: "TYPE_MISMATCH",
    }
    by_row = {r["src_row_number"]: r for r in rejects}
    assert "email" in by_row[2]["reason_detail"]
    assert "customer_id" in by_row[4]["reason_detail"] and "abc" in by_row[4]["reason_detail"]
    assert "is_active" in by_row[5]["reason_detail"] and "maybe" in by_row[5]["reason_detail"]
    assert "signup_dt" in by_row[6]["reason_detail"] and "2024-13-01" in by_row[6]["reason_detail"]
    # raw_record of an XLSX row: its values as JSON, keyed by the header.
    assert json.loads(by_row[4]["raw_record"])["customer_id"] == "abc"
    assert [r["customer_id"] for r in lake.rows("customers", XLSX_MIXED)] == [1]
    assert_accounted(lake, XLSX_MIXED, 6)


CSV_CONSTRAINTS: dict[str, tuple[dict[str, object], str, str]] = {
    # id: (overrides, column, offending value as written)
    "quantity-0": ({"quantity": 0}, "quantity", "0"),
    "quantity-negative": ({"quantity": -3}, "quantity", "-3"),
    "status-lower-case": ({"status": "paid"}, "status", "paid"),
    "status-unknown": ({"status": "REFUNDED"}, "status", "REFUNDED"),
    "discount-150": ({"discount_pct": "150"}, "discount_pct", "150"),
    "discount-negative": ({"discount_pct": "-1"}, "discount_pct", "-1"),
    "price-negative": ({"unit_price": "-0.01"}, "unit_price", "-0.01"),
}
CSV_CONSTRAINTS_SRC = FILES.add(
    "orders/constraints.csv",
    orders_csv(
        order(order_id=1), *(order(order_id=n + 2, **over) for n, (over, _, _) in enumerate(CSV_CONSTRAINTS.values()))
    ),
)


@pytest.mark.parametrize("case", CSV_CONSTRAINTS)
def test_csv_constraint_violation(lake, case):
    row = list(CSV_CONSTRAINTS).index(case) + 2
    _, column, value = CSV_CONSTRAINTS[case]

    reject = {r["src_row_number"]: r for r in lake.rejects("orders", CSV_CONSTRAINTS_SRC)}[row]
    assert reject["reason_code"] == "CONSTRAINT_VIOLATION"
    assert column in reject["reason_detail"] and value in reject["reason_detail"]
    assert [r["order_id"] for r in lake.rows("orders", CSV_CONSTRAINTS_SRC)] == [1]
    assert_accounted(lake, CSV_CONSTRAINTS_SRC, len(CSV_CONSTRAINTS) + 1)


def test_constraint_bounds_are_inclusive_where_declared(lake_run):
    lr = lake_run(
        {
            "orders/edges.csv": orders_csv(
                order(order_id=1, discount_pct="0"),
                order(order_id=2, discount_pct="100.00"),
                order(order_id=3, quantity=1),
            ),
            "products/edges.csv": products_csv(
                product(product_id=1, unit_price="0"), product(product_id=2, unit_price="-5")
            ),
        }
    )
    assert [(r["order_id"], str(r["discount_pct"])) for r in lr.rows("orders")] == [
        (1, "0.00"),
        (2, "100.00"),
        (3, "5.00"),
    ]
    assert [(r["product_id"], str(r["unit_price"])) for r in lr.rows("products")] == [(1, "0.00")]
    [reject] = lr.rejects("products")
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "CONSTRAINT_VIOLATION")
    assert "unit_price" in reject["reason_detail"] and "-5" in reject["reason_detail"]


CSV_TYPES: dict[str, tuple[dict[str, object], str, str]] = {
    "int": ({"quantity": "abc"}, "quantity", "abc"),
    "date": ({"order_dt": "02/01/2024"}, "order_dt", "02/01/2024"),
    "timestamp": ({"order_ts": "yesterday"}, "order_ts", "yesterday"),
    "decimal-comma": ({"unit_price": "9,99"}, "unit_price", "9,99"),
}
CSV_TYPES_SRC = FILES.add(
    "orders/types.csv",
    orders_csv(
        order(order_id=1), *(order(order_id=n + 2, **over) for n, (over, _, _) in enumerate(CSV_TYPES.values()))
    ),
)


@pytest.mark.parametrize("case", CSV_TYPES)
def test_csv_type_mismatch(lake, case):
    row = list(CSV_TYPES).index(case) + 2
    _, column, value = CSV_TYPES[case]

    reject = {r["src_row_number"]: r for r in lake.rejects("orders", CSV_TYPES_SRC)}[row]
    assert reject["reason_code"] == "TYPE_MISMATCH"
    assert column in reject["reason_detail"] and value in reject["reason_detail"]
    assert [r["order_id"] for r in lake.rows("orders", CSV_TYPES_SRC)] == [1]
    assert_accounted(lake, CSV_TYPES_SRC, len(CSV_TYPES) + 1)


JSON_TYPES = FILES.add(
    "stores/types.json",
    json.dumps(
        [
            store(store_id=1),
            store(store_id="two"),
            store(store_id=3, opened_dt="2020-02-30"),
            store(store_id=4, square_meters=12.5),
        ]
    ),
)


def test_json_type_mismatch(lake):
    rejects = lake.rejects("stores", JSON_TYPES)
    assert reasons_by_row(rejects) == {2: "TYPE_MISMATCH", 3: "TYPE_MISMATCH", 4: "TYPE_MISMATCH"}
    by_row = {r["src_row_number"]: r for r in rejects}
    assert "store_id" in by_row[2]["reason_detail"] and "two" in by_row[2]["reason_detail"]
    assert "opened_dt" in by_row[3]["reason_detail"] and "2020-02-30" in by_row[3]["reason_detail"]
    assert "square_meters" in by_row[4]["reason_detail"] and "12.5" in by_row[4]["reason_detail"]
    assert [r["store_id"] for r in lake.rows("stores", JSON_TYPES)] == [1]


# ------------------------------------------------------------------------------------------
# Reason precedence: the first reason in the contract's order wins
# ------------------------------------------------------------------------------------------

PRECEDENCE: dict[str, tuple[dict[str, object], str, str]] = {
    # id: (record overrides, expected reason, column named in reason_detail)
    "missing-before-type": ({"customer_id": "", "quantity": "abc"}, "MISSING_REQUIRED", "customer_id"),
    "whitespace-missing-before-type": ({"customer_id": " ", "order_dt": "never"}, "MISSING_REQUIRED", "customer_id"),
    "type-before-constraint": ({"quantity": "abc", "status": "paid"}, "TYPE_MISMATCH", "quantity"),
    "missing-before-constraint": ({"currency": "", "status": "paid"}, "MISSING_REQUIRED", "currency"),
}
PRECEDENCE_SRC = FILES.add(
    "orders/precedence.csv",
    orders_doc(
        *(line(order_id=n + 1, **over) for n, (over, _, _) in enumerate(PRECEDENCE.values())),
        line(order_id=99, customer_id="") + ",extra",  # malformed before missing
    ),
)


@pytest.mark.parametrize("case", PRECEDENCE)
def test_first_reason_in_contract_order_wins(lake, case):
    row = list(PRECEDENCE).index(case) + 1
    _, reason, column = PRECEDENCE[case]

    reject = {r["src_row_number"]: r for r in lake.rejects("orders", PRECEDENCE_SRC)}[row]
    assert reject["reason_code"] == reason
    assert column in reject["reason_detail"]


def test_malformed_before_missing_required(lake):
    rejects = reasons_by_row(lake.rejects("orders", PRECEDENCE_SRC))
    assert rejects[len(PRECEDENCE) + 1] == "MALFORMED_RECORD"
    assert lake.outcome(PRECEDENCE_SRC).rejects == Counter(
        {"MISSING_REQUIRED": 3, "TYPE_MISMATCH": 1, "MALFORMED_RECORD": 1}
    )


def test_every_reason_of_one_csv_source_is_accounted(lake_run):
    doc = orders_doc(
        line(order_id=1),
        "1,2",
        line(order_id=3, customer_id=""),
        line(order_id=4, quantity="x"),
        line(order_id=5, status="paid"),
        line(order_id=6),
    )
    lr = lake_run({"orders/a.csv": doc})

    o = lr.outcome("orders/a.csv")
    assert o.status == "success"
    assert o.rejects == Counter(
        {"MALFORMED_RECORD": 1, "MISSING_REQUIRED": 1, "TYPE_MISMATCH": 1, "CONSTRAINT_VIOLATION": 1}
    )
    assert reasons_by_row(lr.rejects("orders")) == {
        2: "MALFORMED_RECORD",
        3: "MISSING_REQUIRED",
        4: "TYPE_MISMATCH",
        5: "CONSTRAINT_VIOLATION",
    }
    assert [r["order_id"] for r in lr.rows("orders")] == [1, 6]
    assert_accounted(lr, "orders/a.csv", 6)
    m = lr.manifest_rows()["orders/a.csv"]
    assert (m["status"], m["row_count"], m["reject_count"]) == ("success", 2, 4)
    assert lr.result.exit_code == 1


# ------------------------------------------------------------------------------------------
# src_row_number counts records
# ------------------------------------------------------------------------------------------

MULTILINE = FILES.add(
    "orders/multiline.csv",
    orders_doc(
        line(order_id=1),
        line(order_id=2, payment_method='"two\nline"'),
        line(order_id=3, payment_method='"three\n\nlines"'),
        line(order_id=4, quantity="0"),
    ),
)


def test_csv_row_number_counts_records_not_lines(lake):
    rows = lake.rows("orders", MULTILINE)
    assert [(r["order_id"], r["src_row_number"]) for r in rows] == [(1, 1), (2, 2), (3, 3)]
    assert reasons_by_row(lake.rejects("orders", MULTILINE)) == {4: "CONSTRAINT_VIOLATION"}


BLANK_JSONL = FILES.add(
    "events/blank-lines.jsonl",
    "\n".join(["", json.dumps(event(event_id="b1")), "", "   ", json.dumps(event(event_id="b2")), "\t", "[1]", ""]),
)
BLANK_CSV = FILES.add("orders/blank-lines.csv", HEADER + "\n" + line(order_id=1) + "\n\n" + line(order_id=2) + "\n")


def test_jsonl_blank_lines_are_not_records(lake):
    rows = lake.rows("events", BLANK_JSONL)
    assert [(r["event_id"], r["src_row_number"]) for r in rows] == [("b1", 1), ("b2", 2)]
    assert reasons_by_row(lake.rejects("events", BLANK_JSONL)) == {3: "MALFORMED_RECORD"}
    assert_accounted(lake, BLANK_JSONL, 3)


def test_csv_blank_lines_between_records(lake):
    rows = lake.rows("orders", BLANK_CSV)
    assert [(r["order_id"], r["src_row_number"]) for r in rows] == [(1, 1), (2, 2)]
    assert_accounted(lake, BLANK_CSV, 2)


NUMBERED_XLSX = FILES.add(
    "customers/numbered.xlsx", xlsx_bytes([CUSTOMER_HEADER, customer_row(customer_id=7), customer_row(customer_id=8)])
)
NUMBERED_PARQUET = FILES.add(
    "sensors/numbered.parquet", sensors_parquet([sensor(sensor_id="x"), sensor(sensor_id="y")])
)


def test_xlsx_and_parquet_row_numbers_start_at_one(lake):
    assert [(r["customer_id"], r["src_row_number"]) for r in lake.rows("customers", NUMBERED_XLSX)] == [(7, 1), (8, 2)]
    assert [(r["sensor_id"], r["src_row_number"]) for r in lake.rows("sensors", NUMBERED_PARQUET)] == [
        ("x", 1),
        ("y", 2),
    ]


# ------------------------------------------------------------------------------------------
# Compressed sources and alternative extensions
# ------------------------------------------------------------------------------------------

COMPRESSED: dict[str, tuple[str, str, list[object]]] = {
    # src_path: (table, key column, expected keys)
    FILES.add("orders/gz.csv.gz", gz(orders_csv(order(order_id=501), order(order_id=502)))): (
        "orders",
        "order_id",
        [501, 502],
    ),
    FILES.add("events/gz.jsonl.gz", gz(jsonl_text([event(event_id="g1"), event(event_id="g2")]))): (
        "events",
        "event_id",
        ["g1", "g2"],
    ),
    FILES.add("events/gz.ndjson.gz", gz(jsonl_text([event(event_id="n1")]))): ("events", "event_id", ["n1"]),
    FILES.add("events/plain.ndjson", jsonl_text([event(event_id="n2")])): ("events", "event_id", ["n2"]),
    FILES.add("stores/gz.json.gz", gz(json.dumps([store(store_id=55), store(store_id=56)]))): (
        "stores",
        "store_id",
        [55, 56],
    ),
}


@pytest.mark.parametrize("src_path", COMPRESSED)
def test_compressed_and_alternative_extensions_are_read(lake, src_path):
    table, key, expected = COMPRESSED[src_path]

    o = lake.outcome(src_path)
    assert (o.status, o.rows, o.reject_count) == ("success", len(expected), 0)
    assert [r[key] for r in lake.rows(table, src_path)] == expected
    assert lake.manifest_rows()[src_path]["status"] == "success"


_gz_doc = orders_csv(order(order_id=601), order(order_id=602, quantity="0"))
GZ_REJECT = FILES.add("orders/gz-reject.csv.gz", gz(_gz_doc))


def test_gzip_reject_raw_record_and_row_numbers(lake):
    [reject] = lake.rejects("orders", GZ_REJECT)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "CONSTRAINT_VIOLATION")
    assert reject["raw_record"] == _gz_doc.splitlines()[2]


# ------------------------------------------------------------------------------------------
# Discovery: files in raw/, ignored names, unmatched files
# ------------------------------------------------------------------------------------------


def test_files_directly_in_raw_are_matched_by_name_prefix(lake_run):
    lr = lake_run(
        {
            "orders_2024-01-02.csv": orders_csv(order(order_id=1)),
            "orders-late.csv": orders_csv(order(order_id=2)),
            "orders.csv": orders_csv(order(order_id=3)),
            "events.jsonl": jsonl_text([event(event_id="e1")]),
            "customers.xlsx": xlsx_bytes([CUSTOMER_HEADER, customer_row(customer_id=4)]),
            "stores_all.json": json.dumps([store(store_id=9)]),
            "sensors.parquet": sensors_parquet([sensor(sensor_id="r")]),
            "ordersx.csv": orders_csv(order(order_id=99)),
        }
    )

    assert {o.src_path: o.table for o in lr.result.outcomes} == {
        "customers.xlsx": "customers",
        "events.jsonl": "events",
        "orders-late.csv": "orders",
        "orders.csv": "orders",
        "orders_2024-01-02.csv": "orders",
        "sensors.parquet": "sensors",
        "stores_all.json": "stores",
    }
    assert [(r["src_filename"], r["order_id"]) for r in lr.rows("orders")] == [
        ("orders-late.csv", 2),
        ("orders.csv", 3),
        ("orders_2024-01-02.csv", 1),
    ]
    assert [r["src_filename"] for r in lr.rows("customers")] == ["customers.xlsx"]
    assert [r["src_filename"] for r in lr.rows("sensors")] == ["sensors.parquet"]
    assert "ordersx.csv" in lr.result.unmatched
    assert "ordersx.csv" not in lr.manifest_rows()


IGNORED = [
    "orders/.hidden.csv",
    "orders/_notes.csv",
    "orders/~$lock.csv",
    "orders/a.csv.tmp",
    "orders/a.tmp",
    "orders/a.csv.crc",
    "orders/.a.csv.crc",
    "orders/a.csv.part",
    "orders/.staging/b.csv",
    "orders/_archive/c.csv",
    "orders/sub/_old/d.csv",
    "orders/sub/.git/e.csv",
    ".orders.csv",
    "_orders.csv",
    "~$orders.xlsx",
    "orders.csv.part",
    "orders_x.tmp",
    "_archive/orders/f.csv",
    ".cache/orders.csv",
]


def test_ignored_names_never_appear(lake_run):
    # Every ignored file holds a record that would be rejected: it must not be read at all.
    files: dict[str, str | bytes] = {
        p: orders_csv(order(order_id=600 + i, quantity="0")) for i, p in enumerate(IGNORED)
    }
    files["orders/sub/kept.csv"] = orders_csv(order(order_id=1))
    lr = lake_run(files)

    assert [o.src_path for o in lr.result.outcomes] == ["orders/sub/kept.csv"]
    assert not set(IGNORED) & set(lr.result.unmatched)
    assert list(lr.manifest_rows()) == ["orders/sub/kept.csv"]
    assert [(r["src_filename"], r["order_id"]) for r in lr.rows("orders")] == [("orders/sub/kept.csv", 1)]
    assert lr.rejects("orders") == []
    assert lr.result.exit_code == 0


def test_unmatched_files_are_reported_and_not_recorded(lake_run):
    lr = lake_run(
        {
            "inventory_2024-01-01.csv": "sku,qty\nA,1\n",
            "readme.txt": "hello",
            "orders/notes.txt": "not a data file",
            "orders/a.csv": orders_csv(order(order_id=1)),
        }
    )

    assert set(lr.result.unmatched) == {"inventory_2024-01-01.csv", "readme.txt", "orders/notes.txt"}
    assert list(lr.manifest_rows()) == ["orders/a.csv"]
    assert [o.src_path for o in lr.result.outcomes] == ["orders/a.csv"]
    assert [r["order_id"] for r in lr.rows("orders")] == [1]
    assert lr.result.exit_code == 0


def test_file_in_a_folder_that_is_no_table_is_reported_unmatched(lake_run):
    lr = lake_run({"misc/orders.csv": orders_csv(order(order_id=5)), "orders/a.csv": orders_csv(order(order_id=1))})

    assert "misc/orders.csv" in lr.result.unmatched
    assert list(lr.manifest_rows()) == ["orders/a.csv"]
    assert [r["src_filename"] for r in lr.rows("orders")] == ["orders/a.csv"]


def test_every_source_of_the_shared_lake_was_ingested(lake):
    """Guards the shared lake itself: no case became a duplicate or an unmatched file."""
    assert sorted(lake.outcomes) == sorted(FILES)
    assert not lake.result.unmatched
    assert {o.status for o in lake.result.outcomes} <= {"success", "rejected"}


BAD_UTF8_JSON = FILES.add(
    "stores/bad-utf8.json",
    b"[\n"
    + json.dumps(store(store_id=201)).encode()
    + b',\n{"store_id": 202, "store_name": "Caf\xe9"},\n'
    + json.dumps(store(store_id=203)).encode()
    + b"\n]\n",
)


def test_json_array_invalid_utf8_rejects_only_its_element(lake):
    [reject] = lake.rejects("stores", BAD_UTF8_JSON)
    assert (reject["src_row_number"], reject["reason_code"]) == (2, "MALFORMED_RECORD")
    assert "\\xe9" in reject["raw_record"]
    assert [r["store_id"] for r in lake.rows("stores", BAD_UTF8_JSON)] == [201, 203]
    assert_accounted(lake, BAD_UTF8_JSON, 3)


NO_FINAL_NEWLINE = FILES.add("orders/no-final-newline.csv", orders_doc(line(order_id=1), line(order_id=2)).rstrip("\n"))


def test_csv_last_record_without_a_line_terminator(lake):
    assert [(r["order_id"], r["src_row_number"]) for r in lake.rows("orders", NO_FINAL_NEWLINE)] == [(1, 1), (2, 2)]
    assert_accounted(lake, NO_FINAL_NEWLINE, 2)
