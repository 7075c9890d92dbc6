"""The sensors, without a daemon: ``bronze_assets.sensors.evaluate`` with an explicit clock, and the
real sensor definitions evaluated with ``dg.build_sensor_context`` on an ephemeral instance.

``build_sensor_context`` does not apply a tick's dynamic partition requests (the daemon does), so
the tests that go on for several ticks register the requested keys themselves, as the daemon would.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pytest
from deltalake import write_deltalake

import bronze_assets.sensors as sensors_module
from bronze_assets.assets import partitions_name
from bronze_assets.definitions import sensors as DEFINED_SENSORS
from bronze_assets.resources import LakeResource
from bronze_assets.sensors import evaluate, request_keys
from schemas.schemas import TABLES_BY_NAME

ORDERS = TABLES_BY_NAME["orders"]
RETURNS = TABLES_BY_NAME["returns"]
SETTLE = 5.0
HEADER = "order_id,customer_id,store_id,product_id,order_dt,order_ts,quantity,unit_price,discount_pct,currency,status,payment_method\n"


def orders_text(n: int, seed: int = 0) -> str:
    lines = [f"{seed * 1000 + i},1,1,1,2024-01-01,2024-01-01T10:00:00Z,1,9.99,0,EUR,PAID,card\n" for i in range(n)]
    return HEADER + "".join(lines)


def put(path: Path, text: str, *, mtime: float) -> Path:
    """Write ``text`` at ``path`` and set its modification time to ``mtime`` (seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))
    return path


def keys(requests: list[dg.RunRequest] | None, new_keys: list[str] | None = None) -> list[str]:
    """The partition keys of the run requests (a run over new sources carries a range of them,
    in the order ``new_keys`` registers them)."""
    out: list[str] = []
    for r in requests or []:
        out += request_keys(r, list(new_keys or []))
    return out


def added_keys(result: dg.SensorResult) -> list[str]:
    return [k for req in result.dynamic_partitions_requests or [] for k in req.partition_keys]  # type: ignore[union-attr]


def run_key_of(request: dg.RunRequest) -> str:
    assert request.run_key is not None
    return request.run_key


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    (tmp_path / "raw" / "orders").mkdir(parents=True)
    return tmp_path / "raw"


@pytest.fixture
def lake(tmp_path: Path, raw: Path) -> LakeResource:
    return LakeResource(raw=str(raw), lake=str(tmp_path / "lake"), settle_seconds=SETTLE)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def real_sensor(table: str) -> dg.SensorDefinition:
    by_name = {s.name: s for s in DEFINED_SENSORS}
    assert f"{table}_sources" in by_name, sorted(by_name)
    return by_name[f"{table}_sources"]


def tick(
    table: str, instance: dg.DagsterInstance, lake: LakeResource, cursor: str | None
) -> tuple[dg.SensorResult | dg.SkipReason, str | None]:
    """One evaluation of the real sensor of ``table``: its result and the cursor it leaves."""
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources={"lake": lake})
    result = real_sensor(table)(context)
    assert isinstance(result, dg.SensorResult | dg.SkipReason), result
    if isinstance(result, dg.SensorResult):
        return result, result.cursor
    return result, context.cursor


def apply_partition_requests(instance: dg.DagsterInstance, result: dg.SensorResult) -> list[str]:
    """What the daemon does with a tick's dynamic partition requests."""
    added: list[str] = []
    for req in result.dynamic_partitions_requests or []:
        assert isinstance(req, dg.AddDynamicPartitionsRequest), req
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        added += list(req.partition_keys)
    return added


# ------------------------------------------------------------------------------------------
# evaluate(): the logic, with an explicit clock
# ------------------------------------------------------------------------------------------


def test_sensors_are_defined_per_table_running_every_10_s() -> None:
    names = {s.name for s in DEFINED_SENSORS}
    assert names == {f"{t}_sources" for t in TABLES_BY_NAME}
    for s in DEFINED_SENSORS:
        assert s.minimum_interval_seconds == 10
        assert s.default_status == dg.DefaultSensorStatus.RUNNING


def test_new_file_is_registered_and_requested(raw: Path, lake: LakeResource) -> None:
    now = time.time()
    path = put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 60)
    st = path.stat()

    new_keys, requests, cursor, waiting = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)

    assert new_keys == ["orders/orders_2024-01-01.csv"]
    assert keys(requests, new_keys) == ["orders/orders_2024-01-01.csv"]
    key = run_key_of(requests[0])
    assert str(st.st_mtime_ns) in key and str(st.st_size) in key
    assert waiting == []
    assert json.loads(cursor)  # a watermark, not a list of files


def test_unchanged_file_is_skipped(raw: Path, lake: LakeResource) -> None:
    now = time.time()
    put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 60)
    new_keys, requests, cursor, _ = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert len(requests) == 1

    again = evaluate(ORDERS, lake=lake, registered=set(new_keys), cursor=cursor, now=now + 30)
    assert again[0] == [] and again[1] == [] and again[3] == []


def test_changed_file_is_requested_again_with_a_new_run_key(raw: Path, lake: LakeResource) -> None:
    now = time.time()
    path = put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 60)
    new_keys, first, cursor, _ = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)

    put(path, orders_text(5, seed=1), mtime=now - 20)  # replaced: new content, newer mtime
    new_keys2, second, _, _ = evaluate(ORDERS, lake=lake, registered=set(new_keys), cursor=cursor, now=now)

    assert new_keys2 == []  # already a partition
    assert keys(second) == ["orders/orders_2024-01-01.csv"]
    assert second[0].run_key != first[0].run_key
    assert str(path.stat().st_mtime_ns) in run_key_of(second[0])


def test_file_still_being_written_waits_then_is_picked_up(raw: Path, lake: LakeResource) -> None:
    now = time.time()
    put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 1)  # written 1 s ago

    new_keys, requests, cursor, waiting = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert (new_keys, requests) == ([], [])
    assert waiting == ["orders/orders_2024-01-01.csv"]

    later = evaluate(ORDERS, lake=lake, registered=set(), cursor=cursor, now=now + SETTLE + 1)
    assert later[0] == ["orders/orders_2024-01-01.csv"]
    assert keys(later[1], later[0]) == ["orders/orders_2024-01-01.csv"]
    assert later[3] == []


def test_only_the_tables_own_files_and_no_ignored_ones(raw: Path, lake: LakeResource) -> None:
    now = time.time()
    put(raw / "orders" / "a.csv", orders_text(1), mtime=now - 60)
    put(raw / "orders_2024-01-09.csv", orders_text(1, seed=2), mtime=now - 60)  # in the raw root, by name
    for ignored in (".hidden.csv", "_notes.csv", "x.csv.tmp", "y.part"):
        put(raw / "orders" / ignored, "x\n", mtime=now - 60)
    put(raw / "products" / "products.csv", "product_id\n1\n", mtime=now - 60)

    new_keys, requests, _, _ = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert sorted(keys(requests, new_keys)) == ["orders/a.csv", "orders_2024-01-09.csv"]


# ------------------------------------------------------------------------------------------
# The real sensor definitions, through build_sensor_context
# ------------------------------------------------------------------------------------------


def test_real_sensor_registers_requests_then_skips(
    raw: Path, lake: LakeResource, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    now = time.time()
    path = put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 60)
    st = path.stat()
    name = partitions_name(ORDERS)
    assert name == "orders__sources"

    first, cursor = tick("orders", instance, lake, None)
    assert isinstance(first, dg.SensorResult)
    assert keys(first.run_requests, added_keys(first)) == ["orders/orders_2024-01-01.csv"]
    run_key = run_key_of((first.run_requests or [])[0])
    assert str(st.st_mtime_ns) in run_key and str(st.st_size) in run_key
    requests = first.dynamic_partitions_requests or []
    assert len(requests) == 1 and isinstance(requests[0], dg.AddDynamicPartitionsRequest)
    assert requests[0].partitions_def_name == name
    assert list(requests[0].partition_keys) == ["orders/orders_2024-01-01.csv"]
    assert instance.get_dynamic_partitions(name) == []  # not applied by build_sensor_context
    apply_partition_requests(instance, first)
    assert instance.get_dynamic_partitions(name) == ["orders/orders_2024-01-01.csv"]

    second, _ = tick("orders", instance, lake, cursor)
    assert isinstance(second, dg.SkipReason)
    assert "no new or changed" in (second.skip_message or "")

    # The sensor only lists files: it never opens (or creates) the manifest or the lake.
    assert not (tmp_path / "lake").exists()
    assert not any(tmp_path.rglob("*.duckdb"))


def test_real_sensor_requests_a_changed_file_again(raw: Path, lake: LakeResource, instance: dg.DagsterInstance) -> None:
    now = time.time()
    path = put(raw / "orders" / "orders_2024-01-01.csv", orders_text(3), mtime=now - 60)
    first, cursor = tick("orders", instance, lake, None)
    assert isinstance(first, dg.SensorResult)
    apply_partition_requests(instance, first)
    unchanged, cursor = tick("orders", instance, lake, cursor)
    assert isinstance(unchanged, dg.SkipReason)

    put(path, orders_text(7, seed=3), mtime=now - 30)
    changed, cursor = tick("orders", instance, lake, cursor)
    assert isinstance(changed, dg.SensorResult)
    assert keys(changed.run_requests) == ["orders/orders_2024-01-01.csv"]
    assert (changed.run_requests or [])[0].run_key != (first.run_requests or [])[0].run_key
    assert apply_partition_requests(instance, changed) == []  # already a partition
    again, _ = tick("orders", instance, lake, cursor)
    assert isinstance(again, dg.SkipReason)


def test_real_sensor_waits_for_a_file_still_being_written(
    raw: Path, lake: LakeResource, instance: dg.DagsterInstance
) -> None:
    path = raw / "orders" / "orders_2024-01-02.csv"
    path.write_text(orders_text(2))  # modified just now: still being written, as far as anyone knows

    waiting, cursor = tick("orders", instance, lake, None)
    assert isinstance(waiting, dg.SkipReason)
    assert "still being written" in (waiting.skip_message or "")
    assert instance.get_dynamic_partitions(partitions_name(ORDERS)) == []

    # The writer finished a while ago (as if the settle time had passed): a later tick takes it.
    past = time.time() - SETTLE - 2
    os.utime(path, (past, past))
    later, _ = tick("orders", instance, lake, cursor)
    assert isinstance(later, dg.SensorResult)
    assert keys(later.run_requests, added_keys(later)) == ["orders/orders_2024-01-02.csv"]
    assert [list(r.partition_keys) for r in later.dynamic_partitions_requests or []] == [  # type: ignore[union-attr]
        ["orders/orders_2024-01-02.csv"]
    ]


def test_delta_source_folder_is_one_partition_requested_again_on_a_new_commit(
    raw: Path, lake: LakeResource, instance: dg.DagsterInstance
) -> None:
    changes = raw / "returns" / "changes"
    write_deltalake(str(changes), pa.table({"return_id": pa.array([1, 2], pa.int64()), "op": ["I", "I"]}))
    past = time.time() - 60
    for p in (changes / "_delta_log").iterdir():
        os.utime(p, (past, past))

    first, cursor = tick("returns", instance, lake, None)
    assert isinstance(first, dg.SensorResult)
    assert keys(first.run_requests, added_keys(first)) == ["returns/changes"]  # not its data files
    assert [list(r.partition_keys) for r in first.dynamic_partitions_requests or []] == [["returns/changes"]]  # type: ignore[union-attr]
    apply_partition_requests(instance, first)
    assert instance.get_dynamic_partitions(partitions_name(RETURNS)) == ["returns/changes"]
    unchanged, cursor = tick("returns", instance, lake, cursor)
    assert isinstance(unchanged, dg.SkipReason)

    write_deltalake(str(changes), pa.table({"return_id": pa.array([3], pa.int64()), "op": ["U"]}), mode="append")
    # Just committed: the source waits for the settle time like a file ...
    fresh, cursor = tick("returns", instance, lake, cursor)
    assert isinstance(fresh, dg.SkipReason)
    assert "still being written" in (fresh.skip_message or "")
    # ... then is requested again, with a new run key.
    past = time.time() - SETTLE - 2
    newest = max((changes / "_delta_log").glob("*.json"))
    os.utime(newest, (past, past))
    second, _ = tick("returns", instance, lake, cursor)
    assert isinstance(second, dg.SensorResult)
    assert keys(second.run_requests) == ["returns/changes"]
    assert (second.run_requests or [])[0].run_key != (first.run_requests or [])[0].run_key
    assert apply_partition_requests(instance, second) == []


def test_ten_thousand_files_are_taken_500_per_tick(raw: Path, lake: LakeResource, instance: dg.DagsterInstance) -> None:
    folder = raw / "orders"
    base = time.time() - 3600
    names = [f"orders_{i:05d}.csv" for i in range(10_000)]
    for i, name in enumerate(names):
        p = folder / name
        p.write_text(f"{HEADER}{i},1,1,1,2024-01-01,2024-01-01T10:00:00Z,1,9.99,0,EUR,PAID,card\n")
        t = base + i / 1000
        os.utime(p, (t, t))
    expected = {f"orders/{n}" for n in names}

    started = time.perf_counter()
    first, cursor = tick("orders", instance, lake, None)
    seconds = time.perf_counter() - started
    print(f"\nfirst sensor tick over 10,000 new files: {seconds:.3f} s")
    assert isinstance(first, dg.SensorResult)
    first_keys = keys(first.run_requests, added_keys(first))
    assert len(first_keys) == sensors_module.MAX_SOURCES_PER_TICK == 500
    # One run per SOURCES_PER_RUN new sources, not one per file.
    assert len(first.run_requests or []) == 500 // sensors_module.SOURCES_PER_RUN == 5
    assert [list(r.partition_keys) for r in first.dynamic_partitions_requests or []] == [first_keys]  # type: ignore[union-attr]
    assert seconds < 10, f"a tick over 10,000 files took {seconds:.1f} s (the sensor timeout is 60 s)"

    requested: Counter[str] = Counter(first_keys)
    apply_partition_requests(instance, first)
    ticks, slowest = 1, seconds
    while True:
        started = time.perf_counter()
        result, cursor = tick("orders", instance, lake, cursor)
        slowest = max(slowest, time.perf_counter() - started)
        if isinstance(result, dg.SkipReason):
            break
        taken = keys(result.run_requests, added_keys(result))
        assert 0 < len(taken) <= 500
        requested.update(taken)
        assert apply_partition_requests(instance, result) == taken  # all new sources here
        ticks += 1
        assert ticks <= 25, "the sensor does not make progress"
    print(f"{ticks} ticks took the 10,000 files; slowest tick {slowest:.3f} s")
    assert ticks == 20
    assert set(requested) == expected and max(requested.values()) == 1
    assert len(instance.get_dynamic_partitions(partitions_name(ORDERS))) == 10_000


# ------------------------------------------------------------------------------------------
# Changes the watermark cursor must not lose
# ------------------------------------------------------------------------------------------


def test_changed_files_beyond_one_tick_with_the_same_mtime_are_all_requested(
    raw: Path, lake: LakeResource, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More changed sources than one tick takes, all with one modification time (files extracted
    from an archive, `touch -d`, a file system with coarse timestamps): the later ticks must still
    request those the first tick left."""
    monkeypatch.setattr(sensors_module, "MAX_SOURCES_PER_TICK", 2)
    now = time.time()
    paths = [put(raw / "orders" / f"o{i}.csv", orders_text(1, seed=i), mtime=now - 100) for i in range(5)]
    registered: set[str] = set()
    cursor = None
    for _ in range(5):
        new_keys, _requests, cursor, _ = evaluate(ORDERS, lake=lake, registered=registered, cursor=cursor, now=now)
        registered |= set(new_keys)
    assert len(registered) == 5

    for i, p in enumerate(paths):
        put(p, orders_text(2, seed=10 + i), mtime=now - 50)  # every file replaced, same new mtime
    requested: list[str] = []
    for _ in range(5):
        _, requests, cursor, _ = evaluate(ORDERS, lake=lake, registered=registered, cursor=cursor, now=now)
        requested += keys(requests)
    assert sorted(requested) == sorted(registered), f"requested only {sorted(requested)}"


def test_changed_file_with_an_older_mtime_is_requested(raw: Path, lake: LakeResource) -> None:
    """A source replaced by a file that keeps its own, older modification time (``cp -p``,
    ``rsync -t``, ``mv`` from a download folder) is a changed source all the same."""
    now = time.time()
    a = put(raw / "orders" / "a.csv", orders_text(1, seed=1), mtime=now - 300)
    put(raw / "orders" / "b.csv", orders_text(1, seed=2), mtime=now - 60)
    new_keys, requests, cursor, _ = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert sorted(keys(requests, new_keys)) == ["orders/a.csv", "orders/b.csv"]

    put(a, orders_text(4, seed=3), mtime=now - 200)  # new content, an mtime older than b's
    _, requests, _, _ = evaluate(ORDERS, lake=lake, registered=set(new_keys), cursor=cursor, now=now)
    assert keys(requests) == ["orders/a.csv"]


def test_a_file_dated_in_the_future_does_not_hold_later_ones_back(raw: Path, lake: LakeResource) -> None:
    """A wrong clock (a modification time an hour ahead) is not a write in progress."""
    now = time.time()
    put(raw / "orders" / "future.csv", orders_text(1, seed=1), mtime=now + 3600)
    put(raw / "orders" / "later.csv", orders_text(1, seed=2), mtime=now - 60)
    new_keys, requests, _, waiting = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert sorted(keys(requests, new_keys)) == ["orders/future.csv", "orders/later.csv"]
    assert waiting == []


def test_a_source_still_being_written_holds_the_cursor_before_it(raw: Path, lake: LakeResource) -> None:
    """Sources changed after one that is still being written wait with it, so that the cursor
    never passes it; once it settles, it and they are taken."""
    now = time.time()
    put(raw / "orders" / "early.csv", orders_text(1, seed=1), mtime=now - 60)
    slow = put(raw / "orders" / "slow.csv", orders_text(1, seed=2), mtime=now - 1)  # being written
    time.sleep(0.01)
    put(raw / "orders" / "copied.csv", orders_text(1, seed=3), mtime=now - 600)  # cp -p: old mtime
    new_keys, requests, cursor, waiting = evaluate(ORDERS, lake=lake, registered=set(), cursor=None, now=now)
    assert keys(requests, new_keys) == ["orders/early.csv"]
    assert waiting == ["orders/slow.csv"]

    os.utime(slow, (now - 30, now - 30))  # the writer finished
    later_keys, requests, _, _ = evaluate(ORDERS, lake=lake, registered=set(new_keys), cursor=cursor, now=now)
    assert sorted(keys(requests, later_keys)) == ["orders/copied.csv", "orders/slow.csv"]
