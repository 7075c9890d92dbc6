"""Shared helpers: build small raw files in ``tmp_path``, run an ingestion, read every output back.

Each test writes the raw files it needs (a dict of relative path -> bytes or text), runs the real
ingestion against a lake and a manifest under ``tmp_path``, and asserts on what was written: the
Parquet dataset, the Delta table, the rejects CSVs and the manifest.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from bronze_assets.ingest import Outcome, RunResult, Settings, run
from schemas.schemas import TABLES_BY_NAME

Files = Mapping[str, bytes | str]
SORT_KEYS = [("src_filename", "ascending"), ("src_row_number", "ascending")]
UTC = dt.UTC


# ------------------------------------------------------------------------------------------
# Building raw files
# ------------------------------------------------------------------------------------------


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A CSV document (LF terminators, minimal quoting) of ``header`` and ``rows``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow(["" if v is None else v for v in row])
    return buf.getvalue()


def jsonl_text(records: Iterable[object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def gz(data: bytes | str) -> bytes:
    return gzip.compress(data.encode() if isinstance(data, str) else data, mtime=0)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def xlsx_bytes(rows: Sequence[Sequence[object]]) -> bytes:
    """An XLSX workbook whose first sheet holds ``rows`` (the first row is the header)."""
    import openpyxl

    wb = openpyxl.Workbook()
    ws = wb.active
    assert ws is not None
    for row in rows:
        ws.append(list(row))
    sink = io.BytesIO()
    wb.save(sink)
    return sink.getvalue()


# Valid records of each table, to be overridden field by field in tests.

ORDER_COLUMNS = (
    "order_id", "customer_id", "store_id", "product_id", "order_dt", "order_ts", "quantity",
    "unit_price", "discount_pct", "currency", "status", "payment_method",
)  # fmt: skip


def order(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "order_id": 1,
        "customer_id": 10,
        "store_id": 3,
        "product_id": 100,
        "order_dt": "2024-01-02",
        "order_ts": "2024-01-02T10:00:00Z",
        "quantity": 2,
        "unit_price": "9.99",
        "discount_pct": "5.00",
        "currency": "EUR",
        "status": "PAID",
        "payment_method": "card",
    }
    base.update(overrides)
    return base


def orders_csv(*records: Mapping[str, object], columns: Sequence[str] | None = None) -> str:
    """An orders CSV of ``records`` (dicts from ``order()``), with ``columns`` as the header."""
    cols = list(columns) if columns else list(records[0].keys()) if records else list(ORDER_COLUMNS)
    return csv_text(cols, ([r.get(c) for c in cols] for r in records))


PRODUCT_COLUMNS = (
    "product_id", "sku", "product_name", "category", "unit_price", "currency", "is_discontinued", "updated_at",
)  # fmt: skip


def product(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "product_id": 1,
        "sku": "SKU-1",
        "product_name": "Widget",
        "category": "tools",
        "unit_price": "12.50",
        "currency": "EUR",
        "is_discontinued": "false",
        "updated_at": "2024-01-01T00:00:00Z",
    }
    base.update(overrides)
    return base


def products_csv(*records: Mapping[str, object]) -> str:
    cols = list(records[0].keys())
    return csv_text(cols, ([r.get(c) for c in cols] for r in records))


def event(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "event_id": "e1",
        "event_ts": "2024-01-02T10:00:00Z",
        "customer_id": 10,
        "session_id": "s1",
        "event_type": "page_view",
        "page_url": "/home",
    }
    base.update(overrides)
    return base


def store(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "store_id": 1,
        "store_name": "Central",
        "city": "Lyon",
        "region": "ARA",
        "opened_dt": "2020-05-01",
        "square_meters": 850,
    }
    base.update(overrides)
    return base


SENSOR_SCHEMA = pa.schema(
    [
        ("store_id", pa.int32()),
        ("sensor_id", pa.string()),
        ("reading_ts", pa.timestamp("us", tz="UTC")),
        ("temperature_c", pa.float64()),
        ("humidity_pct", pa.float64()),
        ("co2_ppm", pa.int32()),
        ("battery_v", pa.float64()),
    ]
)


def _nan_as_text(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows comparable with ``==`` when they hold NaN (which equals nothing, itself included)."""
    return [{k: "NaN" if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]


def sensors_parquet(rows: Sequence[Mapping[str, object]], schema: pa.Schema = SENSOR_SCHEMA) -> bytes:
    """A Parquet file of sensor readings; missing fields of a row are null."""
    return parquet_bytes(pa.Table.from_pylist([dict(r) for r in rows], schema=schema))


def sensor(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "store_id": 1,
        "sensor_id": "s-1",
        "reading_ts": dt.datetime(2024, 1, 2, 10, 0, tzinfo=UTC),
        "temperature_c": 21.5,
        "humidity_pct": 40.0,
        "co2_ppm": 420,
        "battery_v": 3.3,
    }
    base.update(overrides)
    return base


CUSTOMER_HEADER = (
    "customer_id", "email", "first_name", "last_name", "country_code", "signup_dt", "is_active", "loyalty_tier",
)  # fmt: skip


def customer_row(**overrides: object) -> list[object]:
    base: dict[str, object] = {
        "customer_id": 1,
        "email": "a@example.com",
        "first_name": "Ann",
        "last_name": "Lee",
        "country_code": "FR",
        "signup_dt": dt.datetime(2023, 5, 4),
        "is_active": True,
        "loyalty_tier": "gold",
    }
    base.update(overrides)
    return [base[c] for c in CUSTOMER_HEADER]


# ------------------------------------------------------------------------------------------
# Running and reading back
# ------------------------------------------------------------------------------------------


def write_files(raw: Path, files: Files) -> None:
    for rel, content in files.items():
        path = raw / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        else:
            path.write_bytes(content)


def partitioning(table: str) -> ds.Partitioning | None:
    """The hive partitioning of ``table`` typed as declared (so both outputs compare equal)."""
    t = TABLES_BY_NAME[table]
    if not t.partition_by:
        return None
    types = {c.name: c.type for c in t.columns}
    types |= {d.name: (pa.date32() if d.kind == "utc_date" else pa.string()) for d in t.derived}
    return ds.partitioning(pa.schema([(c, types[c]) for c in t.partition_by]), flavor="hive")


class RawFiles(dict[str, bytes | str]):
    """The raw files of a lake shared by many tests, each test adding its own sources.

    ``add`` refuses content already added under another path: two byte-identical sources of a table
    would make the later one a ``duplicate`` that loads nothing.
    """

    def add(self, src_path: str, content: bytes | str) -> str:
        data = content.encode() if isinstance(content, str) else content
        for other, existing in self.items():
            other_data = existing.encode() if isinstance(existing, str) else existing
            assert other == src_path or other_data != data, f"{src_path} has the same content as {other}"
        self[src_path] = content
        return src_path


@dataclass
class LakeRun:
    """A raw folder, a lake and a manifest under one temporary folder, and the last run's result.

    The readers (``parquet``, ``delta``, ``rows``, ``rejects``) are cached until the next run, so
    that tests sharing one lake read it once.
    """

    root: Path
    result: RunResult = field(init=False)
    results: list[RunResult] = field(default_factory=list)
    _cache: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def manifest(self) -> Path:
        return self.root / "m.duckdb"

    def settings(self, **overrides: Any) -> Settings:
        return Settings(raw=self.raw, lake=self.lake, manifest=self.manifest, **overrides)

    def run(self, files: Files | None = None, **overrides: Any) -> RunResult:
        """Write ``files`` (if any) under the raw folder, then ingest."""
        self.raw.mkdir(parents=True, exist_ok=True)
        if files:
            write_files(self.raw, files)
        self._cache.clear()
        self.result = run(self.settings(**overrides))
        self.results.append(self.result)
        return self.result

    def _cached(self, kind: str, table: str, read: Callable[[], Any]) -> Any:
        key = (kind, table)
        if key not in self._cache:
            self._cache[key] = read()
        return self._cache[key]

    # -- outcomes ---------------------------------------------------------------------------

    @property
    def outcomes(self) -> dict[str, Outcome]:
        return {o.src_path: o for o in self.result.outcomes}

    def outcome(self, src_path: str) -> Outcome:
        found = self.outcomes.get(src_path)
        assert found is not None, f"{src_path} not in the run's outcomes: {sorted(self.outcomes)}"
        return found

    # -- outputs ----------------------------------------------------------------------------

    def parquet_dir(self, table: str) -> Path:
        return self.lake / "bronze" / "parquet" / table

    def delta_dir(self, table: str) -> Path:
        return self.lake / "bronze" / "delta" / table

    def parquet(self, table: str) -> pa.Table:
        """The Parquet dataset of ``table`` (hive partitions typed as declared), sorted."""

        def read() -> pa.Table:
            path = self.parquet_dir(table)
            if not path.exists():
                return pa.table({})
            data = ds.dataset(path, format="parquet", partitioning=partitioning(table)).to_table()
            return data.sort_by(SORT_KEYS) if data.num_rows else data

        return self._cached("parquet", table, read)

    def delta(self, table: str) -> pa.Table:
        """The Delta table of ``table``, sorted."""

        def read() -> pa.Table:
            path = self.delta_dir(table)
            if not (path / "_delta_log").is_dir():
                return pa.table({})
            data = DeltaTable(str(path)).to_pyarrow_table()
            return data.sort_by(SORT_KEYS) if data.num_rows else data

        return self._cached("delta", table, read)

    def rows(self, table: str, src_path: str | None = None) -> list[dict[str, Any]]:
        """The rows of ``table`` (of one source when ``src_path`` is given) as dicts, sorted by
        (src_filename, src_row_number); Parquet and Delta are checked to hold the same rows."""

        def read() -> list[dict[str, Any]]:
            parquet = self.parquet(table)
            delta = self.delta(table)
            assert parquet.num_rows == delta.num_rows
            if parquet.num_rows:
                assert _nan_as_text(parquet.select(delta.column_names).to_pylist()) == _nan_as_text(delta.to_pylist())
            return parquet.to_pylist()

        everything: list[dict[str, Any]] = self._cached("rows", table, read)
        return [r for r in everything if src_path is None or r["src_filename"] == src_path]

    def rejects(self, table: str, src_path: str | None = None) -> list[dict[str, Any]]:
        """The reject rows of ``table`` (of one source when ``src_path`` is given), read from every
        CSV file of its rejects folder, sorted; src_row_number as int (None when empty, as for a
        whole unreadable file)."""

        def read() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            folder = self.lake / "_rejects" / table
            for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
                with open(path, newline="", encoding="utf-8") as fh:
                    for row in csv.DictReader(fh):
                        number = row["src_row_number"]
                        row["src_row_number"] = int(number) if number else None
                        out.append(row)
            return sorted(out, key=lambda r: (r["src_filename"], r["src_row_number"] or 0))

        everything: list[dict[str, Any]] = self._cached("rejects", table, read)
        return [r for r in everything if src_path is None or r["src_filename"] == src_path]

    def manifest_rows(self) -> dict[str, dict[str, Any]]:
        """``manifest_processed_files`` as {src_path: row}."""

        def read() -> dict[str, dict[str, Any]]:
            if not self.manifest.exists():
                return {}
            with duckdb.connect(str(self.manifest), read_only=True) as con:
                cur = con.execute("SELECT * FROM manifest_processed_files")
                names = [d[0] for d in cur.description]
                return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}

        return self._cached("manifest", "", read)


def shared_lake(tmp_path_factory: pytest.TempPathFactory, name: str, files: Files, **overrides: Any) -> LakeRun:
    """One lake for a whole test module: write ``files`` and ingest them once."""
    lr = LakeRun(tmp_path_factory.mktemp(name))
    lr.run(files, **overrides)
    return lr


@pytest.fixture
def lake_run(tmp_path: Path) -> Callable[..., LakeRun]:
    """``lake_run(files, **settings)``: write ``files`` under a fresh raw folder and ingest them."""

    def go(files: Files, **overrides: Any) -> LakeRun:
        lr = LakeRun(tmp_path)
        lr.run(files, **overrides)
        return lr

    return go


def reasons_by_row(rejects: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    """{src_row_number: reason_code} of one source's rejects."""
    return {r["src_row_number"]: r["reason_code"] for r in rejects}


def assert_accounted(lr: LakeRun, src_path: str, records: int) -> None:
    """``records read = rows written + rows rejected`` for ``src_path``, in the outcome, the
    outputs, the rejects and the manifest."""
    o = lr.outcome(src_path)
    assert o.rows + o.reject_count == records, (o.rows, dict(o.rejects))
    assert len(lr.rows(o.table, src_path)) == o.rows
    assert len(lr.rejects(o.table, src_path)) == o.reject_count
    m = lr.manifest_rows()[src_path]
    assert (m["row_count"], m["reject_count"]) == (o.rows, o.reject_count)
