"""Small sources coalesced into shared files and published in one commit per batch; replacing one
of them later rewrites the shared files without its rows (CONTRACT sections 6 and 7)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from bronze_assets import staging
from bronze_assets.lake import is_shared_file
from bronze_assets_tests.runhelpers import Env, orders_csv, pairs, write


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
