"""The Dagster code location: wiring only. Assets, checks and sensors are generated per table
from ``schemas.schemas.TABLES``; the ingestion itself is the same core as the command line's.

Environment (read here, once): BRONZE_RAW, BRONZE_LAKE, BRONZE_MANIFEST (defaults: data_raw, lake,
duckdb/warehouse.duckdb, relative to the working directory).
"""

import os
from pathlib import Path

import dagster as dg

from bronze_assets.assets import build_table_asset, partitions_name
from bronze_assets.discovery import discover
from bronze_assets.io_managers import DeltaIOManager, ParquetIOManager, RejectsIOManager
from bronze_assets.resources import LakeResource, ManifestResource
from bronze_assets.sensors import build_sensor
from schemas.schemas import TABLES

RAW = os.environ.get("BRONZE_RAW", "data_raw")
LAKE = os.environ.get("BRONZE_LAKE", "lake")
MANIFEST = os.environ.get("BRONZE_MANIFEST", "duckdb/warehouse.duckdb")

table_assets = {t.name: build_table_asset(t) for t in TABLES}
sensors = [build_sensor(t, table_assets[t.name]) for t in TABLES]


@dg.op(description="Register every raw source as a partition of its table (for CLI and CI runs).")
def register_raw_sources(context: dg.OpExecutionContext, lake: LakeResource) -> None:
    found = discover(Path(lake.raw), TABLES)
    for table in TABLES:
        name = partitions_name(table)
        known = set(context.instance.get_dynamic_partitions(name))
        new = [s.src_path for s in found.sources if s.table == table.name and s.src_path not in known]
        if new:
            context.instance.add_dynamic_partitions(name, new)
        context.log.info(f"{table.name}: {len(new)} new source(s) registered, {len(known)} already known")


@dg.job(description="Register the raw sources as partitions; then `dagster asset materialize` them.")
def register_raw_sources_job() -> None:
    register_raw_sources()


@dg.op(
    description="Coalesce small files in both outputs (and upserted tables' history), vacuum Delta.",
    pool="manifest",
)
def compact_and_vacuum(context: dg.OpExecutionContext, lake: LakeResource, manifest: ManifestResource) -> None:
    from bronze_assets.compaction import maintain

    settings = lake.settings(manifest=manifest.database)
    for result in maintain(settings, TABLES, run_id=context.run.run_id):
        c = result.compaction
        context.log.info(
            f"{result.table}: {c.files_before} -> {c.files_after} files, {c.partitions_compacted} partition(s)"
            f" compacted, {result.vacuumed} file(s) vacuumed"
        )


@dg.job(description="Compaction: small files coalesced toward the target size, Delta vacuumed.")
def compaction_job() -> None:
    compact_and_vacuum()


defs = dg.Definitions(
    assets=list(table_assets.values()),
    sensors=sensors,
    jobs=[register_raw_sources_job, compaction_job],
    resources={
        "lake": LakeResource(raw=RAW, lake=LAKE),
        "manifest": ManifestResource(database=MANIFEST),
        "delta_io": DeltaIOManager(lake=LAKE),
        "parquet_io": ParquetIOManager(lake=LAKE),
        "rejects_io": RejectsIOManager(lake=LAKE),
    },
)
