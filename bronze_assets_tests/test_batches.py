"""Small sources coalesced into shared files and published in one commit per batch; replacing one
of them later rewrites the shared files without its rows (CONTRACT sections 6 and 7)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from bronze_assets import readers, staging
from bronze_assets.lake import is_shared_file
from bronze_assets_tests.runhelpers import ORDERS_HEADER, Env, order_line, orders_csv, pairs, write


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def data_files(env: Env, table: str = "orders") -> list[str]:
    root = env.parquet_dir(table)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.parquet"))


def by_source(env: Env) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for src, order_id in zip(
        env.delta("orders").column("src_filename").to_pylist(),
        env.delta("orders").column("order_id").to_pylist(),
        strict=True,
    ):
        out.setdefault(src, []).append(order_id)
    return {k: sorted(v) for k, v in sorted(out.items())}


def assert_outputs_equal(env: Env) -> None:
    assert sorted(pairs(env.parquet("orders"))) == sorted(pairs(env.delta("orders")))
    active = sorted(DeltaTable(str(env.delta_dir("orders"))).file_uris())
    assert len(active) == len(data_files(env))


def test_many_small_sources_make_one_commit_and_one_file_per_partition(env: Env) -> None:
    for i in range(40):
        write(env.raw / "orders" / f"o{i:02d}.csv", orders_csv(range(i * 10, i * 10 + 5), day=f"2024-01-0{1 + i % 3}"))
    res = env.run()
    assert len(res.outcomes) == 40 and all(o.status == "success" and o.rows == 5 for o in res.outcomes)
    assert DeltaTable(str(env.delta_dir("orders"))).version() == 1  # created, then one commit
    files = data_files(env)
    assert [f.split("/")[0] for f in files] == ["order_dt=2024-01-01", "order_dt=2024-01-02", "order_dt=2024-01-03"]
    assert all(is_shared_file(f) for f in files)
    assert_outputs_equal(env)
    assert len(env.rejects_files("orders")) == 40  # rejects stay one file per source
    assert {r["delta_version"] for r in env.manifest_rows().values()} == {1}

    # One of them changes: the shared file that held it is rewritten without its rows.
    write(env.raw / "orders" / "o07.csv", orders_csv([9001, 9002], day="2024-01-02"), age_s=5)
    res = env.run()
    assert [(o.src_path, o.rows) for o in res.outcomes] == [("orders/o07.csv", 2)]
    got = by_source(env)
    assert got["orders/o07.csv"] == [9001, 9002]
    assert got["orders/o06.csv"] == list(range(60, 65))
    assert sum(len(v) for v in got.values()) == 39 * 5 + 2
    assert_outputs_equal(env)


def test_a_strict_failure_in_a_batch_loads_nothing_of_that_source_only(env: Env) -> None:
    write(env.raw / "orders" / "a.csv", orders_csv(range(1, 4)))
    write(env.raw / "orders" / "b.csv", orders_csv(range(10, 14), bad={11: {"quantity": "x"}}))
    write(env.raw / "orders" / "c.csv", orders_csv(range(20, 22)))
    res = env.run(validation_mode="strict")
    assert {o.src_path: o.status for o in res.outcomes} == {
        "orders/a.csv": "success",
        "orders/b.csv": "failed",
        "orders/c.csv": "success",
    }
    assert by_source(env) == {"orders/a.csv": [1, 2, 3], "orders/c.csv": [20, 21]}
    assert_outputs_equal(env)


def test_a_source_over_the_small_size_writes_files_of_its_own(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    write(env.raw / "orders" / "big.csv", orders_csv(range(1, 2001)))
    write(env.raw / "orders" / "small.csv", orders_csv(range(5000, 5003)))
    env.run(small_source_bytes=20_000)
    files = data_files(env)
    owners = Counter("shared" if is_shared_file(f) else "own" for f in files)
    assert owners == {"own": 1, "shared": 1}
    assert by_source(env) == {"orders/big.csv": list(range(1, 2001)), "orders/small.csv": [5000, 5001, 5002]}
    assert_outputs_equal(env)


def test_a_batch_closes_after_its_source_limit(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(staging, "BATCH_SOURCES", 3)
    for i in range(7):
        write(env.raw / "orders" / f"o{i}.csv", orders_csv(range(i * 10, i * 10 + 2)))
    env.run()
    assert DeltaTable(str(env.delta_dir("orders"))).version() == 3  # created, then batches of 3, 3, 1
    assert sum(len(v) for v in by_source(env).values()) == 14
    assert_outputs_equal(env)


def _events_jsonl(n: int) -> bytes:
    lines = []
    for i in range(1, n + 1):
        if i % 19 == 0:
            lines.append(f'{{"event_id": "e{i}", "event_ts": ')  # invalid JSON: MALFORMED_RECORD
            continue
        session = "" if i % 11 == 0 else f"s{i % 5}"  # empty: MISSING_REQUIRED
        lines.append(
            f'{{"event_id": "e{i}", "event_ts": "2024-01-0{1 + i % 3}T10:00:00Z", '
            f'"session_id": "{session}", "event_type": "view"}}'
        )
    return ("\n".join(lines) + "\n").encode()


def _orders_spread(n: int) -> bytes:
    bad: dict[int, dict[str, str]] = {i: {"quantity": "x"} for i in range(13, n + 1, 13)}
    bad.update({i: {"customer_id": ""} for i in range(17, n + 1, 17)})
    lines = [ORDERS_HEADER] + [order_line(i, day=f"2024-01-0{1 + i % 3}", **bad.get(i, {})) for i in range(1, n + 1)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("table", "name", "data"),
    [("orders", "orders_big.csv", _orders_spread(3000)), ("events", "events_big.jsonl", _events_jsonl(3000))],
)
def test_a_source_validated_two_batches_at_a_time_loads_as_one_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, table: str, name: str, data: bytes
) -> None:
    # Streamed in batches of a few KiB (not held with other small sources), each validated in
    # one of two lanes: rows, their order in each partition file, rejects and counts must be
    # those of one lane.
    monkeypatch.setattr(staging, "HOLD_RAW_BYTES", 0)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 4096)
    made: list[int] = []

    class Counted(staging.Validator):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            made.append(kwargs["threads"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(staging, "Validator", Counted)
    seen = {}
    for lanes in (1, 2):
        monkeypatch.setattr(staging, "VALIDATE_LANES", lanes)
        made.clear()
        env = Env(tmp_path / f"lanes{lanes}")
        write(env.raw / table / name, data)
        [outcome] = env.run().outcomes
        assert made == [2 // lanes] * lanes
        files = {}
        for f in sorted(env.parquet_dir(table).rglob("*.parquet")):
            numbers = pq.read_table(f).column("src_row_number").to_pylist()
            assert numbers == sorted(numbers)
            files[f.parent.relative_to(env.parquet_dir(table)).as_posix()] = numbers
        rejects = [(r["src_row_number"], r["reason_code"], r["raw_record"]) for r in env.rejects(table)]
        assert [int(r[0]) for r in rejects] == sorted(int(r[0]) for r in rejects)
        assert outcome.rows + outcome.reject_count == 3000
        assert sorted([n for v in files.values() for n in v] + [int(r[0]) for r in rejects]) == list(range(1, 3001))
        seen[lanes] = (outcome.rows, dict(outcome.rejects), files, rejects)
    assert len(seen[1][2]) == 3 and seen[1][0] > 2500
    assert seen[1] == seen[2]
