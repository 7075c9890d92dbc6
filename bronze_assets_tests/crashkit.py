"""The crash-injection kit: scenarios on the bundled sample, a process killed (SIGKILL) at a named
step or after a random delay, and the state of a lake reduced to what one clean run must equal.

A scenario is a raw folder in two steps: ``before`` (ingested cleanly first, or nothing) and
``during`` (the changes that arrive before the run that is killed). The reference is one clean
run of the whole; a trial kills the run of ``during`` and then runs again to completion.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable, write_deltalake

from bronze_assets.ingest import Settings, run
from bronze_assets_tests.dagster_helpers import Paths
from schemas.schemas import TABLES, TABLES_BY_NAME

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data_raw"
UTC = dt.UTC


@dataclass(frozen=True)
class Lake(Paths):
    """A raw folder, lake and manifest (the layout of ``Paths``), run in process or by the CLI."""

    def settings(self, **overrides: Any) -> Settings:
        return Settings(raw=self.raw, lake=self.lake, manifest=self.manifest, **overrides)

    def cli(self) -> list[str]:
        return [sys.executable, "-m", "bronze_assets", "--raw", str(self.raw), "--lake", str(self.lake),
                "--manifest", str(self.manifest), "--quiet"]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Scenarios
# ------------------------------------------------------------------------------------------


def sample_raw(raw: Path) -> None:
    shutil.copytree(SAMPLE, raw, dirs_exist_ok=True)


def incremental_changes(raw: Path) -> None:
    """What arrives after the sample was ingested: a new orders file, a changed one (so that
    shared files are rewritten without its rows), a copy, a returns file that updates, deletes
    and revives keys, and new versions of the Delta source (an update and an OPTIMIZE)."""
    orders = raw / "orders"
    lines = (orders / "orders_2024-01-01.csv").read_text().splitlines()
    (orders / "orders_2024-01-01.csv").write_text("\n".join(lines[:150]) + "\n")  # changed: fewer rows
    (orders / "orders_2024-02-01.csv").write_text(
        "\n".join([lines[0], *(line.replace("2024-01-01", "2024-02-01") for line in lines[150:250])]) + "\n"
    )
    shutil.copy(orders / "orders_2024-01-03.csv", orders / "orders_2024-01-03_again.csv")
    header = "return_id,order_id,product_id,return_ts,quantity,reason,refund_amount,status,updated_at,op"
    records = [
        "1,101073,121,2024-01-04T23:50:00Z,1,damaged,10.00,closed,2024-04-01T00:00:00Z,U",
        "2,100526,232,2024-01-20T13:24:00Z,1,changed mind,163.49,cancelled,2024-04-01T00:00:00Z,D",
        "10,100001,1,2024-01-20T13:24:00Z,1,changed mind,5.00,reopened,2024-04-02T00:00:00Z,U",
        "5000,100002,2,2024-04-01T13:24:00Z,2,late,7.50,requested,2024-04-01T13:24:00Z,I",
    ]
    (raw / "returns" / "returns_2024-04.csv").write_text("\n".join([header, *records]) + "\n")
    changes = str(raw / "returns" / "changes")
    table = DeltaTable(changes)
    schema = pa.schema(table.schema().to_arrow())  # type: ignore[arg-type]
    rows = table.to_pyarrow_table().slice(0, 3).to_pylist()
    for r in rows:
        r["status"] = "escalated"
        r["updated_at"] = dt.datetime(2024, 4, 3, tzinfo=UTC)
    write_deltalake(changes, pa.Table.from_pylist(rows, schema=schema), mode="append")
    DeltaTable(changes).optimize.compact()


@dataclass(frozen=True)
class Scenario:
    name: str
    before: Callable[[Path], None] | None
    during: Callable[[Path], None]


FRESH = Scenario("fresh", None, sample_raw)
INCREMENTAL = Scenario("incremental", sample_raw, incremental_changes)


def prepare(root: Path, scenario: Scenario) -> Lake:
    """A lake where ``before`` was ingested by a clean run, and ``during`` has just arrived."""
    lake = Lake(root)
    lake.raw.mkdir(parents=True)
    if scenario.before is not None:
        scenario.before(lake.raw)
        run(lake.settings())
    scenario.during(lake.raw)
    return lake


def prepare_from(template: Path, root: Path) -> Lake:
    """A copy of a prepared lake (hard links of the lake files would be shared: copy bytes)."""
    shutil.copytree(template, root, copy_function=shutil.copy2, symlinks=True)
    return Lake(root)


# ------------------------------------------------------------------------------------------
# Killing
# ------------------------------------------------------------------------------------------


def environment(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.pop("BRONZE_KILL_AT", None)
    env.pop("BRONZE_STEP_LOG", None)
    env.update(extra)
    return env


def steps_of(lake: Lake, tmp: Path) -> list[str]:
    """The named steps a clean run of the lake goes through (run on a copy)."""
    copy = prepare_from(lake.root, tmp)
    log = tmp.parent / f"{tmp.name}.steps"
    done = subprocess.run(copy.cli(), env=environment(BRONZE_STEP_LOG=str(log)), capture_output=True, text=True)
    assert done.returncode in (0, 1), done.stderr
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


def kill_at(cmd: list[str], step: int) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` so that it kills itself with SIGKILL on reaching step ``step``."""
    return subprocess.run(cmd, env=environment(BRONZE_KILL_AT=str(step)), capture_output=True, text=True, timeout=300)


def kill_after(cmd: list[str], seconds: float) -> int:
    """Run ``cmd`` and kill it with SIGKILL after ``seconds`` (if still running): its exit code."""
    proc = subprocess.Popen(cmd, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)


# ------------------------------------------------------------------------------------------
# The state one clean run must equal
# ------------------------------------------------------------------------------------------


def _rows(table: pa.Table) -> list[tuple[Any, ...]]:
    names = sorted(c for c in table.column_names if c != "ingestion_ts")
    columns = [table.column(c).to_pylist() for c in names]  # by column: no dict per row
    return sorted(zip(*columns, strict=True), key=lambda t: tuple((v is None, str(v)) for v in t))


def _referenced(delta_dir: Path) -> set[str]:
    """Every data file some commit of the table added or removed."""
    seen: set[str] = set()
    for entry in (delta_dir / "_delta_log").glob("*.json"):
        for line in entry.read_text().splitlines():
            action = json.loads(line)
            for kind in ("add", "remove"):
                if kind in action:
                    seen.add(urllib.parse.unquote(action[kind]["path"]))
    return seen


def state(lake: Lake) -> dict[str, Any]:
    """Rows per table in both outputs (without ``ingestion_ts``), rejects, manifest, watermarks,
    schema history; asserts on the way that the two outputs agree and no stray file is left."""
    out: dict[str, Any] = {"tables": {}, "rejects": {}}
    root = lake.lake
    assert not (root / "_staging").exists(), "staging left behind"
    assert not (root / "_history" / "_staging").exists(), "history staging left behind"
    assert not [p for p in root.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    for t in TABLES:
        ddir, pdir = root / "bronze" / "delta" / t.name, root / "bronze" / "parquet" / t.name
        if not (ddir / "_delta_log").is_dir():
            assert not pdir.exists() or not any(pdir.rglob("*.parquet")), t.name
            continue
        dt_ = DeltaTable(str(ddir))
        active = {urllib.parse.unquote(a) for a in pa.table(dt_.get_add_actions(flatten=False)).column("path").to_pylist()}
        present = {p.relative_to(pdir).as_posix() for p in pdir.rglob("*") if p.is_file()} if pdir.is_dir() else set()
        assert present == active, f"{t.name}: Parquet files differ from the Delta table's"
        on_disk = {p.relative_to(ddir).as_posix() for p in ddir.rglob("*.parquet") if "_delta_log" not in p.parts}
        assert on_disk <= _referenced(ddir), f"{t.name}: files no commit references: {sorted(on_disk - _referenced(ddir))[:3]}"
        delta_rows = _rows(dt_.to_pyarrow_table())
        schema = pa.schema(dt_.schema().to_arrow())  # type: ignore[arg-type]
        files = sorted(str(pdir / p) for p in present)
        parts = [c for c in t.partition_by]
        part = pads.partitioning(pa.schema([schema.field(c) for c in parts]), flavor="hive") if parts else None
        parquet = (
            pads.dataset(files, schema=schema, format="parquet", partitioning=part, partition_base_dir=str(pdir)).to_table()
            if files
            else schema.empty_table()
        )
        assert _rows(parquet) == delta_rows, f"{t.name}: Parquet rows differ from Delta rows"
        out["tables"][t.name] = delta_rows
        hdir = root / "_history" / t.name
        if (hdir / "_delta_log").is_dir():
            h_on_disk = {p.relative_to(hdir).as_posix() for p in hdir.rglob("*.parquet") if "_delta_log" not in p.parts}
            assert h_on_disk <= _referenced(hdir), f"{t.name} history: unreferenced files"
            out["tables"][t.name + " (history)"] = _rows(DeltaTable(str(hdir)).to_pyarrow_table())
    rejects_root = root / "_rejects"
    for folder in sorted(rejects_root.iterdir()) if rejects_root.is_dir() else []:
        rows = []
        for f in sorted(folder.glob("*.csv")):
            with open(f, newline="", encoding="utf-8") as fh:
                rows += [tuple(v for k, v in sorted(r.items()) if k != "ingestion_ts") for r in csv.DictReader(fh)]
        out["rejects"][folder.name] = (len(list(folder.glob("*.csv"))), sorted(rows))
    with duckdb.connect(str(lake.manifest), read_only=True) as con:
        out["manifest"] = {
            r[0]: r[1:]
            for r in con.execute(
                """SELECT src_path, table_name, file_format, file_size_bytes, file_checksum, row_count, reject_count,
                          status, error_message, duplicate_of FROM manifest_processed_files"""
            ).fetchall()
        }
        out["watermarks"] = dict(con.execute("SELECT source_path, last_version FROM watermarks").fetchall())
        out["schema_history"] = sorted(
            con.execute("SELECT table_name, src_path, columns::VARCHAR, change FROM schema_history").fetchall(),
            key=str,
        )
    return out


def total_rows(s: dict[str, Any]) -> int:
    return sum(len(v) for k, v in s["tables"].items() if "(history)" not in k)


assert set(TABLES_BY_NAME) >= {"orders", "returns"}
