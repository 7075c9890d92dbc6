"""The declared bronze tables, as data.

Adding a table is a change to this file only (plus its raw data): append a ``Table`` to
``TABLES``. Everything else (discovery, validation, outputs, Dagster assets and checks) is
generated from this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

WriteMode = Literal["append", "upsert"]
ValidationMode = Literal["quarantine", "strict"]
NewColumnPolicy = Literal["rescue", "add"]
DeriveKind = Literal["utc_date", "utc_month"]

TIMESTAMP = pa.timestamp("us", tz="UTC")
MONEY = pa.decimal128(10, 2)


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    required: bool = False


@dataclass(frozen=True)
class Derived:
    """A column computed from another one (``utc_date``: date32, ``utc_month``: 'YYYY-MM')."""

    name: str
    source: str
    kind: DeriveKind


@dataclass(frozen=True)
class Range:
    """``low <= column <= high`` (or strict when ``*_inclusive`` is False); None is unbounded."""

    column: str
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True


@dataclass(frozen=True)
class OneOf:
    """The value is one of ``values`` (case-sensitive)."""

    column: str
    values: tuple[str, ...]


Constraint = Range | OneOf


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    partition_by: tuple[str, ...] = ()
    derived: tuple[Derived, ...] = ()
    constraints: tuple[Constraint, ...] = ()
    write_mode: WriteMode = "append"
    key: tuple[str, ...] = ()
    order_by: str | None = None
    op_column: str | None = None
    validation_mode: ValidationMode = "quarantine"
    max_reject_fraction: float = 0.05
    new_columns: NewColumnPolicy = "rescue"
    description: str = ""

    def column(self, name: str) -> Column:
        for col in self.columns:
            if col.name == name:
                return col
        raise KeyError(name)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.required)


TABLES: tuple[Table, ...] = (
    Table(
        name="customers",
        description="Customer master data (XLSX exports).",
        columns=(
            Column("customer_id", pa.int64(), required=True),
            Column("email", pa.string(), required=True),
            Column("first_name", pa.string()),
            Column("last_name", pa.string()),
            Column("country_code", pa.string()),
            Column("signup_dt", pa.date32()),
            Column("is_active", pa.bool_()),
            Column("loyalty_tier", pa.string()),
        ),
    ),
    Table(
        name="products",
        description="Product catalogue (CSV).",
        columns=(
            Column("product_id", pa.int64(), required=True),
            Column("sku", pa.string(), required=True),
            Column("product_name", pa.string(), required=True),
            Column("category", pa.string()),
            Column("unit_price", MONEY, required=True),
            Column("currency", pa.string()),
            Column("is_discontinued", pa.bool_()),
            Column("updated_at", TIMESTAMP),
        ),
        constraints=(Range("unit_price", low=0),),
    ),
    Table(
        name="stores",
        description="Stores (JSON array).",
        columns=(
            Column("store_id", pa.int32(), required=True),
            Column("store_name", pa.string(), required=True),
            Column("city", pa.string()),
            Column("region", pa.string()),
            Column("opened_dt", pa.date32()),
            Column("square_meters", pa.int32()),
        ),
    ),
    Table(
        name="orders",
        description="Order lines (CSV), one file per day or batch.",
        columns=(
            Column("order_id", pa.int64(), required=True),
            Column("customer_id", pa.int64(), required=True),
            Column("store_id", pa.int32(), required=True),
            Column("product_id", pa.int64(), required=True),
            Column("order_dt", pa.date32(), required=True),
            Column("order_ts", TIMESTAMP, required=True),
            Column("quantity", pa.int32(), required=True),
            Column("unit_price", MONEY, required=True),
            Column("discount_pct", pa.decimal128(5, 2)),
            Column("currency", pa.string(), required=True),
            Column("status", pa.string(), required=True),
            Column("payment_method", pa.string()),
        ),
        partition_by=("order_dt",),
        constraints=(
            Range("quantity", low=0, low_inclusive=False),
            Range("unit_price", low=0),
            Range("discount_pct", low=0, high=100),
            OneOf("status", ("PLACED", "PAID", "SHIPPED", "DELIVERED", "CANCELLED")),
        ),
    ),
    Table(
        name="events",
        description="Clickstream events (JSONL).",
        columns=(
            Column("event_id", pa.string(), required=True),
            Column("event_ts", TIMESTAMP, required=True),
            Column("customer_id", pa.int64()),
            Column("session_id", pa.string(), required=True),
            Column("event_type", pa.string(), required=True),
            Column("page_url", pa.string()),
            Column("properties", pa.string()),
        ),
        derived=(Derived("event_dt", source="event_ts", kind="utc_date"),),
        partition_by=("event_dt",),
    ),
    Table(
        name="sensors",
        description="Store sensor readings (Parquet).",
        columns=(
            Column("store_id", pa.int32(), required=True),
            Column("sensor_id", pa.string(), required=True),
            Column("reading_ts", TIMESTAMP, required=True),
            Column("temperature_c", pa.float64()),
            Column("humidity_pct", pa.float64()),
            Column("co2_ppm", pa.int32()),
            Column("battery_v", pa.float64()),
        ),
        derived=(Derived("reading_month", source="reading_ts", kind="utc_month"),),
        partition_by=("store_id", "reading_month"),
        constraints=(Range("humidity_pct", low=0, high=100),),
    ),
    Table(
        name="returns",
        description="Returns (CSV files and a Delta source of changes), upserted on return_id.",
        columns=(
            Column("return_id", pa.int64(), required=True),
            Column("order_id", pa.int64(), required=True),
            Column("product_id", pa.int64(), required=True),
            Column("return_ts", TIMESTAMP, required=True),
            Column("quantity", pa.int32(), required=True),
            Column("reason", pa.string()),
            Column("refund_amount", MONEY),
            Column("status", pa.string()),
            Column("updated_at", TIMESTAMP, required=True),
            Column("op", pa.string()),
        ),
        constraints=(OneOf("op", ("I", "U", "D")),),
        write_mode="upsert",
        key=("return_id",),
        order_by="updated_at",
        op_column="op",
        new_columns="add",
    ),
)

TABLES_BY_NAME: dict[str, Table] = {t.name: t for t in TABLES}
