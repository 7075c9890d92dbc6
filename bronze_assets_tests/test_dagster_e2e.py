"""End to end through a real ``dagster dev`` (webserver + daemon), driven through its GraphQL API.

The server starts on a raw folder holding two orders files, with its own DAGSTER_HOME (a copy of
the repository's ``dagster.yaml``: pool limit 1, four concurrent runs) and its own lake and
manifest. Files are then dropped into the raw folder as a user would; the sensors must register
them, their runs must succeed with passing checks, and the lake must end up exactly as one clean
``load-to-bronze`` run over the same raw folder writes it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from bronze_assets_tests.dagster_helpers import (
    SAMPLE,
    DagsterDev,
    Paths,
    content,
    environment,
    explain,
    load_to_bronze,
    make_dagster_home,
    manifest,
    rows_by_source,
)

pytestmark = pytest.mark.slow

INITIAL = ("orders_2024-01-01.csv", "orders_2024-01-02.csv")
NEW = "orders_2024-01-03.csv"
FOUR = ("orders_2024-01-04.csv", "orders_2024-01-05.csv", "orders_2024-01-06.csv.gz", "orders_2024-01-08.csv")
WAIT = 150  # seconds, for the runs of one step of a test
ORDERS_ASSETS = (["bronze", "orders", "delta"], ["bronze", "orders", "parquet"])
EXPECTED_CHECKS = {
    ("bronze/orders/delta", "schema_conforms"),
    ("bronze/orders/delta", "reject_rate"),
    ("bronze/orders/delta", "audit_columns_complete"),
    ("bronze/orders/parquet", "parquet_matches_delta"),
}


def key(name: str) -> str:
    return f"orders/{name}"


def drop(paths: Paths, *names: str) -> None:
    """Copy sample files into the raw folder as new files (fresh modification times)."""
    for name in names:
        shutil.copy(SAMPLE / "orders" / name, paths.raw / "orders" / name)


def raw_orders(paths: Paths) -> list[str]:
    return sorted(key(p.name) for p in (paths.raw / "orders").iterdir())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DagsterDev, Paths]]:
    root = tmp_path_factory.mktemp("dagster_dev")
    paths = Paths(root)
    (paths.raw / "orders").mkdir(parents=True)
    for name in INITIAL:  # already settled: they keep the sample's modification times
        shutil.copy2(SAMPLE / "orders" / name, paths.raw / "orders" / name)
    home = make_dagster_home(root / "dagster_home")
    dev = DagsterDev(home, environment(paths, home), root / "dagster_dev.log")
    try:
        dev.start()
        yield dev, paths
    finally:
        dev.stop()


def assert_checks_pass(dev: DagsterDev) -> None:
    checks = dev.checks(ORDERS_ASSETS)
    assert set(checks) == EXPECTED_CHECKS, checks
    assert all(status == "SUCCEEDED" for status in checks.values()), checks


def test_sensor_run_ingests_a_new_file(server: tuple[DagsterDev, Paths]) -> None:
    dev, paths = server
    drop(paths, NEW)  # while the runs of the two initial files may still be going

    runs = dev.wait_for_success([key(n) for n in (*INITIAL, NEW)], timeout=WAIT)

    run = runs[key(NEW)]
    assert run.tags.get("dagster/sensor_name") == "orders_sources", run.tags
    assert run.keys == [key(NEW)]
    assert run.tags.get("bronze/table") == "orders", run.tags
    assert_checks_pass(dev)

    rows = manifest(paths.manifest)
    assert rows[key(NEW)] == ("orders", "success", 297, 3)
    for fmt in ("delta", "parquet"):
        by_source = rows_by_source(paths.lake, "orders", fmt)
        assert by_source[key(NEW)] == 297, (fmt, by_source)
        assert set(by_source) == {key(n) for n in (*INITIAL, NEW)}, (fmt, by_source)


def test_four_files_at_once_all_succeed_and_match_a_clean_cli_run(
    server: tuple[DagsterDev, Paths], tmp_path: Path
) -> None:
    dev, paths = server
    drop(paths, *FOUR)

    runs = dev.wait_for_success(raw_orders(paths), timeout=WAIT)
    assert {key(n) for n in FOUR} <= set(runs)

    every_run = dev.runs()
    assert all(r.status == "SUCCESS" for r in every_run), [(r.keys, r.status) for r in every_run]
    # Each source in exactly one run: nothing ran twice, nothing failed and was retried.
    partitions = [k for r in every_run for k in r.keys]
    assert sorted(partitions) == raw_orders(paths), partitions
    # The four files dropped together are taken by one tick, in one run (two, should a tick fall
    # in the milliseconds between the files settling).
    four = [r for r in every_run if set(r.keys) & {key(n) for n in FOUR}]
    assert 1 <= len(four) <= 2 and max(len(r.keys) for r in four) >= 2, [r.keys for r in four]
    errors = dev.run_errors(every_run)
    assert errors == "", errors  # no DuckDB lock error, no error of any kind
    assert_checks_pass(dev)

    # The reference: one clean command-line run over a copy of the same raw folder.
    reference = Paths(tmp_path / "reference")
    shutil.copytree(paths.raw, reference.raw)
    ref = load_to_bronze(reference)
    assert ref.returncode == 1, explain(ref)  # the sample's deliberate bad records

    for fmt in ("delta", "parquet"):
        mine = rows_by_source(paths.lake, "orders", fmt)
        assert mine == rows_by_source(reference.lake, "orders", fmt), fmt
        assert set(mine) == set(raw_orders(paths))
        assert content(paths.lake, "orders", fmt) == content(reference.lake, "orders", fmt), fmt
    assert sum(rows_by_source(paths.lake, "orders", "delta").values()) == 297 + 296 + 297 + 298 + 300 + 299 + 149
    assert manifest(paths.manifest) == manifest(reference.manifest)
