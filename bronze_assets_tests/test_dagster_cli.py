"""The CI path through the real ``dagster`` CLI on a fresh, persistent DAGSTER_HOME:

    dagster job execute -m bronze_assets.definitions -j register_raw_sources_job
    dagster asset materialize -m bronze_assets.definitions --select 'bronze/T/delta,bronze/T/parquet,bronze/T/rejects' \\
        --partition-range 'FIRST...LAST'          # one run per table
    dagster asset materialize ... --partition KEY  # one source

over a copy of the bundled sample, and the lake it leaves must equal what one clean
``load-to-bronze`` run writes for the same tables (every row but ``ingestion_ts``, in both outputs,
and the manifest rows).
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef

from bronze_assets_tests.dagster_helpers import (
    MODULE,
    SAMPLE,
    Paths,
    content,
    environment,
    executable,
    explain,
    load_to_bronze_command,
    make_dagster_home,
    manifest,
    rows_by_source,
    run,
)

pytestmark = pytest.mark.slow

RANGE_TABLES = ("orders", "events")  # one --partition-range run each
SINGLE = ("stores", "stores.json")  # one --partition run
TABLES = (*RANGE_TABLES, SINGLE[0])


def selection(table: str) -> str:
    return f"bronze/{table}/delta,bronze/{table}/parquet,bronze/{table}/rejects"


def registered(home: Path, table: str) -> list[str]:
    """The table's partition keys as the instance holds them (insertion order)."""
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        return list(instance.get_dynamic_partitions(f"{table}__sources"))


@dataclass(frozen=True)
class RegisteredOrders:
    """A DAGSTER_HOME whose instance has registered the sample's orders sources, the lake the
    Dagster runs write (``paths``), a second copy of the raw folder for a clean command-line run
    (``reference``), and the command that materializes every orders source."""

    home: Path
    paths: Paths
    reference: Paths
    env: dict[str, str]
    materialize: list[str]


def registered_orders(tmp_path: Path, name: str) -> RegisteredOrders:
    dagster = executable("dagster")
    home = make_dagster_home(tmp_path / "home")
    paths, reference = Paths(tmp_path / name), Paths(tmp_path / "reference")
    for p in (paths, reference):
        (p.raw / "orders").mkdir(parents=True)
        for f in (SAMPLE / "orders").iterdir():
            shutil.copy2(f, p.raw / "orders" / f.name)
    env = environment(paths, home)
    reg = run([dagster, "job", "execute", "-m", MODULE, "-j", "register_raw_sources_job"], env=env)
    assert reg.returncode == 0, explain(reg)
    keys = registered(home, "orders")
    materialize = [dagster, "asset", "materialize", "-m", MODULE, "--select", selection("orders"),
                   "--partition-range", f"{keys[0]}...{keys[-1]}"]  # fmt: skip
    return RegisteredOrders(home, paths, reference, env, materialize)


def test_cli_register_then_materialize_matches_load_to_bronze(tmp_path: Path) -> None:
    dagster = executable("dagster")
    home = make_dagster_home(tmp_path / "dagster_home")
    paths = Paths(tmp_path / "dagster")
    reference = Paths(tmp_path / "reference")
    for p in (paths, reference):
        shutil.copytree(SAMPLE, p.raw)
    env = environment(paths, home)

    # The reference: one clean command-line run of the same tables, into another lake (it runs
    # while the Dagster CLI starts up).
    ref_args = ["--raw", str(reference.raw), "--lake", str(reference.lake), "--manifest", str(reference.manifest)]
    ref = subprocess.Popen(
        [*load_to_bronze_command(), *ref_args, "--tables", ",".join(TABLES)],
        cwd=tmp_path, env=environment(reference), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    # 1. Register every raw source as a partition of its table.
    reg = run([dagster, "job", "execute", "-m", MODULE, "-j", "register_raw_sources_job"], env=env)
    assert reg.returncode == 0, explain(reg)
    orders_keys = registered(home, "orders")
    assert orders_keys == sorted(
        p.relative_to(paths.raw).as_posix()
        for p in (paths.raw / "orders").iterdir()
        if not p.name.startswith((".", "_"))
    )
    assert "orders/orders_2024-01-02_copy.csv" in orders_keys
    assert registered(home, "returns") == ["returns/changes", "returns/returns_2024-01.csv", "returns/returns_2024-02.csv"]
    assert registered(home, SINGLE[0]) == [SINGLE[1]]
    assert not paths.lake.exists() or not any((paths.lake / "bronze").rglob("*.parquet"))  # registering ingests nothing

    # 2. One run per table over all its sources, FIRST...LAST in registration order.
    for table in RANGE_TABLES:
        keys = registered(home, table)
        proc = run(
            [dagster, "asset", "materialize", "-m", MODULE, "--select", selection(table),
             "--partition-range", f"{keys[0]}...{keys[-1]}"],
            env=env,
        )
        assert proc.returncode == 0, explain(proc)

    # 3. One source alone.
    table, key = SINGLE
    proc = run([dagster, "asset", "materialize", "-m", MODULE, "--select", selection(table), "--partition", key], env=env)
    assert proc.returncode == 0, explain(proc)

    out, err = ref.communicate(timeout=120)
    assert ref.returncode == 1, f"load-to-bronze (rejects expected): exit {ref.returncode}\n{out}\n{err}"

    # The lake equals the command line's, in both outputs.
    for table in TABLES:
        for fmt in ("delta", "parquet"):
            assert rows_by_source(paths.lake, table, fmt) == rows_by_source(reference.lake, table, fmt), (table, fmt)
            assert content(paths.lake, table, fmt) == content(reference.lake, table, fmt), (table, fmt)
    assert sum(rows_by_source(paths.lake, "orders", "delta").values()) == 1936
    assert sum(rows_by_source(paths.lake, "orders", "parquet").values()) == 1936
    assert sum(rows_by_source(paths.lake, "events", "delta").values()) == 895
    assert sum(rows_by_source(paths.lake, "stores", "delta").values()) == 27
    # Nothing of the tables left out.
    assert not (paths.lake / "bronze" / "delta" / "customers").exists()

    mine, theirs = manifest(paths.manifest), manifest(reference.manifest)
    assert mine == theirs
    assert mine["orders/orders_2024-01-02_copy.csv"][1:] == ("duplicate", 0, 0)
    assert mine["orders/orders_2024-01-07_legacy.csv"][1:] == ("rejected", 0, 20)
    assert mine["stores.json"][1:] == ("success", 27, 3)

    # The instance knows what was materialized, with the metadata the UI plots, and the checks.
    with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance:
        for asset in ("delta", "parquet"):
            key_ = dg.AssetKey(["bronze", "orders", asset])
            assert instance.get_materialized_partitions(key_) == set(orders_keys)
            event = instance.get_latest_materialization_event(key_)
            assert event is not None and event.asset_materialization is not None
            metadata = event.asset_materialization.metadata
            assert metadata["dagster/row_count"].value == 1936
            assert metadata["rows_rejected"].value == 34
        results = {t: latest_checks(instance, t) for t in TABLES}

    expected_rows = {"orders": 1936, "events": 895, "stores": 27}
    problems = []
    for table, checks in results.items():
        assert set(checks) == set(CHECKS), (table, checks)
        for name in ("schema_conforms", "audit_columns_complete", "parquet_matches_delta"):
            if not checks[name][0]:
                problems.append(f"{table}: {name} failed: {checks[name][1]}")
        # The audit check looked at every row written, not at an empty or partial selection.
        checked = checks["audit_columns_complete"][1]["rows_checked"]
        if checked != expected_rows[table]:
            problems.append(f"{table}: audit_columns_complete checked {checked} rows of {expected_rows[table]}")
    # reject_rate works both ways on the sample: orders 34/1970 and events 5/900 are under 5%;
    # stores.json rejects 3 of its 30 records.
    assert results["orders"]["reject_rate"][0] and results["events"]["reject_rate"][0]
    assert not results["stores"]["reject_rate"][0]
    assert results["stores"]["reject_rate"][1]["rows_rejected"] == 3
    assert not problems, "\n".join(problems)

CHECKS = {
    "schema_conforms": "delta",
    "reject_rate": "delta",
    "audit_columns_complete": "delta",
    "parquet_matches_delta": "parquet",
}


def latest_checks(instance: dg.DagsterInstance, table: str) -> dict[str, tuple[bool, dict[str, object]]]:
    """{check name: (passed, metadata)} of the latest execution of each check of ``table``."""
    out: dict[str, tuple[bool, dict[str, object]]] = {}
    for name, asset in CHECKS.items():
        check_key = dg.AssetCheckKey(dg.AssetKey(["bronze", table, asset]), name)
        records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=1)
        assert records, f"no execution of {check_key.to_user_string()}"
        evaluation = records[0].event.asset_check_evaluation if records[0].event else None
        assert evaluation is not None, records[0]
        out[name] = (evaluation.passed, {k: v.value for k, v in evaluation.metadata.items()})
    return out
