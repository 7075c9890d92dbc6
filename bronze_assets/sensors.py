"""Sensors: one per table. They only discover (file names, sizes, modification times; never file
contents, never the manifest), register new sources as partitions and request runs for new or
changed ones. The cursor is a modification-time watermark, so a tick costs one directory walk
whatever the number of files already ingested."""

import json
import time

import dagster as dg

from bronze_assets.assets import partitions_for, partitions_name
from bronze_assets.discovery import discover
from bronze_assets.resources import LakeResource
from schemas.schemas import Table

MAX_RUNS_PER_TICK = 500


def evaluate(
    table: Table,
    *,
    lake: LakeResource,
    registered: set[str],
    cursor: str | None,
    now: float | None = None,
) -> tuple[list[str], list[dg.RunRequest], str, list[str]]:
    """(new partition keys, run requests, new cursor, sources still being written)."""
    from pathlib import Path

    now = time.time() if now is None else now
    state = json.loads(cursor) if cursor else {}
    watermark = int(state.get("watermark_ns", 0))
    found = discover(Path(lake.raw), [table], min_file_age=lake.settle_seconds, now=now)
    waiting = [p for p in found.too_new]
    due = [s for s in found.sources if s.src_path not in registered or s.mtime_ns > watermark]
    due.sort(key=lambda s: (s.mtime_ns, s.src_path))
    due = due[:MAX_RUNS_PER_TICK]
    new_keys = [s.src_path for s in due if s.src_path not in registered]
    requests = [
        dg.RunRequest(
            partition_key=s.src_path,
            run_key=f"{table.name}:{s.src_path}:{s.mtime_ns}:{s.size}",
            tags={"bronze/table": table.name},
        )
        for s in due
    ]
    if due:
        watermark = max(watermark, max(s.mtime_ns for s in due))
    return new_keys, requests, json.dumps({"watermark_ns": watermark}), waiting


def build_sensor(table: Table, asset: dg.AssetsDefinition) -> dg.SensorDefinition:
    partitions = partitions_for(table)

    @dg.sensor(
        name=f"{table.name}_sources",
        description=f"Registers new {table.name} sources under the raw folder and runs their ingestion.",
        target=asset,
        minimum_interval_seconds=10,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult | dg.SkipReason:
        registered = set(context.instance.get_dynamic_partitions(partitions_name(table)))
        new_keys, requests, cursor, waiting = evaluate(table, lake=lake, registered=registered, cursor=context.cursor)
        if not requests:
            context.update_cursor(cursor)
            why = f"{len(waiting)} source(s) still being written" if waiting else "no new or changed sources"
            return dg.SkipReason(why)
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[partitions.build_add_request(new_keys)] if new_keys else [],
            cursor=cursor,
        )

    return sensor
