"""The benchmark: the project's full ingestion against the bare limit and the peers, measured
side by side in one sitting (absolute times on a shared machine drift; ratios of runs taken in
turn do not).

``python -m bronze_assets.bench`` (``make bench``) generates the data with the package's
generator, then for each case runs every configuration as a fresh process, in turn, ``--repeat``
times: wall and CPU seconds and peak resident memory come from the kernel's accounting of that
process (``os.wait4``). It prints a table and writes it as JSON under ``<lake>/_bench/``.
``--quick`` does the same at small sizes (``make bench-quick``, run by the tests).

Cases: orders CSV (1% bad records) against DuckDB's typed ``read_csv`` -> ``COPY ...
PARTITION_BY (order_dt)`` (the limit), pyarrow's typed CSV read (the parse floor), and DuckDB
alone validating (the simplest validation, and the project's own statement); events
JSONL and sensors Parquet against DuckDB's typed read -> partitioned Parquet of the same layout;
1,000 small orders files against one file of the same rows; the orders case at three sizes; dlt's
fastest path and a plain pandas script when the ``bench`` extra is installed. File sizes per
partition are reported after ingestion and after compaction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

ORDERS_TYPES = {
    "order_id": "BIGINT",
    "customer_id": "BIGINT",
    "store_id": "INTEGER",
    "product_id": "BIGINT",
    "order_dt": "DATE",
    "order_ts": "TIMESTAMPTZ",
    "quantity": "INTEGER",
    "unit_price": "DECIMAL(10,2)",
    "discount_pct": "DECIMAL(5,2)",
    "currency": "VARCHAR",
    "status": "VARCHAR",
    "payment_method": "VARCHAR",
}
EVENTS_TYPES = {
    "event_id": "VARCHAR",
    "event_ts": "TIMESTAMPTZ",
    "customer_id": "BIGINT",
    "session_id": "VARCHAR",
    "event_type": "VARCHAR",
    "page_url": "VARCHAR",
    "properties": "JSON",
}


@dataclass(frozen=True)
class Sizes:
    orders: int
    events: int
    sensors: int
    small_files: int
    small_rows: int
    scale: tuple[int, ...]
    repeat: int
    merge_rows: int = 5_000_000
    merge_changes: int = 10_000


FULL = Sizes(orders=5_000_000, events=2_000_000, sensors=5_000_000, small_files=1_000, small_rows=1_000,
             scale=(1_000_000, 5_000_000, 20_000_000), repeat=3)  # fmt: skip
QUICK = Sizes(orders=20_000, events=10_000, sensors=20_000, small_files=50, small_rows=200, scale=(10_000, 40_000), repeat=1,
              merge_rows=20_000, merge_changes=1_000)  # fmt: skip


@dataclass
class Measure:
    wall_s: float
    cpu_s: float
    peak_mib: float
    returncode: int


@dataclass
class Config:
    case: str
    name: str
    input_mb: float
    rows: int
    runs: list[Measure] = field(default_factory=list)
    files: dict[str, Any] | None = None

    def median(self, what: str) -> float:
        return statistics.median(getattr(m, what) for m in self.runs) if self.runs else float("nan")


# ------------------------------------------------------------------------------------------
# Running and measuring one process
# ------------------------------------------------------------------------------------------


def measure(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> Measure:
    """Run ``cmd`` as a process of its own: wall seconds, CPU seconds (user + system) and peak
    resident memory from the kernel's accounting of that very process. A peer killed by a
    signal (pandas with pyarrow has aborted at interpreter exit: "terminate called without an
    active exception") is run once more; the project's own runs never are."""
    m = _measure_once(cmd, env=env, cwd=cwd)
    if m.returncode < 0 and "bronze_assets" not in cmd:
        m = _measure_once(cmd, env=env, cwd=cwd)
    return m


def _measure_once(cmd: Sequence[str], *, env: dict[str, str] | None, cwd: Path | None) -> Measure:
    started = time.perf_counter()
    proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    if code == 1 and "bronze_assets" in cmd:
        code = 0  # the project's "ingested, some records rejected"
    if code != 0:
        print(f"bench: {' '.join(cmd)[:200]} exited {code}: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
    return Measure(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, code)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def project(raw: Path, out: Path) -> list[str]:
    """The project's whole job through its command line: validation, rejects, audit columns,
    both outputs, manifest."""
    return [sys.executable, "-m", "bronze_assets", "--raw", str(raw), "--lake", str(out / "lake"),
            "--manifest", str(out / "m.duckdb"), "--quiet"]  # fmt: skip


def _duck_copy(select: str, out: Path, partition: str) -> list[str]:
    code = (
        "import duckdb, sys; con = duckdb.connect(); "
        f"con.execute(sys.argv[1] + ' TO ' + repr(sys.argv[2]) + ' (FORMAT parquet, COMPRESSION snappy, PARTITION_BY ({partition}))')"
    )
    return python(code, f"COPY ({select})", str(out / "bare"))


def duck_orders(csv: Path, out: Path) -> list[str]:
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in ORDERS_TYPES.items()) + "}"
    return _duck_copy(f"SELECT * FROM read_csv('{csv}', header=true, columns={columns}, ignore_errors=true)", out, "order_dt")


def _fields_text(names: Sequence[str]) -> str:
    """SQL for a record's text rebuilt from its fields (exact for a file without quotes)."""
    return "concat_ws(',', " + ", ".join(f"coalesce({n}, '')" for n in names) + ")"


def duck_orders_validating(csv: Path, out: Path) -> list[str]:
    """DuckDB alone, validating the simplest way: every field read as text, a TRY_CAST to its
    declared type, a row that fails one left out, the MD5 of the fields, a partitioned COPY. No
    reasons, rejects, lossless checks, record numbers or second output: what validation costs at
    the least, in DuckDB's C++ from end to end."""
    cast = {c: f"TRY_CAST({c} AS {t})" for c, t in ORDERS_TYPES.items()}
    failed = " OR ".join(f"({c} IS NOT NULL AND {e} IS NULL)" for c, e in cast.items())
    select = (
        f"SELECT {', '.join(f'{e} AS {c}' for c, e in cast.items())}, md5({_fields_text(list(ORDERS_TYPES))}) AS src_row_hash, "
        f"'orders/{csv.name}' AS src_filename FROM read_csv('{csv}', header=true, all_varchar=true, "
        f"store_rejects=true, null_padding=true) WHERE NOT ({failed})"
    )
    return _duck_copy(select, out, "order_dt")


def duck_orders_statement(csv: Path, out: Path) -> list[str]:
    """The project's own validating statement for orders, run by DuckDB alone over its CSV
    reader's rows (the raw text rebuilt from the fields, which is exact for a file without
    quotes), its valid rows written by a partitioned COPY: the whole job inside DuckDB, at the
    least. Record numbers are left out (numbering the rows of a statement makes DuckDB run it on
    one thread), and so are the rejects and the second output."""
    from bronze_assets.validation import Validator, output_schema
    from schemas.schemas import TABLES_BY_NAME

    table = TABLES_BY_NAME["orders"]
    names = [c.name for c in table.columns]
    schema = output_schema(table)
    bookkeeping = [("_row", pa.int64()), ("_raw", pa.string()), ("_bad", pa.string())]
    validator = Validator(
        table, source_schema=pa.schema(bookkeeping + [(n, pa.string()) for n in names]), raw_kind="text", output_schema=schema
    )
    validator.close()
    view = (
        f"CREATE VIEW src AS SELECT 0::BIGINT AS _row, {_fields_text(names)} AS _raw, NULL::VARCHAR AS _bad, "
        f"'orders/{csv.name}' AS _src, now() AS _its, {', '.join(names)} "
        f"FROM read_csv('{csv}', header=true, all_varchar=true, store_rejects=true)"
    )
    columns = ", ".join(f'"{n}"' for n in schema.names)
    copy = (
        f"COPY (SELECT {columns} FROM ({validator.sql.split(' ORDER BY ')[0]}) WHERE _why IS NULL) TO {str(out / 'bare')!r} "
        "(FORMAT parquet, COMPRESSION snappy, PARTITION_BY (order_dt))"
    )
    code = "import duckdb, sys; con = duckdb.connect(); con.execute(\"SET TimeZone = 'UTC'\"); [con.execute(s) for s in sys.argv[1:]]"
    return python(code, view, copy)


def duck_events(jsonl: Path, out: Path) -> list[str]:
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in EVENTS_TYPES.items()) + "}"
    select = (
        f"SELECT *, CAST(event_ts AS DATE) AS event_dt FROM read_json('{jsonl}', format='newline_delimited', "
        f"columns={columns}, ignore_errors=true)"
    )
    return _duck_copy(select, out, "event_dt")


def duck_sensors(parquet: Path, out: Path) -> list[str]:
    select = f"SELECT *, strftime(reading_ts, '%Y-%m') AS reading_month FROM read_parquet('{parquet}')"
    return _duck_copy(select, out, "store_id, reading_month")


def pyarrow_parse(csv: Path) -> list[str]:
    types = {"BIGINT": "int64()", "INTEGER": "int32()", "DATE": "date32()", "TIMESTAMPTZ": "timestamp('us', tz='UTC')",
             "DECIMAL(10,2)": "decimal128(10, 2)", "DECIMAL(5,2)": "decimal128(5, 2)", "VARCHAR": "string()"}  # fmt: skip
    schema = "{" + ", ".join(f"'{k}': pa.{types[v]}" for k, v in ORDERS_TYPES.items()) + "}"
    code = (
        "import sys, pyarrow as pa, pyarrow.csv as c; "
        f"c.read_csv(sys.argv[1], convert_options=c.ConvertOptions(column_types={schema}), "
        "parse_options=c.ParseOptions(invalid_row_handler=lambda r: 'skip'))"
    )
    return python(code, str(csv))


PANDAS = (
    "import sys, pandas as pd; df = pd.read_csv(sys.argv[1]); "
    "df.to_parquet(sys.argv[2], partition_cols=['order_dt'])"
)
DLT = """
import sys, dlt, pyarrow as pa, pyarrow.csv as c
src, out = sys.argv[1], sys.argv[2]
def batches():
    reader = c.open_csv(src, parse_options=c.ParseOptions(invalid_row_handler=lambda r: 'skip'))
    for b in reader:
        yield pa.Table.from_batches([b])
res = dlt.resource(batches, name='orders', table_format='delta', columns={'order_dt': {'partition': True}})
p = dlt.pipeline('bench_orders', destination=dlt.destinations.filesystem(out), pipelines_dir=out + '/_pipelines')
p.run(res, loader_file_format='parquet')
"""


def peers_available() -> dict[str, bool]:
    found = {}
    for name in ("pandas", "dlt"):
        try:
            __import__(name)
            found[name] = True
        except ImportError:
            found[name] = False
    return found


# ------------------------------------------------------------------------------------------
# The cases
# ------------------------------------------------------------------------------------------


def generate(out: Path, *, rows: int, tables: str, files: int = 1, bad: float = 0.01) -> Path:
    from bronze_assets import sample

    marker = out / ".complete"
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        sample.main(["--out", str(out), "--rows", str(rows), "--tables", tables, "--files", str(files),
                     "--bad-fraction", str(bad)])  # fmt: skip
        marker.write_text("")
    return out


def size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) / 1e6


def paired(configs: list[tuple[Config, Any]], repeat: int, work: Path) -> None:
    """Run each configuration once per round, in turn, ``repeat`` rounds; outputs are removed
    before every run (each starts from nothing)."""
    for _ in range(repeat):
        for config, make in configs:
            out = work / "out" / config.case / config.name
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            config.runs.append(measure(make(out)))
            if config.name in ("bronze", "bronze_many_files"):
                config.files = file_sizes(out / "lake", config.case)
            shutil.rmtree(out, ignore_errors=True)


def file_sizes(lake: Path, case: str) -> dict[str, Any] | None:
    """Files per partition and their sizes in the Parquet output, after ingestion and after the
    maintenance job's compaction."""
    table = {"orders": "orders", "events": "events", "sensors": "sensors", "small": "orders", "scale": "orders"}.get(case.split("_")[0])
    if table is None:
        return None
    from bronze_assets.compaction import maintain
    from bronze_assets.ingest import Settings
    from schemas.schemas import TABLES_BY_NAME

    def shape() -> dict[str, Any]:
        root = lake / "bronze" / "parquet" / table
        per: dict[str, list[int]] = {}
        groups: list[int] = []  # row groups per file
        group_rows: list[int] = []  # rows per row group
        for f in root.rglob("*.parquet"):
            per.setdefault(f.parent.relative_to(root).as_posix(), []).append(f.stat().st_size)
            meta = pq.read_metadata(f)
            groups.append(meta.num_row_groups)
            group_rows += [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        sizes = sorted(s for v in per.values() for s in v)
        counts = sorted(len(v) for v in per.values())
        if not sizes:
            return {}
        return {
            "partitions": len(per),
            "files": len(sizes),
            "files_per_partition_max": counts[-1],
            "file_mb_min": round(sizes[0] / 1e6, 3),
            "file_mb_median": round(statistics.median(sizes) / 1e6, 3),
            "file_mb_max": round(sizes[-1] / 1e6, 3),
            "row_groups_per_file_max": max(groups),
            "rows_per_row_group_median": int(statistics.median(group_rows)) if group_rows else 0,
        }

    after_ingest = shape()
    settings = Settings(raw=lake.parent / "raw-unused", lake=lake, manifest=lake.parent / "m.duckdb")
    maintain(settings, [TABLES_BY_NAME[table]], retention_hours=0)
    return {"after_ingestion": after_ingest, "after_compaction": shape()}


def run_cases(sizes: Sizes, work: Path, cases: set[str] | None) -> list[Config]:
    data = work / "data"
    results: list[Config] = []

    def want(name: str) -> bool:
        return cases is None or name in cases

    if want("orders"):
        raw = generate(data / f"orders-{sizes.orders}", rows=sizes.orders, tables="orders")
        csv = next((raw / "orders").glob("*.csv"))
        # The same rows without the bad records, for the tools that stop at the first one (a typed
        # pyarrow read, pandas, dlt): they are timed on clean data, the project on the 1% bad.
        clean_raw = generate(data / f"orders-{sizes.orders}-clean", rows=sizes.orders, tables="orders", bad=0.0)
        clean = next((clean_raw / "orders").glob("*.csv"))
        mb = size_mb(raw)
        case = f"orders_{sizes.orders}"
        configs: list[tuple[Config, Any]] = [
            (Config(case, "bronze", mb, sizes.orders), lambda out, raw=raw: project(raw, out)),
            (Config(case, "duckdb_bare", mb, sizes.orders), lambda out, csv=csv: duck_orders(csv, out)),
            (Config(case, "pyarrow_parse", mb, sizes.orders), lambda out, csv=clean: pyarrow_parse(csv)),
            (Config(case, "duckdb_validating", mb, sizes.orders), lambda out, csv=csv: duck_orders_validating(csv, out)),
            (Config(case, "duckdb_statement", mb, sizes.orders), lambda out, csv=csv: duck_orders_statement(csv, out)),
        ]
        peers = peers_available()
        if peers["pandas"]:
            configs.append((Config(case, "pandas_naive", mb, sizes.orders), lambda out, csv=clean: python(PANDAS, str(csv), str(out / "pd"))))
        if peers["dlt"]:
            configs.append((Config(case, "dlt_arrow_delta", mb, sizes.orders), lambda out, csv=clean: python(DLT, str(csv), str(out / "dlt"))))
        paired(configs, sizes.repeat, work)
        results += [c for c, _ in configs]

    # One file of a table against DuckDB's bare read of it into partitioned Parquet.
    bare_cases = (("events", sizes.events, "*.jsonl", duck_events), ("sensors", sizes.sensors, "*.parquet", duck_sensors))
    for table, rows, pattern, bare in bare_cases:
        if not want(table):
            continue
        raw = generate(data / f"{table}-{rows}", rows=rows, tables=table)
        source = next((raw / table).glob(pattern))
        mb, case = size_mb(raw), f"{table}_{rows}"
        configs = [
            (Config(case, "bronze", mb, rows), lambda out, raw=raw: project(raw, out)),
            (Config(case, "duckdb_bare", mb, rows), lambda out, f=source, bare=bare: bare(f, out)),
        ]
        paired(configs, sizes.repeat, work)
        results += [c for c, _ in configs]

    if want("small_files"):
        n = sizes.small_files * sizes.small_rows
        many = generate(data / f"orders-{n}-x{sizes.small_files}", rows=n, tables="orders", files=sizes.small_files)
        one = generate(data / f"orders-{n}", rows=n, tables="orders")
        case = f"small_files_{sizes.small_files}x{sizes.small_rows}"
        configs = [
            (Config(case, "bronze_many_files", size_mb(many), n), lambda out, raw=many: project(raw, out)),
            (Config(case, "bronze_one_file", size_mb(one), n), lambda out, raw=one: project(raw, out)),
        ]
        paired(configs, sizes.repeat, work)
        results += [c for c, _ in configs]

    if want("scale"):
        for rows in sizes.scale:
            raw = generate(data / f"orders-{rows}", rows=rows, tables="orders")
            csv = next((raw / "orders").glob("*.csv"))
            mb, case = size_mb(raw), f"scale_{rows}"
            configs = [
                (Config(case, "bronze", mb, rows), lambda out, raw=raw: project(raw, out)),
                (Config(case, "duckdb_bare", mb, rows), lambda out, csv=csv: duck_orders(csv, out)),
            ]
            paired(configs, sizes.repeat, work)
            results += [c for c, _ in configs]
    if want("merge"):
        results += merge_case(sizes, work)
    return results


def merge_case(sizes: Sizes, work: Path) -> list[Config]:
    """The returns upsert: a table of ``sizes.merge_rows`` rows is loaded (the first load, timed
    on every run of the benchmark: only the raw data is kept between runs), then a file of
    ``sizes.merge_changes`` changes (updates, one in ten a tombstone, one in ten a new key)
    arrives; the run that merges it is measured, once per round, each time on a fresh copy of
    the loaded table."""
    from bronze_assets.sample import write_returns_large

    case = f"returns_merge_{sizes.merge_changes}_into_{sizes.merge_rows}"
    data = work / "data" / case
    marker = data / ".complete"
    if not marker.exists():
        shutil.rmtree(data, ignore_errors=True)
        _, delta = write_returns_large(data / "raw", rows=sizes.merge_rows, changes=sizes.merge_changes)
        delta.rename(data / delta.name)  # kept aside until the table is loaded
        marker.write_text("")
    loaded = work / "out" / case / "loaded"
    shutil.rmtree(loaded, ignore_errors=True)
    initial = Config(case, "bronze_initial_load", size_mb(data / "raw"), sizes.merge_rows)
    initial.runs.append(measure(project(data / "raw", loaded)))
    delta_file = next(data.glob("*_changes_*.csv"))
    merge = Config(case, "bronze_merge", delta_file.stat().st_size / 1e6, sizes.merge_changes)
    for _ in range(sizes.repeat):
        trial = work / "out" / case / "trial"
        shutil.rmtree(trial, ignore_errors=True)
        shutil.copytree(loaded, trial / "out", copy_function=shutil.copy2)
        shutil.copytree(data / "raw", trial / "raw")
        shutil.copy2(delta_file, trial / "raw" / "returns" / delta_file.name)
        merge.runs.append(measure(project(trial / "raw", trial / "out")))
        shutil.rmtree(trial, ignore_errors=True)
    shutil.rmtree(loaded, ignore_errors=True)
    return [initial, merge]


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def ratios(results: list[Config]) -> dict[str, dict[str, float]]:
    """Per case, each configuration's median of per-round wall ratios to the case's baseline."""
    out: dict[str, dict[str, float]] = {}
    by_case: dict[str, list[Config]] = {}
    for c in results:
        by_case.setdefault(c.case, []).append(c)
    for case, configs in by_case.items():
        base = next((c for c in configs if c.name in ("duckdb_bare", "bronze_one_file")), None)
        if base is None:
            continue
        for c in configs:
            pairs = [m.wall_s / b.wall_s for m, b in zip(c.runs, base.runs, strict=False) if b.wall_s > 0]
            out.setdefault(case, {})[c.name] = round(statistics.median(pairs), 2) if pairs else float("nan")
    return out


def targets(results: list[Config], rel: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The issue's targets, each with the figure measured and whether it is met."""
    found: list[dict[str, Any]] = []

    def add(what: str, value: float, limit: float) -> None:
        found.append({"target": what, "measured": round(value, 2), "limit": limit, "met": bool(value <= limit)})

    for case, r in rel.items():
        if case.startswith("orders_") and "bronze" in r:
            add(f"{case}: wall vs bare limit", r["bronze"], 2.0)
            if "dlt_arrow_delta" in r:
                add(f"{case}: wall vs dlt's fastest path", r["bronze"] / r["dlt_arrow_delta"], 1.0)
        if case.startswith(("events_", "sensors_")) and "bronze" in r:
            add(f"{case}: wall vs bare limit", r["bronze"], 2.5)
        if case.startswith("small_files_"):
            add(f"{case}: many files vs one file", r.get("bronze_many_files", float("nan")), 3.0)
    for c in results:
        if c.name == "bronze_merge":
            add(f"{c.case}: peak memory GiB", c.median("peak_mib") / 1024, 2.0)
    scale = sorted((c for c in results if c.case.startswith("scale_") and c.name == "bronze"), key=lambda c: c.rows)
    for c in scale:
        add(f"{c.case}: peak memory GiB", c.median("peak_mib") / 1024, 1.5)
    if len(scale) >= 2:
        a, b = scale[-2], scale[-1]
        add(f"{b.case} / {a.case} wall ({b.rows // a.rows}x the rows)", b.median("wall_s") / a.median("wall_s"),
            round(4.4 * (b.rows / a.rows) / 4, 2))  # fmt: skip
    return found


def table_text(results: list[Config], rel: dict[str, dict[str, float]]) -> str:
    head = f"{'case':<28} {'config':<20} {'n':>2} {'wall s':>8} {'cpu s':>8} {'peak MiB':>9} {'MB/s':>7} {'vs base':>8}"
    lines = [head, "-" * len(head)]
    for c in results:
        wall = c.median("wall_s")
        mbps = c.input_mb / wall if wall and wall == wall else float("nan")
        lines.append(
            f"{c.case:<28} {c.name:<20} {len(c.runs):>2} {wall:>8.2f} {c.median('cpu_s'):>8.2f} "
            f"{c.median('peak_mib'):>9.0f} {mbps:>7.1f} {rel.get(c.case, {}).get(c.name, float('nan')):>8.2f}"
        )
    return "\n".join(lines)


def files_text(results: list[Config]) -> str:
    """The Parquet output's file shape per case, after ingestion and after compaction (last round)."""
    head = (f"{'case':<28} {'when':<11} {'parts':>6} {'files':>6} {'per part':>8} {'MB min':>7} {'MB med':>7} "
            f"{'MB max':>7} {'rg/file':>7} {'rows/rg':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for c in results:
        for when, shape in (c.files or {}).items():
            if shape:
                lines.append(
                    f"{c.case:<28} {when.removeprefix('after_'):<11} {shape['partitions']:>6} {shape['files']:>6} "
                    f"{shape['files_per_partition_max']:>8} {shape['file_mb_min']:>7.2f} {shape['file_mb_median']:>7.2f} "
                    f"{shape['file_mb_max']:>7.2f} {shape['row_groups_per_file_max']:>7} {shape['rows_per_row_group_median']:>8}"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bronze_assets.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes, one round (what the tests run)")
    p.add_argument("--repeat", type=int, help="rounds per case (default 3, quick 1)")
    p.add_argument("--cases", help="comma-separated: orders,events,sensors,small_files,scale,merge (default all)")
    p.add_argument("--work", type=Path, help="where data and outputs go (default <lake>/_bench/work)")
    p.add_argument("--lake", type=Path, default=Path("lake"), help="the report goes to <lake>/_bench/")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = Sizes(**{**asdict(sizes), "repeat": args.repeat})
    bench_dir = args.lake / "_bench"
    work = args.work or bench_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    cases = set(args.cases.split(",")) if args.cases else None
    started = time.monotonic()
    results = run_cases(sizes, work, cases)
    rel = ratios(results)
    checks = targets(results, rel)
    text = table_text(results, rel)
    print(text)
    shapes = files_text(results)
    print(shapes)
    for t in checks:
        print(f"{'met ' if t['met'] else 'MISS'} {t['target']}: {t['measured']} (limit {t['limit']})")
    report = {
        "taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds": round(time.monotonic() - started, 1),
        "cpu_count": os.cpu_count(),
        "results": [asdict(c) | {"median_wall_s": c.median("wall_s")} for c in results],
        "ratios": rel,
        "targets": checks,
        "table": text,
        "files_table": shapes,
    }
    name = "quick.json" if args.quick else f"bench-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S}.json"
    (bench_dir / name).write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {bench_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
