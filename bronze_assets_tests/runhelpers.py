"""Helpers for the run-level tests: small raw inputs, running the pipeline, and reading back its effects.

Everything here works on explicit paths (a test's ``tmp_path``); nothing touches the working directory.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from deltalake import DeltaTable

from bronze_assets.ingest import RunResult, Settings, run

REPO_ROOT = Path(__file__).resolve().parents[1]

ORDERS_HEADER = (
    "order_id,customer_id,store_id,product_id,order_dt,order_ts,quantity,unit_price,"
    "discount_pct,currency,status,payment_method"
)
PRODUCTS_HEADER = "product_id,sku,product_name,category,unit_price,currency,is_discontinued,updated_at"


def order_line(
    order_id: int,
    *,
    day: str = "2024-01-01",
    customer_id: str | None = None,
    quantity: str = "1",
    unit_price: str = "9.99",
    status: str = "PAID",
) -> str:
    """One orders CSV record; pass ``quantity='x'`` (TYPE_MISMATCH), ``quantity='0'``
    (CONSTRAINT_VIOLATION) or ``customer_id=''`` (MISSING_REQUIRED) to make it bad."""
    cust = str(1000 + order_id) if customer_id is None else customer_id
    return (
        f"{order_id},{cust},1,{order_id % 7 + 1},{day},{day}T10:{order_id % 60:02d}:00Z,"
        f"{quantity},{unit_price},0,EUR,{status},card"
    )


def orders_csv(
    ids: range | list[int], *, day: str = "2024-01-01", bad: dict[int, dict[str, str]] | None = None
) -> bytes:
    """An orders CSV: one good record per id, except ids in ``bad`` (keyword overrides for ``order_line``)."""
    bad = bad or {}
    lines = [ORDERS_HEADER] + [order_line(i, day=day, **bad.get(i, {})) for i in ids]
    return ("\n".join(lines) + "\n").encode()


def products_csv(ids: range | list[int], *, bad_price: tuple[int, ...] = ()) -> bytes:
    lines = [PRODUCTS_HEADER]
    for i in ids:
        price = "-1.00" if i in bad_price else f"{i}.50"
        lines.append(f"{i},SKU-{i:04d},Product {i},misc,{price},EUR,false,2024-01-01T00:00:00Z")
    return ("\n".join(lines) + "\n").encode()


def write(path: Path, data: bytes, *, age_s: float | None = 10.0) -> Path:
    """Write ``data`` at ``path`` (parents created). ``age_s`` back-dates the modification time so a
    rewrite always has a new mtime, whatever the file system's clock resolution."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if age_s is not None:
        t = dt.datetime.now().timestamp() - age_s
        os.utime(path, (t, t))
    return path


@dataclass(frozen=True)
class Env:
    """A hermetic raw root, lake and manifest under one temporary folder."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "data_raw"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def manifest(self) -> Path:
        return self.root / "duckdb" / "warehouse.duckdb"

    def settings(self, **overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "raw": self.raw,
            "lake": self.lake,
            "manifest": self.manifest,
            "dry_run": False,
            "tables": None,
            "validation_mode": None,
            "reprocess": (),
            "min_file_age": 0,
        }
        base.update(overrides)
        return Settings(**base)

    def run(self, **overrides: Any) -> RunResult:
        return run(self.settings(**overrides))

    def cli_args(self, *extra: str) -> list[str]:
        return ["--raw", str(self.raw), "--lake", str(self.lake), "--manifest", str(self.manifest), *extra]

    # --- reading the effects back -------------------------------------------------------------

    def parquet_dir(self, table: str) -> Path:
        return self.lake / "bronze" / "parquet" / table

    def delta_dir(self, table: str) -> Path:
        return self.lake / "bronze" / "delta" / table

    def rejects_dir(self, table: str) -> Path:
        return self.lake / "_rejects" / table

    def parquet(self, table: str) -> pa.Table:
        return parquet_rows(self.parquet_dir(table))

    def delta(self, table: str) -> pa.Table:
        return DeltaTable(str(self.delta_dir(table))).to_pyarrow_table()

    def delta_version(self, table: str) -> int | None:
        path = self.delta_dir(table)
        if not (path / "_delta_log").is_dir():
            return None
        return DeltaTable(str(path)).version()

    def delta_versions(self) -> dict[str, int | None]:
        root = self.lake / "bronze" / "delta"
        if not root.is_dir():
            return {}
        return {p.name: self.delta_version(p.name) for p in sorted(root.iterdir())}

    def rejects_files(self, table: str) -> list[Path]:
        d = self.rejects_dir(table)
        return sorted(d.rglob("*.csv")) if d.is_dir() else []

    def rejects(self, table: str) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for path in self.rejects_files(table):
            rows.extend(read_rejects(path))
        return rows

    def manifest_rows(self) -> dict[str, dict[str, Any]]:
        return {r["src_path"]: r for r in query(self.manifest, "SELECT * FROM manifest_processed_files")}

    def schema_history(self) -> list[dict[str, Any]]:
        return query(self.manifest, "SELECT * FROM schema_history ORDER BY detected_at, src_path")

    def watermarks(self) -> dict[str, dict[str, Any]]:
        return {r["source_path"]: r for r in query(self.manifest, "SELECT * FROM watermarks")}


def parquet_rows(directory: Path) -> pa.Table:
    """The rows of a hive-partitioned Parquet dataset (partition values come from folder names)."""
    return pads.dataset(str(directory), format="parquet", partitioning="hive").to_table()


def read_rejects(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(io.StringIO(fh.read())))


def query(db: Path, sql: str) -> list[dict[str, Any]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        cur = con.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        con.close()


def snapshot(root: Path, *, folders: bool = False) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (and every folder, when ``folders``): relative path -> (size, mtime_ns)."""
    out: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        if folders:
            for name in dirnames:
                out[(Path(dirpath) / name).relative_to(root).as_posix() + "/"] = (0, 0)
        for name in filenames:
            p = Path(dirpath) / name
            st = p.stat()
            out[p.relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
    return out


def pairs(table: pa.Table) -> list[tuple[str, int]]:
    if "src_filename" not in table.column_names:  # a table folder with no data file yet
        return []
    return list(zip(table.column("src_filename").to_pylist(), table.column("src_row_number").to_pylist(), strict=True))


def rows_of(table: pa.Table, src_filename: str) -> pa.Table:
    mask = pc.equal(table.column("src_filename"), src_filename)
    return table.filter(mask)


def count_by(table: pa.Table, column: str) -> Counter[Any]:
    return Counter(table.column(column).to_pylist())


def by_src(result: RunResult) -> dict[str, Any]:
    return {o.src_path: o for o in result.outcomes}


def cli(
    args: list[str], *, cwd: Path | None = None, timeout: float = 120, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m bronze_assets ARGS`` as a subprocess, with the repository importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "bronze_assets", *args],
        cwd=cwd or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def summary_line(stdout: str, table: str) -> list[str]:
    """The tokens of ``table``'s line in the first (this run's) block of the summary."""
    for line in stdout.splitlines():
        if not line.strip():
            break
        tokens = line.split()
        if tokens and tokens[0] == table:
            return tokens
    raise AssertionError(f"no summary line for {table!r} in:\n{stdout}")


def summary_total_rows(stdout: str) -> int:
    """Rows written according to the ``total`` line of this run's summary block."""
    tokens = summary_line(stdout, "total")
    return int(tokens[1].replace(",", ""))
