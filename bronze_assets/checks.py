"""Asset checks, as plain functions over the lake: each returns ``(passed, metadata)`` with the
evidence a failing check shows in the UI."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from bronze_assets.lake import Lake
from bronze_assets.staging import Outcome
from bronze_assets.validation import output_schema
from schemas.schemas import Table

AUDIT_COLUMNS = ("ingestion_ts", "src_filename", "src_row_number", "src_row_hash")
ROW_IDENTITY = pa.schema([("src_filename", pa.string()), ("src_row_number", pa.int64()), ("src_row_hash", pa.string())])
Evidence = dict[str, object]


def schema_conforms(lake: Lake, table: Table) -> tuple[bool, Evidence]:
    """Both outputs carry every declared, derived and audit column with its declared type."""
    expected = output_schema(table)
    dt_ = lake.delta_table(table.name)
    if dt_ is None:
        return True, {"note": "no Delta table yet"}
    problems: list[str] = []
    delta_schema = lake.table_schema(dt_)
    parquet_schema = _parquet_dataset(lake, table).schema
    for label, actual in (("delta", delta_schema), ("parquet", parquet_schema)):
        if label == "parquet" and not parquet_schema.names:
            continue  # no data file yet
        for f in expected:
            if f.name not in actual.names:
                problems.append(f"{label}: missing {f.name}")
            elif not _same_type(actual.field(f.name).type, f.type, partition=f.name in table.partition_by):
                problems.append(f"{label}: {f.name} is {actual.field(f.name).type}, declared {f.type}")
        if table.new_columns != "add":
            extra = [n for n in actual.names if n not in expected.names]
            problems += [f"{label}: undeclared column {n}" for n in extra]
    return not problems, {"problems": problems[:50], "columns_checked": len(expected)}


def _same_type(actual: pa.DataType, declared: pa.DataType, *, partition: bool) -> bool:
    if actual.equals(declared):
        return True
    # A hive reader infers partition columns from folder names (dates come back as strings).
    return partition and (pa.types.is_string(actual) or pa.types.is_dictionary(actual) or pa.types.is_integer(actual))


def reject_rate(table: Table, outcomes: Sequence[Outcome]) -> tuple[bool, Evidence]:
    """Rows rejected over records read, for this run's sources, against ``max_reject_fraction``."""
    rows = sum(o.rows for o in outcomes)
    rejected = sum(o.reject_count for o in outcomes)
    read = rows + rejected
    rate = rejected / read if read else 0.0
    worst = sorted(outcomes, key=lambda o: -o.reject_count)[:10]
    return rate <= table.max_reject_fraction, {
        "reject_rate": rate,
        "max_reject_fraction": table.max_reject_fraction,
        "records_read": read,
        "rows_rejected": rejected,
        "worst_sources": {o.src_path: o.reject_count for o in worst if o.reject_count},
    }


def outputs_identical(lake: Lake, table: Table, src_paths: Sequence[str]) -> tuple[bool, Evidence]:
    """The Parquet dataset holds exactly the Delta table's active files, and the rows of the given
    sources are the same (by source, row number and row hash) in both."""
    dt_ = lake.delta_table(table.name)
    if dt_ is None:
        return True, {"note": "no Delta table yet"}
    active = {f[0] for f in lake.active_files(dt_)}
    pdir = lake.parquet_dir(table.name)
    present = {p.relative_to(pdir).as_posix() for p in pdir.rglob("*") if p.is_file()} if pdir.is_dir() else set()
    only_delta, only_parquet = sorted(active - present), sorted(present - active)
    columns = ["src_filename", "src_row_number", "src_row_hash"]
    flt = pads.field("src_filename").isin(list(src_paths))
    delta_rows = dt_.to_pyarrow_dataset().to_table(columns=columns, filter=flt) if src_paths else None
    parquet_ds = _parquet_dataset(lake, table, schema=ROW_IDENTITY)
    parquet_rows = parquet_ds.to_table(filter=flt) if src_paths and parquet_ds.schema.names else None
    differing: list[str] = []
    if delta_rows is not None:
        a = _sorted(delta_rows)
        b = _sorted(parquet_rows) if parquet_rows is not None else a.schema.empty_table()
        if not a.equals(b):
            differing = sorted(set(pc.unique(a.column(0)).to_pylist()) ^ set(pc.unique(b.column(0)).to_pylist()))[:20] or list(
                src_paths
            )[:20]
    passed = not only_delta and not only_parquet and not differing
    return passed, {
        "files_only_in_delta": only_delta[:20],
        "files_only_in_parquet": only_parquet[:20],
        "sources_with_different_rows": differing,
        "active_files": len(active),
    }


def audit_complete(lake: Lake, table: Table, src_paths: Sequence[str]) -> tuple[bool, Evidence]:
    """No null audit value among the rows of the given sources (Delta output)."""
    dt_ = lake.delta_table(table.name)
    if dt_ is None or not src_paths:
        return True, {"rows_checked": 0}
    rows = dt_.to_pyarrow_dataset().to_table(
        columns=list(AUDIT_COLUMNS), filter=pads.field("src_filename").isin(list(src_paths))
    )
    nulls = {c: rows.column(c).null_count for c in AUDIT_COLUMNS}
    bad_hash = int(pc.sum(pc.invert(pc.match_substring_regex(rows.column("src_row_hash"), "^[0-9a-f]{32}$"))).as_py() or 0)
    passed = not any(nulls.values()) and bad_hash == 0
    return passed, {"rows_checked": rows.num_rows, "null_counts": nulls, "malformed_row_hashes": bad_hash}


def one_row_per_key(lake: Lake, table: Table) -> tuple[bool, Evidence]:
    """An upserted table holds one row per key (Delta output; the Parquet one is the same files)."""
    dt_ = lake.delta_table(table.name)
    if dt_ is None or not table.key:
        return True, {"rows_checked": 0}
    keys = dt_.to_pyarrow_dataset().to_table(columns=list(table.key))
    counts = keys.group_by(list(table.key)).aggregate([([], "count_all")])
    repeated = counts.filter(pc.greater(counts.column("count_all"), 1))
    sample = [{k: r[k] for k in table.key} | {"rows": r["count_all"]} for r in repeated.slice(0, 20).to_pylist()]
    return repeated.num_rows == 0, {
        "rows_checked": keys.num_rows,
        "distinct_keys": counts.num_rows,
        "keys_with_several_rows": repeated.num_rows,
        "examples": sample,
    }


def _parquet_dataset(lake: Lake, table: Table, *, schema: pa.Schema | None = None) -> pads.Dataset:
    """The Parquet output; ``schema`` reads just those columns, cast to those types, from every
    file (a file another writer put there may carry other string types)."""
    pdir = lake.parquet_dir(table.name)
    if not pdir.is_dir() or not any(pdir.rglob("*.parquet")):
        return pads.dataset(pa.table({}))
    return pads.dataset(str(pdir), format="parquet", partitioning="hive", schema=schema)


def _sorted(t: pa.Table) -> pa.Table:
    t = t.select(ROW_IDENTITY.names).cast(ROW_IDENTITY)
    return t.sort_by([("src_filename", "ascending"), ("src_row_number", "ascending"), ("src_row_hash", "ascending")])
