"""A corpus of hostile raw files, generated (nothing hand-made is committed): each entry is a file
under the raw root and the outcome the bronze layer must give it (a manifest status and the
reject reasons it gets), next to good files that must still load.

``write_corpus(raw)`` writes every file and returns the expectations; ``GOOD`` lists the files that
load normally. Random content comes from a seeded generator, so the corpus is the same each run.
"""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import write_deltalake

ORDERS_HEADER = (
    "order_id,customer_id,store_id,product_id,order_dt,order_ts,quantity,unit_price,"
    "discount_pct,currency,status,payment_method"
)
EVENT = {
    "event_id": "e1",
    "event_ts": "2024-01-02T10:00:00Z",
    "customer_id": 5,
    "session_id": "s1",
    "event_type": "click",
    "page_url": "/",
    "properties": {"a": 1},
}


def order(i: int, *, payment: str = "card", day: str = "2024-01-02") -> str:
    return f"{i},{i},1,1,{day},{day}T10:00:00Z,1,9.99,0,EUR,PAID,{payment}"


def orders_text(*lines: str, eol: str = "\n") -> str:
    return eol.join([ORDERS_HEADER, *lines]) + eol


@dataclass
class Expect:
    """What must become of one hostile file: its manifest status and reject reasons (None: not
    in the manifest at all, as for an unmatched file), and rows loaded."""

    status: str | None
    reasons: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    note: str = ""
    check: Callable[[Path], None] | None = None  # a further check on the raw root's lake, if any


GOOD = {
    "orders/good_orders.csv": 3,
    "events/good_events.jsonl": 2,
    "sensors/good_sensors.parquet": 2,
    "stores/good_stores.json": 2,
}


def _rng() -> random.Random:
    return random.Random(1234)


def _xlsx(sheets: dict[str, list[list[object]]], *, merge: str | None = None, date_numbers: bool = False) -> bytes:
    import openpyxl

    wb = openpyxl.Workbook()
    first = True
    for title, rows in sheets.items():
        ws = wb.active if first else wb.create_sheet(title)
        assert ws is not None
        ws.title = title
        first = False
        for row in rows:
            ws.append(row)
        if merge and title == next(iter(sheets)):
            ws.merge_cells(merge)
        if date_numbers and title == next(iter(sheets)):
            for cell in ws["F"][1:]:
                cell.number_format = "yyyy-mm-dd"
    buf = io.BytesIO()
    wb.save(buf)
    return buf.getvalue()


CUSTOMERS = ["customer_id", "email", "first_name", "last_name", "country_code", "signup_dt", "is_active", "loyalty_tier"]


def write_corpus(raw: Path) -> dict[str, Expect]:
    """Write the hostile corpus and the good files under ``raw``; return what each must give."""
    rng = _rng()
    expect: dict[str, Expect] = {}

    def put(rel: str, data: bytes | str, e: Expect) -> None:
        path = raw / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        expect[rel] = e

    # -- good files, which must load whatever lies next to them --------------------------------
    put("orders/good_orders.csv", orders_text(order(1), order(2), order(3)), Expect("success", rows=3))
    put("events/good_events.jsonl", "\n".join(json.dumps(EVENT | {"event_id": f"g{i}"}) for i in range(2)) + "\n",
        Expect("success", rows=2))  # fmt: skip
    sensors = pa.table(
        {
            "store_id": pa.array([1, 2], pa.int32()),
            "sensor_id": ["a", "b"],
            "reading_ts": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * 2, pa.timestamp("us", tz="UTC")),
            "temperature_c": [20.5, 21.0],
            "humidity_pct": [40.0, 41.0],
            "co2_ppm": pa.array([400, 410], pa.int32()),
            "battery_v": [3.1, 3.2],
        }
    )
    buf = io.BytesIO()
    pq.write_table(sensors, buf)
    put("sensors/good_sensors.parquet", buf.getvalue(), Expect("success", rows=2))
    put("stores/good_stores.json", json.dumps([{"store_id": 1, "store_name": "A"}, {"store_id": 2, "store_name": "B"}]),
        Expect("success", rows=2))  # fmt: skip

    # -- random bytes under every extension ----------------------------------------------------
    unreadable = Expect("rejected", {"UNREADABLE_FILE": 1})
    for rel in (
        "orders/random.csv.gz",
        "events/random.jsonl.gz",
        "events/random.ndjson.gz",
        "stores/random.json.gz",
        "sensors/random.parquet",
        "customers/random.xlsx",
    ):
        put(rel, rng.randbytes(4096), unreadable)
    # Text formats read random bytes as text: records that are not what they should be.
    put("orders/random.csv", rng.randbytes(4096), Expect("rejected", note="SCHEMA_MISMATCH: no usable header"))
    # JSON lines of random bytes: no record holds a required key, so the file is a SCHEMA_MISMATCH.
    put("events/random.jsonl", rng.randbytes(4096), Expect("rejected", note="SCHEMA_MISMATCH: no record is an object"))
    put("events/random.ndjson", rng.randbytes(2048), Expect("rejected", note="SCHEMA_MISMATCH: no record is an object"))
    put("stores/random.json", rng.randbytes(4096), unreadable)

    # -- compression ---------------------------------------------------------------------------
    whole = gzip.compress(orders_text(*(order(i) for i in range(100, 400))).encode())
    put("orders/truncated.csv.gz", whole[: len(whole) // 2], unreadable)
    corrupt = bytearray(whole)
    for k in range(40, 80):
        corrupt[k] ^= 0xFF
    put("orders/corrupt.csv.gz", bytes(corrupt), unreadable)
    put("orders/not_gzip.csv.gz", orders_text(order(5)), unreadable)

    # -- sizes and shapes ----------------------------------------------------------------------
    put("orders/empty.csv", b"", Expect("rejected", note="no header: SCHEMA_MISMATCH with no record"))
    put("orders/blank_lines.csv", "\n\n\n", Expect("rejected", note="no header: SCHEMA_MISMATCH with no record"))
    put("orders/header_only.csv", ORDERS_HEADER + "\n", Expect("success"))
    put("orders/big_field.csv", orders_text(order(10, payment="x" * (20 << 20))), Expect("success", rows=1))
    extra = [f"extra_{i}" for i in range(10_000 - 12)]
    put("orders/wide.csv", ",".join([ORDERS_HEADER, *extra]) + "\n" + ",".join([order(11), *("v" for _ in extra)]) + "\n",
        Expect("success", rows=1))  # fmt: skip
    put("orders/nul.csv", orders_text(order(12), "13,13,1,1,2024-01-02,2024-01-02T10:00:00Z,1,9.99,0,EUR,PA\x00ID,card"),
        Expect("success", {"CONSTRAINT_VIOLATION": 1}, rows=1))  # fmt: skip
    put("orders/crlf.csv", orders_text(order(14), order(15), eol="\r\n"), Expect("success", rows=2))
    put("orders/mixed_eol.csv", ORDERS_HEADER + "\r\n" + order(16) + "\n" + order(17) + "\r\n" + order(18) + "\n",
        Expect("success", rows=3))  # fmt: skip
    put("orders/latin1.csv", orders_text(order(19), order(20, payment="caf\xe9")).encode("latin-1"),
        Expect("success", {"MALFORMED_RECORD": 1}, rows=1))  # fmt: skip
    put("orders/bom.csv", "\ufeff" + orders_text(order(21)), Expect("success", rows=1))

    # -- JSON ------------------------------------------------------------------------------------
    deep = "[" * 10_000 + "]" * 10_000
    put("events/deep.jsonl", json.dumps(EVENT | {"event_id": "d0"}) + "\n"
        + json.dumps({k: v for k, v in EVENT.items() if k != "properties"} | {"event_id": "d1"})[:-1]
        + ', "properties": ' + deep + "}\n",
        Expect("success", rows=2, note="deep nesting kept as the JSON text of properties"))  # fmt: skip
    put("events/dup_keys.jsonl", '{"event_id": "k1", "event_id": "k2", "event_ts": "2024-01-02T10:00:00Z", '
        '"session_id": "s", "event_type": "t"}\n', Expect("success", rows=1))  # fmt: skip
    huge = {k: v for k, v in EVENT.items() if k != "customer_id"} | {"event_id": "h"}
    put("events/huge_number.jsonl", json.dumps(huge)[:-1] + ', "customer_id": 1' + "0" * 400 + "}\n",
        Expect("success", {"TYPE_MISMATCH": 1}))  # fmt: skip
    # No element is an object: no record has the required keys, a SCHEMA_MISMATCH (which comes
    # before MALFORMED_RECORD); one object among them makes the others MALFORMED_RECORD.
    put("events/not_objects.jsonl", '[1, 2]\n"text"\n42\nnull\n', Expect("rejected", {"SCHEMA_MISMATCH": 4}))
    put("events/some_not_objects.jsonl", '[1, 2]\n' + json.dumps(EVENT | {"event_id": "o"}) + '\n42\n',
        Expect("success", {"MALFORMED_RECORD": 2}, rows=1))  # fmt: skip
    put("stores/truncated.json", json.dumps([{"store_id": 1, "store_name": "A"}, {"store_id": 2, "store_name": "B"}])[:-10],
        Expect("success", {"MALFORMED_RECORD": 1}, rows=1))  # fmt: skip

    # -- XLSX --------------------------------------------------------------------------------------
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("[Content_Types].xml", "<Types/>")
        with zf.open("xl/worksheets/sheet1.xml", "w") as fh:
            chunk = b"\0" * (1 << 20)
            for _ in range(64):  # 64 MiB of zeros, a few hundred KB compressed
                fh.write(chunk)
    put("customers/bomb.xlsx", bomb.getvalue(), Expect("rejected", {"UNREADABLE_FILE": 1}, note="guarded size"))
    put("customers/sheets.xlsx", _xlsx({"first": [CUSTOMERS, [1, "a@x", "A", "B", "FR", None, True, "gold"]],
                                         "second": [["anything"], ["else"]]}), Expect("success", rows=1))  # fmt: skip
    put("customers/formula.xlsx", _xlsx({"s": [CUSTOMERS, [2, "b@x", "=UPPER(\"b\")", "C", "FR", None, "yes", "x"]]}),
        Expect("success", rows=1, note="a formula with no cached value is empty"))  # fmt: skip
    put("customers/merged.xlsx", _xlsx({"s": [CUSTOMERS, [3, "c@x", "D", "E", "FR", None, 1, "y"],
                                              [4, "d@x", "F", "G", "FR", None, 0, "z"]]}, merge="C2:D2"),
        Expect("success", rows=2))  # fmt: skip
    put("customers/date_numbers.xlsx", _xlsx({"s": [CUSTOMERS, [5, "e@x", "H", "I", "FR", 45292, "no", "z"]]},
                                             date_numbers=True), Expect("success", rows=1))  # fmt: skip

    # -- Parquet -------------------------------------------------------------------------------------
    nested = sensors.append_column("tags", pa.array([["x", "y"], []], pa.list_(pa.string())))
    nested = nested.append_column("meta", pa.array([{"k": 1}, {"k": 2}], pa.struct([("k", pa.int64())])))
    buf = io.BytesIO()
    pq.write_table(nested, buf)
    put("sensors/nested.parquet", buf.getvalue(), Expect("success", rows=2, note="nested extras rescued as JSON"))
    wrong = sensors.set_column(2, "reading_ts", pa.array([[1], [2]], pa.list_(pa.int64())))
    buf = io.BytesIO()
    pq.write_table(wrong, buf)
    put("sensors/unsupported.parquet", buf.getvalue(), Expect("success", {"TYPE_MISMATCH": 2}))
    put("sensors/truncated.parquet", buf.getvalue()[:-100], unreadable)

    # -- names -----------------------------------------------------------------------------------
    for rel in (
        "orders/o'brien; DROP TABLE manifest_processed_files; --.csv",
        "orders/100% \"quoted\".csv",
        "orders/SELECT * FROM x WHERE 1=1.csv",
        "orders/new\nline.csv",
        "orders/ünï cödé ☃.csv",
    ):
        put(rel, orders_text(order(30 + len(expect))), Expect("success", rows=1))

    # -- a Delta source with a missing data file -----------------------------------------------------
    returns = pa.table(
        {
            "return_id": pa.array([1, 2], pa.int64()),
            "order_id": pa.array([1, 2], pa.int64()),
            "product_id": pa.array([1, 1], pa.int64()),
            "return_ts": pa.array([dt.datetime(2024, 1, 1, tzinfo=dt.UTC)] * 2, pa.timestamp("us", tz="UTC")),
            "quantity": pa.array([1, 1], pa.int32()),
            "updated_at": pa.array([dt.datetime(2024, 1, 2, tzinfo=dt.UTC)] * 2, pa.timestamp("us", tz="UTC")),
        }
    )
    broken = raw / "returns" / "broken_changes"
    write_deltalake(str(broken), returns)
    for f in broken.glob("*.parquet"):
        f.unlink()
    expect["returns/broken_changes@v0"] = Expect("failed", note="a data file of the version is missing")

    # -- a symbolic link out of the raw folder: refused, listed as unmatched ----------------------
    outside = raw.parent / "outside.csv"
    outside.write_text(orders_text(order(99)))
    os.symlink(outside, raw / "orders" / "link_outside.csv")
    expect["orders/link_outside.csv"] = Expect(None, note="unmatched: resolves outside the raw folder")
    return expect
