"""Sensors: one per table. They only discover (file names, sizes, modification times; never file
contents, never the manifest), register new sources as partitions and request runs for new or
changed ones. The cursor is a change-time watermark, so a tick costs one directory walk whatever
the number of files already ingested."""

import hashlib
import json
import time
from pathlib import Path

import dagster as dg

from bronze_assets.assets import partitions_for, partitions_name
from bronze_assets.discovery import RawSource, discover
from bronze_assets.resources import LakeResource
from schemas.schemas import Table

MAX_SOURCES_PER_TICK = 500
SOURCES_PER_RUN = 100
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"


def _order(source: RawSource) -> tuple[int, str]:
    return (source.ctime_ns, source.src_path)


def evaluate(
    table: Table,
    *,
    lake: LakeResource,
    registered: set[str],
    cursor: str | None,
    now: float | None = None,
) -> tuple[list[str], list[dg.RunRequest], str, list[str]]:
    """(new partition keys, run requests, new cursor, sources still being written).

    The cursor is the position, in (change time, src_path) order, up to which every source has
    been requested. A source is due when it is not yet a partition or changed after that
    position. The change time (ctime) moves on any write, rename or copy, even one that keeps
    an older modification time, so a replaced file is never missed; ordering ties by path lets
    a tick stop after MAX_SOURCES_PER_TICK sources and the next one carry on. The position never
    passes a source still being written (modified in the last ``settle_seconds``), so that one
    is taken once it settles, whatever its change time.
    """
    now = time.time() if now is None else now
    state = json.loads(cursor) if cursor else {}
    position = (int(state.get("ctime_ns", 0)), str(state.get("path", "")))
    found = discover(Path(lake.raw), [table])
    settle_ns = int(lake.settle_seconds * 1e9)
    now_ns = int(now * 1e9)
    # A modification time further in the future than the settle time is a wrong clock, not a
    # write in progress: waiting for it would hold every later source back for good.
    waiting = [s for s in found.sources if -settle_ns < now_ns - s.mtime_ns < settle_ns]
    horizon = min((_order(s) for s in waiting), default=None)
    due = [
        s
        for s in found.sources
        if (s.src_path not in registered or _order(s) > position)
        and s not in waiting
        and (horizon is None or _order(s) < horizon)
    ]
    due.sort(key=_order)
    due = due[:MAX_SOURCES_PER_TICK]
    fresh = [s for s in due if s.src_path not in registered]
    new_keys = [s.src_path for s in fresh]
    # New sources are registered in this order, so that consecutive ones make a range of
    # partition keys: one run ingests up to SOURCES_PER_RUN of them (a process start per small
    # file would cost more than its ingestion). A changed source has its own run.
    requests = [_request(table, [s]) for s in due if s.src_path in registered]
    requests += [_request(table, fresh[i : i + SOURCES_PER_RUN]) for i in range(0, len(fresh), SOURCES_PER_RUN)]
    if due:
        position = max(position, _order(due[-1]))
    cursor_out = json.dumps({"ctime_ns": position[0], "path": position[1]})
    return new_keys, requests, cursor_out, sorted(s.src_path for s in waiting)


def _request(table: Table, sources: list[RawSource]) -> dg.RunRequest:
    """A run for ``sources`` (consecutive partition keys), keyed by their identities so that the
    same files never launch twice and a replaced one launches again."""
    tags = {"bronze/table": table.name}
    if len(sources) == 1:
        s = sources[0]
        return dg.RunRequest(partition_key=s.src_path, run_key=f"{table.name}:{s.src_path}:{s.mtime_ns}:{s.size}", tags=tags)
    identity = hashlib.sha256("\n".join(f"{s.src_path}:{s.mtime_ns}:{s.size}" for s in sources).encode()).hexdigest()
    first, last = sources[0].src_path, sources[-1].src_path
    return dg.RunRequest(
        run_key=f"{table.name}:{len(sources)} sources:{identity[:32]}",
        tags=tags | {RANGE_START: first, RANGE_END: last},
    )


def request_keys(request: dg.RunRequest, order: list[str]) -> list[str]:
    """The partition keys a run request carries, ``order`` being the keys in registration order."""
    if request.partition_key is not None:
        return [request.partition_key]
    first, last = order.index(request.tags[RANGE_START]), order.index(request.tags[RANGE_END])
    return order[first : last + 1]


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
