"""Deterministic sample data for the bronze layer.

Two modes, both reproducible (fixed seeds, no clock):

* ``write_bundled_sample(out)``: the small sample shipped in ``data_raw/`` (CONTRACT section 9),
  with deliberate bad records of every reason code.
* ``write_large(out, rows=N, ...)``: large orders CSV / events JSONL / sensors Parquet files for
  benchmarks, built with vectorized numpy/pyarrow kernels in bounded-memory chunks.

Command line::

    python -m bronze_assets.sample --out DIR
    python -m bronze_assets.sample --out DIR --rows N [--tables orders,events,sensors]
        [--files K] [--bad-fraction F] [--seed S]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import gzip
import io
import json
import random
import shutil
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas.schemas import TABLES_BY_NAME

LARGE_TABLES: tuple[str, ...] = ("orders", "events", "sensors")
LARGE_EXTENSIONS: dict[str, str] = {
    "orders": "csv",
    "events": "jsonl",
    "sensors": "parquet",
}

# 4 Parquet row groups per chunk: row groups never span two write_table calls.
_ROW_GROUP_ROWS = 131_072
_CHUNK_ROWS = 4 * _ROW_GROUP_ROWS
_EPOCH_2024 = (dt.date(2024, 1, 1) - dt.date(1970, 1, 1)).days
_US_PER_DAY = 86_400_000_000
_UTC = dt.UTC

MISSING = "MISSING_REQUIRED"
TYPE = "TYPE_MISMATCH"
CONSTRAINT = "CONSTRAINT_VIOLATION"
MALFORMED = "MALFORMED_RECORD"
SCHEMA = "SCHEMA_MISMATCH"
UNREADABLE = "UNREADABLE_FILE"

STATUSES = ("PLACED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED")
CURRENCIES = ("EUR", "USD", "GBP")
PAYMENT_METHODS = ("card", "cash", "paypal")
EVENT_TYPES = ("page_view", "search", "add_to_cart", "purchase")

# Large-mode corruptions, cycled in this order over the corrupted rows: (kind, reason code).
ORDER_CORRUPTIONS: tuple[tuple[str, str], ...] = (
    ("non-numeric quantity", TYPE),
    ("impossible order_dt", TYPE),
    ("empty order_id", MISSING),
    ("one field too many", MALFORMED),
    ("one field too few", MALFORMED),
    ("negative quantity", CONSTRAINT),
    ("lowercase status", CONSTRAINT),
)
EVENT_CORRUPTIONS: tuple[tuple[str, str], ...] = (
    ("line is not JSON", MALFORMED),
    ("line is a JSON array", MALFORMED),
    ("session_id key missing", MISSING),
    ("event_ts not a timestamp", TYPE),
    ("customer_id not an integer", TYPE),
)
SENSOR_CORRUPTIONS: tuple[tuple[str, str], ...] = (
    ("humidity_pct 120.0", CONSTRAINT),
    ("sensor_id null", MISSING),
)
CORRUPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "orders": ORDER_CORRUPTIONS,
    "events": EVENT_CORRUPTIONS,
    "sensors": SENSOR_CORRUPTIONS,
}


# ----------------------------------------------------------------------------
# Large mode
# ----------------------------------------------------------------------------


def _columns(table: str) -> tuple[str, ...]:
    return TABLES_BY_NAME[table].column_names


def _str(values: Any) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _join(*parts: Any, sep: str = "") -> pa.Array:
    return pc.binary_join_element_wise(*parts, sep)


def _pick(choices: Sequence[str], idx: np.ndarray) -> pa.Array:
    return pc.take(pa.array(list(choices), pa.string()), pa.array(idx))


def _where(mask: np.ndarray, when_true: Any, when_false: Any) -> pa.Array:
    return pc.if_else(pa.array(mask), when_true, when_false)


def _date_str(days_since_2024: np.ndarray) -> pa.Array:
    days = (days_since_2024 + _EPOCH_2024).astype(np.int32)
    return pc.cast(pa.array(days, pa.int32()).cast(pa.date32()), pa.string())


def _time_str(seconds: np.ndarray) -> pa.Array:
    return pc.cast(
        pa.array(seconds.astype(np.int32), pa.int32()).cast(pa.time32("s")), pa.string()
    )


def _money_str(cents: np.ndarray) -> pa.Array:
    return _join(_str(cents // 100), pc.utf8_lpad(_str(cents % 100), 2, "0"), sep=".")


def _write_lines(fh: BinaryIO, lines: pa.Array) -> None:
    """Write a string array, each value followed by a newline, straight from its data buffer."""
    if lines.null_count:
        raise ValueError("a generated line is null")
    terminated = _join(lines, "", sep="\n")
    _, offsets_buf, data_buf = terminated.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32)[
        terminated.offset : terminated.offset + len(terminated) + 1
    ]
    fh.write(memoryview(data_buf)[int(offsets[0]) : int(offsets[-1])])


def _bad_kinds(start: int, n: int, rows: int, bad: int, kinds: int) -> np.ndarray:
    """Corruption kind of each row in ``[start, start + n)`` (-1 = clean).

    Exactly ``bad`` of the ``rows`` rows are corrupted, evenly spread; the k-th corrupted row
    gets kind ``k % kinds``, so the count per kind is known without reading the data back.
    """
    idx = np.arange(start, start + n, dtype=np.int64)
    upto = ((idx + 1) * bad) // rows
    before = (idx * bad) // rows
    return np.where(upto > before, (upto - 1) % kinds, -1)


def corruption_counts(table: str, *, rows: int, bad_fraction: float) -> dict[str, int]:
    """Rejects by reason code that ``write_large`` plants in ``rows`` rows of ``table``."""
    kinds = CORRUPTIONS[table]
    bad = round(rows * bad_fraction)
    counts: Counter[str] = Counter()
    for j, (_, reason) in enumerate(kinds):
        counts[reason] += (bad - j + len(kinds) - 1) // len(kinds) if bad > j else 0
    return dict(counts)


def _orders_lines(rng: np.random.Generator, start: int, kind: np.ndarray) -> pa.Array:
    n = len(kind)
    order_id = np.arange(start + 1, start + n + 1, dtype=np.int64)
    day = rng.integers(0, 365, n)
    seconds = rng.integers(0, 86_400, n)
    with_offset = rng.random(n) < 0.1
    # A '+02:00' local time at or after 02:00 keeps the UTC date equal to order_dt.
    seconds = np.where(with_offset, 7_200 + seconds % (86_400 - 7_200), seconds)
    quantity = rng.integers(1, 11, n)
    discount = rng.integers(0, 5_001, n)
    no_discount = rng.random(n) < 0.6
    status_idx = rng.integers(0, len(STATUSES), n)

    order_dt = _date_str(day)
    order_ts = _join(
        order_dt, "T", _time_str(seconds), _where(with_offset, "+02:00", "Z")
    )
    qty = _str(quantity)
    status = _pick(STATUSES, status_idx)
    cols: list[pa.Array] = [
        _str(order_id),
        _str(rng.integers(1, 200_001, n)),
        _str(rng.integers(1, 51, n)),
        _str(rng.integers(1, 5_001, n)),
        _where(kind == 1, "2024-13-45", order_dt),
        order_ts,
        _where(kind == 0, "x", _where(kind == 5, _join("-", qty), qty)),
        _money_str(rng.integers(100, 50_000, n)),
        _where(no_discount, "", _money_str(discount)),
        _pick(CURRENCIES, rng.integers(0, len(CURRENCIES), n)),
        _where(kind == 6, pc.utf8_lower(status), status),
        _pick(PAYMENT_METHODS, rng.integers(0, len(PAYMENT_METHODS), n)),
    ]
    cols[0] = _where(kind == 2, "", cols[0])
    line = _join(*cols, sep=",")
    line = _where(kind == 3, _join(line, "extra", sep=","), line)
    return _where(kind == 4, _join(*cols[:-1], sep=","), line)


def _events_lines(rng: np.random.Generator, start: int, kind: np.ndarray) -> pa.Array:
    n = len(kind)
    event_no = np.arange(start + 1, start + n + 1, dtype=np.int64)
    day = rng.integers(0, 366, n)
    seconds = rng.integers(0, 86_400, n)
    customer = _str(rng.integers(1, 200_001, n))
    no_customer = rng.random(n) < 0.1

    event_id = _join("evt-", pc.utf8_lpad(_str(event_no), 10, "0"))
    event_ts = _join(_date_str(day), "T", _time_str(seconds), "Z")
    event_ts = _where(kind == 3, "yesterday", event_ts)
    customer = _where(no_customer, "null", customer)
    customer = _where(kind == 4, '"12x"', customer)
    head = _join(
        '{"event_id":"',
        event_id,
        '","event_ts":"',
        event_ts,
        '","customer_id":',
        customer,
    )
    session = _join(',"session_id":"sess-', _str(rng.integers(1, 10_000_000, n)), '"')
    session = _where(kind == 2, "", session)
    tail = _join(
        ',"event_type":"',
        _pick(EVENT_TYPES, rng.integers(0, len(EVENT_TYPES), n)),
        '","page_url":"/p/',
        _str(rng.integers(1, 5_001, n)),
        '","properties":{"ref":"',
        _pick(("email", "ads", "search", "direct"), rng.integers(0, 4, n)),
        '","n":',
        _str(rng.integers(1, 10, n)),
        "}}",
    )
    line = _join(head, session, tail)
    line = _where(kind == 0, _join('{"event_id":"', event_id, '",'), line)
    return _where(kind == 1, _join('["', event_id, '"]'), line)


def _sensors_table(rng: np.random.Generator, kind: np.ndarray) -> pa.Table:
    n = len(kind)
    store = rng.integers(1, 51, n).astype(np.int32)
    sensor = _join(
        "S", pc.utf8_lpad(_str(store), 2, "0"), "-", _str(rng.integers(1, 5, n))
    )
    ts_us = rng.integers(0, 366 * _US_PER_DAY, n) + _EPOCH_2024 * _US_PER_DAY
    humidity = np.round(rng.uniform(25.0, 75.0, n), 1)
    humidity = np.where(kind == 0, 120.0, humidity)
    return pa.table(
        {
            "store_id": pa.array(store, pa.int32()),
            "sensor_id": pc.if_else(
                pa.array(kind == 1), pa.scalar(None, pa.string()), sensor
            ),
            "reading_ts": pa.array(ts_us, pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
            "temperature_c": pa.array(np.round(rng.normal(21.0, 2.0, n), 2)),
            "humidity_pct": pa.array(humidity),
            "co2_ppm": pa.array(
                rng.integers(380, 1_600, n).astype(np.int32), pa.int32()
            ),
            "battery_v": pa.array(np.round(rng.uniform(2.7, 3.3, n), 3)),
        }
    )


_LINE_BUILDERS: dict[
    str, Callable[[np.random.Generator, int, np.ndarray], pa.Array]
] = {
    "orders": _orders_lines,
    "events": _events_lines,
}


def write_large(
    out: Path,
    *,
    rows: int,
    tables: Sequence[str] = ("orders",),
    files: int = 1,
    bad_fraction: float = 0.0,
    seed: int = 7,
) -> list[Path]:
    """Write ``rows`` rows per table into ``out/<table>/`` split over ``files`` files.

    Returns the paths written. ``bad_fraction`` of the rows (rounded, evenly spread) are
    corrupted; ``corruption_counts`` gives the resulting rejects per reason code.
    """
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if not 1 <= files <= rows:
        raise ValueError("files must be between 1 and rows")
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError("bad_fraction must be between 0 and 1")
    unknown = [t for t in tables if t not in LARGE_TABLES]
    if unknown:
        raise ValueError(
            f"unknown table(s) {unknown}; choose from {', '.join(LARGE_TABLES)}"
        )

    bad = round(rows * bad_fraction)
    written: list[Path] = []
    for table in dict.fromkeys(tables):
        table_no = LARGE_TABLES.index(table)
        ext = LARGE_EXTENSIONS[table]
        folder = out / table
        folder.mkdir(parents=True, exist_ok=True)
        kinds = len(CORRUPTIONS[table])
        for file_no in range(files):
            first, last = file_no * rows // files, (file_no + 1) * rows // files
            name = (
                f"{table}_{rows}.{ext}"
                if files == 1
                else f"{table}_part-{file_no + 1:05d}.{ext}"
            )
            path = folder / name
            chunks = [
                (chunk_no, s, min(s + _CHUNK_ROWS, last))
                for chunk_no, s in enumerate(range(first, last, _CHUNK_ROWS))
            ]
            if table == "sensors":
                schema = pa.schema(
                    [pa.field(c.name, c.type) for c in TABLES_BY_NAME[table].columns]
                )
                with pq.ParquetWriter(path, schema) as writer:
                    for chunk_no, s, e in chunks:
                        rng = np.random.default_rng([seed, table_no, file_no, chunk_no])
                        kind = _bad_kinds(s, e - s, rows, bad, kinds)
                        writer.write_table(
                            _sensors_table(rng, kind), row_group_size=_ROW_GROUP_ROWS
                        )
            else:
                build = _LINE_BUILDERS[table]
                with path.open("wb") as fh:
                    if table == "orders":
                        fh.write((",".join(_columns(table)) + "\n").encode())
                    for chunk_no, s, e in chunks:
                        rng = np.random.default_rng([seed, table_no, file_no, chunk_no])
                        _write_lines(
                            fh, build(rng, s, _bad_kinds(s, e - s, rows, bad, kinds))
                        )
            written.append(path)
    return written


# ----------------------------------------------------------------------------
# Bundled sample
# ----------------------------------------------------------------------------

# A CSV record: its fields, or its raw bytes (without terminator) when it must not be re-quoted.
CsvRecord = list[str] | bytes


@dataclass
class _Expected:
    """What ingesting one bundled source should yield (records read, rejects per reason code)."""

    src_path: str
    table: str | None
    records: int
    rejects: Counter[str] = field(default_factory=Counter)
    note: str = ""

    @property
    def written(self) -> int:
        return self.records - sum(self.rejects.values())


def _csv_bytes(
    header: Sequence[str], records: Sequence[CsvRecord], *, newline: str = "\n"
) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header)
    out = [buf.getvalue().encode()]
    for rec in records:
        if isinstance(rec, bytes):
            out.append(rec + newline.encode())
        else:
            buf.seek(0)
            buf.truncate()
            writer.writerow(rec)
            out.append(buf.getvalue().encode())
    return b"".join(out)


def _gzip(data: bytes) -> bytes:
    # mtime=0 and no file name in the header keep the bytes reproducible.
    return gzip.compress(data, compresslevel=9, mtime=0)


def _rng(name: str) -> random.Random:
    # A string seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED.
    return random.Random(f"bronze-sample-{name}")


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def _stable_xlsx(workbook: Any) -> bytes:
    """Serialize an openpyxl workbook with fixed document dates and zip entry times."""
    from openpyxl.writer.excel import ExcelWriter

    fixed = dt.datetime(2024, 1, 1)
    workbook.properties.created = fixed
    workbook.properties.modified = fixed
    workbook.properties.creator = "bronze_assets.sample"
    raw = io.BytesIO()
    archive = zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED)
    # ExcelWriter directly, because Workbook.save stamps the current time into `modified`.
    ExcelWriter(workbook, archive).save()
    stable = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(raw.getvalue())) as src,
        zipfile.ZipFile(stable, "w", zipfile.ZIP_DEFLATED) as dst,
    ):
        for info in src.infolist():
            entry = zipfile.ZipInfo(info.filename, date_time=(2024, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = info.external_attr
            dst.writestr(entry, src.read(info.filename))
    return stable.getvalue()


_FIRST_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Hugo")
_LAST_NAMES = ("Garcia", "Muller", "Martin", "Rossi", "Smith", "Jansen", "Novak")


def _customers(out: Path) -> list[_Expected]:
    from openpyxl import Workbook

    rng = _rng("customers")
    header = [*_columns("customers"), "referral_code"]
    # record number -> (column, bad value, reason)
    bad: dict[int, tuple[str, object, str]] = {
        17: ("customer_id", None, MISSING),
        48: ("email", None, MISSING),
        83: ("email", "   ", MISSING),
        120: ("customer_id", "abc", TYPE),
        151: ("signup_dt", "not a date", TYPE),
        188: ("is_active", "maybe", TYPE),
    }
    wb = Workbook()
    ws = wb.active
    ws.title = "customers"
    ws.append(header)
    expected = _Expected("customers.xlsx", "customers", 200)
    for rec in range(1, 201):
        first, last = rng.choice(_FIRST_NAMES), rng.choice(_LAST_NAMES)
        signup = dt.date(2019, 1, 1) + dt.timedelta(days=rng.randrange(5 * 365))
        active: object = rng.random() < 0.8
        if rec % 23 == 0:
            active = "yes"
        elif rec % 29 == 0:
            active = "N"
        elif rec % 31 == 0:
            active = None
        row: dict[str, object] = {
            "customer_id": rec,
            "email": f"{first}.{last}{rec}@example.com".lower(),
            "first_name": first,
            "last_name": last,
            "country_code": rng.choice(("DE", "FR", "NL", "ES", "IT", "GB", "US")),
            "signup_dt": signup.isoformat() if rec % 37 == 0 else signup,
            "is_active": active,
            "loyalty_tier": rng.choice(("bronze", "silver", "gold", "platinum", None)),
            "referral_code": f"REF-{rng.randrange(16**4):04X}"
            if rec % 9 == 0
            else None,
        }
        if rec in bad:
            column, value, reason = bad[rec]
            row[column] = value
            expected.rejects[reason] += 1
        ws.append([row[c] for c in header])
    (out / "customers.xlsx").write_bytes(_stable_xlsx(wb))
    (out / "customers_legacy.xlsx").write_bytes(
        b"customer_id;email;first_name\n1;old@example.com;Legacy\n"
        b"This is a semicolon-separated text export with an .xlsx name, not a workbook.\n"
    )
    legacy = _Expected(
        "customers_legacy.xlsx", "customers", 1, Counter({UNREADABLE: 1}), "not a zip"
    )
    return [expected, legacy]


_ADJECTIVES = ("Classic", "Modern", "Compact", "Deluxe", "Rustic", "Nordic")
_NOUNS = ("Chair", "Lamp", "Desk", "Mug", "Shelf", "Rug", "Vase", "Clock", "Kettle")


def _products(out: Path) -> list[_Expected]:
    rng = _rng("products")
    columns = _columns("products")
    bad: dict[int, tuple[str, str, str]] = {
        25: ("unit_price", "12.345", TYPE),
        60: ("unit_price", "-1.00", CONSTRAINT),
        95: ("+field", "EXTRA", MALFORMED),
        130: ("sku", "", MISSING),
        170: ("is_discontinued", "perhaps", TYPE),
        210: ("updated_at", "2024-02-30T10:00:00Z", TYPE),
    }
    expected = _Expected("products/products.csv", "products", 300)
    records: list[CsvRecord] = []
    for rec in range(1, 301):
        name = f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        if rec % 15 == 0:
            name = f"{name}, {rng.choice(('oak', 'steel', 'blue', 'large'))}"
        if rec == 40:
            name = "Reading Lamp\nwith linen shade"
        if rec == 41:
            name = 'The "Classic" Mug'
        cents = rng.randrange(199, 49_999)
        price = _money(cents) + ("0" if rec % 50 == 0 else "")
        hour, minute = rng.randrange(24), rng.randrange(60)
        updated = f"2024-01-{rng.randrange(1, 32):02d}T{hour:02d}:{minute:02d}:00"
        updated += "+01:00" if rec % 11 == 0 else "Z"
        row = {
            "product_id": str(rec),
            "sku": f"SKU-{rec:05d}",
            "product_name": name,
            "category": rng.choice(("furniture", "lighting", "kitchen", "decor", "")),
            "unit_price": price,
            "currency": "USD" if rec % 10 == 0 else "EUR",
            "is_discontinued": rng.choice(
                ("false", "false", "false", "true", "Y", "0")
            ),
            "updated_at": updated,
        }
        fields = [row[c] for c in columns]
        if rec in bad:
            column, value, reason = bad[rec]
            if column == "+field":
                fields.append(value)
            else:
                fields[columns.index(column)] = value
            expected.rejects[reason] += 1
        records.append(fields)
    data = b"\xef\xbb\xbf" + _csv_bytes(columns, records, newline="\r\n")
    (out / "products").mkdir(parents=True, exist_ok=True)
    (out / "products" / "products.csv").write_bytes(data)
    return [expected]


def _stores(out: Path) -> list[_Expected]:
    rng = _rng("stores")
    cities = (
        ("Berlin", "DE-East"),
        ("Hamburg", "DE-North"),
        ("Munich", "DE-South"),
        ("Cologne", "DE-West"),
        ("Leipzig", "DE-East"),
        ("Bremen", "DE-North"),
    )
    elements: list[object] = []
    expected = _Expected("stores.json", "stores", 30)
    store_id = 0
    for rec in range(1, 31):
        if rec == 12:
            elements.append([12, "Store 12", "Dresden"])
            expected.rejects[MALFORMED] += 1
            continue
        store_id += 1
        city, region = cities[rng.randrange(len(cities))]
        opened = dt.date(2010, 1, 1) + dt.timedelta(days=rng.randrange(14 * 365))
        obj: dict[str, object] = {
            "store_id": store_id,
            "store_name": f"{city} {store_id:02d}",
            "city": None if rec == 9 else city,
            "region": region,
            "opened_dt": opened.isoformat(),
            "square_meters": rng.randrange(200, 2_500),
        }
        if rec == 3:
            obj["manager"] = "Ana Ruiz"
        if rec == 7:
            obj["square_meters"] = "450"
        if rec == 20:
            del obj["store_name"]
            expected.rejects[MISSING] += 1
        if rec == 25:
            obj["square_meters"] = 12.5
            expected.rejects[TYPE] += 1
        elements.append(obj)
    text = json.dumps(elements, indent=2, ensure_ascii=False) + "\n"
    (out / "stores.json").write_bytes(text.encode())
    return [expected]


def _order_ts(day: dt.date, rec: int, rng: random.Random) -> str:
    clock = f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}"
    stamp = f"{day.isoformat()}T{clock}"
    variant = rec % 20
    if variant == 3:
        return stamp + "+01:00"
    if variant == 7:
        return stamp + "-05:00"
    if variant == 11:
        return stamp
    if variant == 15:
        return f"{stamp}.{rng.randrange(10**9):09d}Z"
    return stamp + "Z"


def _order_fields(
    order_id: int, day: dt.date, rec: int, rng: random.Random
) -> list[str]:
    discount = "" if rng.random() < 0.6 else _money(rng.randrange(0, 5_001))
    return [
        str(order_id),
        str(rng.randrange(1, 201)),
        str(rng.randrange(1, 30)),
        str(rng.randrange(1, 301)),
        day.isoformat(),
        _order_ts(day, rec, rng),
        str(rng.randrange(1, 11)),
        _money(rng.randrange(199, 9_999)),
        discount,
        rng.choice(CURRENCIES),
        rng.choice(STATUSES),
        rng.choice(("card", "card", "cash", "paypal", "")),
    ]


# orders file -> record number -> (column or special, value, reason or "" for a valid edge value).
# Specials: "+field" appends a field, "-field" drops the last one, "bytes" puts raw bytes
# in payment_method.
_ORDER_DEFECTS: dict[str, dict[int, tuple[str, str | bytes, str]]] = {
    "2024-01-01": {
        10: ("customer_id", "", MISSING),
        50: ("quantity", "0", CONSTRAINT),
        90: ("-field", "", MALFORMED),
        130: ("quantity", "3.0", ""),
    },
    "2024-01-02": {
        20: ("currency", "  ", MISSING),
        60: ("quantity", "3.5", TYPE),
        100: ("status", "paid", CONSTRAINT),
        140: ("bytes", b"\xff\xfe", MALFORMED),
        180: ("quantity", " 4 ", ""),
    },
    "2024-01-03": {
        30: ("order_dt", "2024-02-30", TYPE),
        70: ("discount_pct", "150.00", CONSTRAINT),
        110: ("+field", "EXTRA", MALFORMED),
        150: ("unit_price", "12.340", ""),
    },
    "2024-01-04": {
        40: ("unit_price", "9.999", TYPE),
        80: ("unit_price", "-5.00", CONSTRAINT),
    },
    "2024-01-05": {},
    "2024-01-06": {
        45: ("quantity", "two", TYPE),
    },
}


def _orders(out: Path) -> list[_Expected]:
    rng = _rng("orders")
    columns = _columns("orders")
    folder = out / "orders"
    folder.mkdir(parents=True, exist_ok=True)
    expected: list[_Expected] = []
    order_id = 100_000
    for day_text, defects in _ORDER_DEFECTS.items():
        day = dt.date.fromisoformat(day_text)
        gz = day_text == "2024-01-06"
        name = f"orders_{day_text}.csv" + (".gz" if gz else "")
        exp = _Expected(f"orders/{name}", "orders", 300)
        records: list[CsvRecord] = []
        for rec in range(1, 301):
            order_id += 1
            fields = _order_fields(order_id, day, rec, rng)
            rec_out: CsvRecord = fields
            if rec in defects:
                column, value, reason = defects[rec]
                if column == "+field":
                    fields.append(str(value))
                elif column == "-field":
                    fields.pop()
                elif column == "bytes":
                    assert isinstance(value, bytes)
                    rec_out = ",".join(fields[:-1]).encode() + b"," + value
                else:
                    fields[columns.index(column)] = str(value)
                if reason:
                    exp.rejects[reason] += 1
            records.append(rec_out)
        data = _csv_bytes(columns, records)
        (folder / name).write_bytes(_gzip(data) if gz else data)
        expected.append(exp)
        if day_text == "2024-01-02":
            (folder / "orders_2024-01-02_copy.csv").write_bytes(data)
            expected.append(
                _Expected(
                    "orders/orders_2024-01-02_copy.csv", "orders", 0, note="duplicate"
                )
            )

    # An older export without order_ts: every record is a SCHEMA_MISMATCH.
    legacy_columns = [c for c in columns if c != "order_ts"]
    day = dt.date(2024, 1, 7)
    legacy_records: list[CsvRecord] = []
    for rec in range(1, 21):
        order_id += 1
        fields = _order_fields(order_id, day, rec, rng)
        del fields[columns.index("order_ts")]
        legacy_records.append(fields)
    (folder / "orders_2024-01-07_legacy.csv").write_bytes(
        _csv_bytes(legacy_columns, legacy_records)
    )
    expected.append(
        _Expected(
            "orders/orders_2024-01-07_legacy.csv", "orders", 20, Counter({SCHEMA: 20})
        )
    )

    # The last record opens a quote that never closes: it swallows the two lines after it.
    day = dt.date(2024, 1, 8)
    records = []
    for rec in range(1, 150):
        order_id += 1
        records.append(_order_fields(order_id, day, rec, rng))
    order_id += 1
    cut = _order_fields(order_id, day, 150, rng)
    tail = ",".join(cut[:5]) + ',"' + ",".join(cut[5:])
    swallowed = [
        ",".join(_order_fields(order_id + k, day, 150 + k, rng)) for k in (1, 2)
    ]
    records.append("\n".join([tail, *swallowed]).encode())
    (folder / "orders_2024-01-08.csv").write_bytes(_csv_bytes(columns, records))
    expected.append(
        _Expected(
            "orders/orders_2024-01-08.csv",
            "orders",
            150,
            Counter({MALFORMED: 1}),
            "last record: unclosed quote spanning 3 lines",
        )
    )

    # Ignored by name: a leading '_' and a leading '.'.
    (folder / "_notes.csv").write_bytes(
        b"note,author\nre-export of 2024-01-02 pending,ops\n"
    )
    (folder / ".orders_tmp.csv").write_bytes(
        (",".join(columns) + "\n999999,1,1,1,2024-01-09,2024-01-09T").encode()
    )
    return expected


# events file -> record number -> (defect, reason or "" for a valid edge value)
_EVENT_DEFECTS: dict[str, dict[int, tuple[str, str]]] = {
    "events_2024-01-01.jsonl": {
        25: ("not json", MALFORMED),
        75: ("no session_id", MISSING),
    },
    "events_2024-01-02.jsonl": {
        40: ("array", MALFORMED),
        90: ("event_ts yesterday", TYPE),
    },
    "events_2024-01-03.ndjson.gz": {
        60: ("customer_id 12x", TYPE),
        61: ("customer_id '42'", ""),
    },
}


def _event_ts(day: dt.date, rec: int, rng: random.Random) -> str:
    if rec == 10:  # 04:45 UTC on the next day
        return f"{day.isoformat()}T23:45:00-05:00"
    if rec == 11:  # 22:30 UTC on the previous day
        return f"{day.isoformat()}T00:30:00+02:00"
    seconds = rng.randrange(86_400)
    stamp = f"{day.isoformat()}T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    if rec % 17 == 0:
        return stamp + "+02:00"
    if rec % 19 == 0:
        return f"{stamp}.{rng.randrange(1000):03d}Z"
    return stamp + "Z"


def _events(out: Path) -> list[_Expected]:
    rng = _rng("events")
    folder = out / "events"
    folder.mkdir(parents=True, exist_ok=True)
    expected: list[_Expected] = []
    for day_no, (name, defects) in enumerate(_EVENT_DEFECTS.items(), start=1):
        day = dt.date(2024, 1, day_no)
        exp = _Expected(f"events/{name}", "events", 300)
        lines: list[str] = []
        for rec in range(1, 301):
            if name == "events_2024-01-02.jsonl" and rec == 151:
                lines.append("")  # a blank line is not a record
            event_id = f"evt-{day:%Y%m%d}-{rec:04d}"
            obj: dict[str, object] = {
                "event_id": event_id,
                "event_ts": _event_ts(day, rec, rng),
                "customer_id": rng.randrange(1, 201),
                "session_id": f"sess-{rng.randrange(16**8):08x}",
                "event_type": rng.choice(EVENT_TYPES),
                "page_url": f"/products/{rng.randrange(1, 301)}",
                "properties": {
                    "ref": rng.choice(("email", "ads", "search")),
                    "n": rng.randrange(1, 6),
                },
            }
            if rec % 8 == 0:
                obj["customer_id"] = None
            elif rec % 13 == 0:
                del obj["customer_id"]
            if rec % 7 == 0:
                obj["device"] = rng.choice(("ios", "android", "web"))
            if rec % 50 == 0:
                obj["properties"] = {
                    "ref": "email",
                    "n": 2,
                    "tags": ["promo", "winter"],
                    "cart": {"items": 3},
                }
            line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
            if rec in defects:
                defect, reason = defects[rec]
                if defect == "not json":
                    line = "{broken"
                elif defect == "array":
                    line = json.dumps([event_id, "page_view"], separators=(",", ":"))
                else:
                    if defect == "no session_id":
                        del obj["session_id"]
                    elif defect == "event_ts yesterday":
                        obj["event_ts"] = "yesterday"
                    elif defect == "customer_id 12x":
                        obj["customer_id"] = "12x"
                    elif defect == "customer_id '42'":
                        obj["customer_id"] = "42"
                    line = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
                if reason:
                    exp.rejects[reason] += 1
            lines.append(line)
        data = ("\n".join(lines) + "\n").encode()
        (folder / name).write_bytes(_gzip(data) if name.endswith(".gz") else data)
        expected.append(exp)
    return expected


def _sensor_rows(month: int, rng: random.Random) -> dict[str, list[Any]]:
    start = dt.datetime(2024, month, 1, tzinfo=_UTC)
    span = (dt.datetime(2024, month + 1, 1, tzinfo=_UTC) - start) / 400
    cols: dict[str, list[Any]] = {c: [] for c in _columns("sensors")}
    for i in range(400):
        store = i % 5 + 1
        cols["store_id"].append(store)
        cols["sensor_id"].append(f"S{store:02d}-{'ab'[i // 5 % 2]}")
        cols["reading_ts"].append(
            start + span * i + dt.timedelta(seconds=rng.randrange(60))
        )
        cols["temperature_c"].append(round(rng.uniform(17.0, 26.0), 2))
        cols["humidity_pct"].append(round(rng.uniform(25.0, 70.0), 1))
        cols["co2_ppm"].append(rng.randrange(400, 1_400))
        cols["battery_v"].append(round(rng.uniform(2.8, 3.3), 3))
    return cols


def _sensors(out: Path) -> list[_Expected]:
    rng = _rng("sensors")
    folder = out / "sensors"
    folder.mkdir(parents=True, exist_ok=True)
    fields = {c.name: c.type for c in TABLES_BY_NAME["sensors"].columns}

    jan = _sensor_rows(1, rng)
    jan["humidity_pct"][99] = 120.0
    jan["sensor_id"][199] = None
    jan["temperature_c"][299] = None  # optional: a valid null
    pq.write_table(
        pa.table({c: pa.array(v, fields[c]) for c, v in jan.items()}),
        folder / "sensors_2024-01.parquet",
    )

    feb = _sensor_rows(2, rng)
    feb["humidity_pct"][49] = 120.0
    feb["sensor_id"][149] = None
    feb["store_id"][249] = 5_000_000_000
    firmware = [None if i % 4 == 3 else f"fw-1.{i % 3}.0" for i in range(400)]
    feb_types = {**fields, "store_id": pa.int64()}
    feb_table = pa.table({c: pa.array(v, feb_types[c]) for c, v in feb.items()})
    feb_table = feb_table.append_column("firmware", pa.array(firmware, pa.string()))
    pq.write_table(feb_table, folder / "sensors_2024-02.parquet")

    # Starts like Parquet but has no footer: unreadable.
    junk = b"PAR1" + rng.randbytes(2_048)
    (folder / "sensors_corrupt.parquet").write_bytes(junk)
    return [
        _Expected(
            "sensors/sensors_2024-01.parquet",
            "sensors",
            400,
            Counter({CONSTRAINT: 1, MISSING: 1}),
        ),
        _Expected(
            "sensors/sensors_2024-02.parquet",
            "sensors",
            400,
            Counter({CONSTRAINT: 1, MISSING: 1, TYPE: 1}),
            "store_id int64, firmware rescued",
        ),
        _Expected(
            "sensors/sensors_corrupt.parquet", "sensors", 1, Counter({UNREADABLE: 1})
        ),
    ]


_RETURN_REASONS = ("damaged", "wrong size", "not as described", "changed mind")


def _return_row(
    return_id: int, updated: dt.datetime, rng: random.Random
) -> dict[str, Any]:
    return_ts = updated - dt.timedelta(hours=rng.randrange(1, 72))
    return {
        "return_id": return_id,
        "order_id": rng.randrange(100_001, 101_800),
        "product_id": rng.randrange(1, 301),
        "return_ts": return_ts,
        "quantity": rng.randrange(1, 4),
        "reason": rng.choice(_RETURN_REASONS),
        "refund_amount": Decimal(rng.randrange(199, 29_999)).scaleb(-2),
        "status": rng.choice(("requested", "approved", "refunded")),
        "updated_at": updated,
        "op": "",
    }


def _iso(ts: dt.datetime) -> str:
    return ts.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _return_fields(row: dict[str, Any], columns: Sequence[str]) -> list[str]:
    out = []
    for c in columns:
        v = row.get(c, "")
        out.append(
            _iso(v) if isinstance(v, dt.datetime) else str(v) if v is not None else ""
        )
    return out


def _returns(out: Path) -> list[_Expected]:
    from deltalake import write_deltalake

    rng = _rng("returns")
    columns = _columns("returns")
    folder = out / "returns"
    folder.mkdir(parents=True, exist_ok=True)
    jan = dt.datetime(2024, 1, 1, tzinfo=_UTC)
    feb = dt.datetime(2024, 2, 1, tzinfo=_UTC)

    # returns_2024-01.csv: ids 1..140, then 10 more records for ids already in the file.
    first: list[dict[str, Any]] = []
    for rid in range(1, 141):
        row = _return_row(
            rid, jan + dt.timedelta(minutes=rng.randrange(28 * 24 * 60)), rng
        )
        row["op"] = "U" if rid % 10 == 0 else "I" if rid % 25 == 1 else ""
        first.append(row)
    by_id = {r["return_id"]: r for r in first}
    later = dt.timedelta(hours=6)
    for rid, delta in (
        (3, later),
        (8, later),
        (15, -later),
        (21, dt.timedelta(0)),
        (30, later),
        (31, later),
        (32, later),
        (33, later),
        (34, later),
        (35, later),
    ):
        row = dict(by_id[rid])
        row["updated_at"] = by_id[rid]["updated_at"] + delta
        row["status"] = "refunded" if rid != 21 else "tie-later-record-wins"
        row["op"] = "U"
        first.append(row)
    first[76]["quantity"] = ""  # return_id 77: MISSING_REQUIRED
    (folder / "returns_2024-01.csv").write_bytes(
        _csv_bytes(columns, [_return_fields(r, columns) for r in first])
    )

    # returns_2024-02.csv adds refund_method: new ids 141..210, updates of 40..68, one tombstone.
    evolved = [*columns[:7], "refund_method", *columns[7:]]
    second: list[dict[str, Any]] = []
    for rid in range(141, 211):
        second.append(
            _return_row(
                rid, feb + dt.timedelta(minutes=rng.randrange(14 * 24 * 60)), rng
            )
        )
    for rid in range(40, 69):
        row = dict(by_id[rid])
        row["updated_at"] = feb + dt.timedelta(minutes=rng.randrange(14 * 24 * 60))
        row["status"] = "refunded"
        row["op"] = "U" if rid % 2 else ""
        second.append(row)
    tomb = dict(by_id[10])
    tomb["updated_at"] = feb + dt.timedelta(days=14)
    tomb["op"] = "D"
    second.append(tomb)
    for i, row in enumerate(second):
        row["refund_method"] = (
            "" if i % 6 == 5 else rng.choice(("card", "voucher", "bank_transfer"))
        )
    second[49]["op"] = "X"  # return_id 190: CONSTRAINT_VIOLATION
    (folder / "returns_2024-02.csv").write_bytes(
        _csv_bytes(evolved, [_return_fields(r, evolved) for r in second])
    )

    # Delta source of changes, one commit per version.
    changes = folder / "changes"
    if changes.exists():
        shutil.rmtree(changes)
    schema = pa.schema(
        [pa.field(c.name, c.type) for c in TABLES_BY_NAME["returns"].columns]
    )
    mid_feb = dt.datetime(2024, 2, 16, tzinfo=_UTC)
    v0 = [
        _return_row(
            rid, mid_feb + dt.timedelta(minutes=rng.randrange(4 * 24 * 60)), rng
        )
        for rid in range(301, 351)
    ]
    for row in v0:
        row["op"] = "I"
    v0_by_id = {r["return_id"]: r for r in v0}
    mar1 = dt.datetime(2024, 3, 1, 9, 0, tzinfo=_UTC)
    v1: list[dict[str, Any]] = []
    for k, rid in enumerate(range(301, 308)):
        row = dict(
            v0_by_id[rid],
            updated_at=mar1 + dt.timedelta(minutes=k),
            op="U",
            status="refunded",
        )
        v1.append(row)
    for k, (_rid, base) in enumerate(
        ((5, by_id[5]), (45, by_id[45]), (320, v0_by_id[320]))
    ):
        v1.append(
            dict(base, updated_at=mar1 + dt.timedelta(hours=1, minutes=k), op="D")
        )
    v1.append(_return_row(9999, mar1 + dt.timedelta(hours=2), rng) | {"op": "D"})
    v2 = [
        dict(
            by_id[5],
            updated_at=dt.datetime(2024, 3, 10, 12, 0, tzinfo=_UTC),
            op="U",
            status="reopened",
        )
    ]
    v3 = [
        dict(
            v0_by_id[302],
            updated_at=dt.datetime(2024, 3, 15, 8, 0, tzinfo=_UTC),
            op="U",
            status="closed",
        ),
        # Older than v1's update of 303: it loses the merge.
        dict(
            v0_by_id[303],
            updated_at=dt.datetime(2024, 2, 25, 8, 0, tzinfo=_UTC),
            op="U",
            status="stale",
        ),
    ]
    expected = [
        _Expected("returns/returns_2024-01.csv", "returns", 150, Counter({MISSING: 1})),
        _Expected(
            "returns/returns_2024-02.csv",
            "returns",
            100,
            Counter({CONSTRAINT: 1}),
            "adds refund_method",
        ),
    ]
    for version, batch in enumerate((v0, v1, v2, v3)):
        data = pa.Table.from_pylist(batch, schema=schema)
        write_deltalake(
            str(changes),
            data,
            mode="append",
            configuration={"delta.enableChangeDataFeed": "true"}
            if version == 0
            else None,
        )
        expected.append(_Expected(f"returns/changes@v{version}", "returns", len(batch)))
    return expected


def _unmatched(out: Path) -> list[_Expected]:
    (out / "inventory_2024-01-01.csv").write_bytes(
        b"store_id,product_id,on_hand\n1,1,12\n1,2,0\n2,1,7\n"
    )
    return [_Expected("inventory_2024-01-01.csv", None, 0, note="matches no table")]


def _write_bundled(out: Path) -> list[_Expected]:
    out.mkdir(parents=True, exist_ok=True)
    expected: list[_Expected] = []
    for writer in (
        _customers,
        _products,
        _stores,
        _orders,
        _events,
        _sensors,
        _returns,
        _unmatched,
    ):
        expected.extend(writer(out))
    return expected


def write_bundled_sample(out: Path) -> None:
    """Write the bundled sample (every table and format, with bad records) into ``out``.

    Files it writes are overwritten, and the Delta source ``returns/changes`` is recreated;
    other files in ``out`` are left alone.
    """
    _write_bundled(out)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def _format_rejects(rejects: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(rejects.items()) if v) or "none"


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bronze_assets.sample",
        description="Write the bundled sample, or with --rows large data of the same shape.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="raw root to write into"
    )
    parser.add_argument("--rows", type=int, help="rows per table (large mode)")
    parser.add_argument(
        "--tables",
        help=f"comma-separated, from {','.join(LARGE_TABLES)} (default orders)",
    )
    parser.add_argument("--files", type=int, help="files per table (default 1)")
    parser.add_argument(
        "--bad-fraction", type=float, help="fraction of rows to corrupt (default 0)"
    )
    parser.add_argument("--seed", type=int, help="random seed (default 7)")
    args = parser.parse_args(argv)

    if args.rows is None:
        extras = [
            n
            for n in ("tables", "files", "bad_fraction", "seed")
            if getattr(args, n) is not None
        ]
        if extras:
            parser.error(f"--{extras[0].replace('_', '-')} needs --rows")
        started = time.perf_counter()
        expected = _write_bundled(args.out)
        for exp in expected:
            table = exp.table or "(unmatched)"
            print(
                f"{exp.src_path:45} {table:10} records {exp.records:4}  rejects: "
                f"{_format_rejects(exp.rejects)}{'  (' + exp.note + ')' if exp.note else ''}"
            )
        print(
            f"bundled sample written to {args.out} in {time.perf_counter() - started:.1f}s"
        )
        return 0

    tables = tuple(t.strip() for t in (args.tables or "orders").split(",") if t.strip())
    bad_fraction = 0.0 if args.bad_fraction is None else args.bad_fraction
    started = time.perf_counter()
    try:
        paths = write_large(
            args.out,
            rows=args.rows,
            tables=tables,
            files=1 if args.files is None else args.files,
            bad_fraction=bad_fraction,
            seed=7 if args.seed is None else args.seed,
        )
    except ValueError as exc:
        parser.error(str(exc))
    elapsed = time.perf_counter() - started
    for table in dict.fromkeys(tables):
        counts = corruption_counts(table, rows=args.rows, bad_fraction=bad_fraction)
        print(f"{table}: {args.rows} rows, corrupted: {_format_rejects(counts)}")
    size = sum(p.stat().st_size for p in paths)
    print(
        f"{len(paths)} file(s), {size / 1e6:.1f} MB written to {args.out} in {elapsed:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


RETURNS_HEADER = "return_id,order_id,product_id,return_ts,quantity,reason,refund_amount,status,updated_at,op"


def _returns_lines(rng: np.random.Generator, ids: np.ndarray, day: np.ndarray, op: pa.Array) -> pa.Array:
    n = len(ids)
    secs = rng.integers(0, 86_400, n)
    stamp = _join(_date_str(day), "T", _time_str(secs), "Z")
    reasons = _pick(("damaged", "late", "changed mind", "not as described"), rng.integers(0, 4, n))
    statuses = _pick(("requested", "approved", "refunded", "closed"), rng.integers(0, 4, n))
    return _join(
        _str(ids), _str(rng.integers(100_000, 10_000_000, n)), _str(rng.integers(1, 5_000, n)), stamp,
        _str(rng.integers(1, 5, n)), reasons, _money_str(rng.integers(100, 50_000, n)), statuses, stamp, op,
        sep=",",
    )  # fmt: skip


def write_returns_large(out: Path, *, rows: int, changes: int, seed: int = 11) -> tuple[Path, Path]:
    """Two returns CSVs under ``out/returns/``: ``rows`` returns (ids 1..rows), then ``changes``
    records a day later: updates of existing ids (one in ten a tombstone) and one in ten a new
    id. For measuring a MERGE of ``changes`` records into a ``rows``-row table."""
    rng = np.random.default_rng(seed)
    folder = out / "returns"
    folder.mkdir(parents=True, exist_ok=True)
    base, delta = folder / f"returns_{rows}.csv", folder / f"returns_{rows}_changes_{changes}.csv"
    step = 1_000_000
    with open(base, "wb") as fh:
        fh.write((RETURNS_HEADER + "\n").encode())
        for start in range(0, rows, step):
            ids = np.arange(start + 1, min(rows, start + step) + 1)
            _write_lines(fh, _returns_lines(rng, ids, rng.integers(0, 300, len(ids)), pa.array([""] * len(ids))))
    new = changes // 10
    ids = np.concatenate([rng.choice(rows, changes - new, replace=False) + 1, np.arange(rows + 1, rows + new + 1)])
    ops = np.where(rng.random(changes) < 0.1, "D", "U")
    with open(delta, "wb") as fh:
        fh.write((RETURNS_HEADER + "\n").encode())
        _write_lines(fh, _returns_lines(rng, ids, np.full(changes, 330), pa.array(ops.tolist())))
    return base, delta
