"""The Dagster assets in process: partitions, IO managers, checks, metadata."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable

from bronze_assets.assets import build_table_asset, partitions_name
from bronze_assets.io_managers import DeltaIOManager, ParquetIOManager, RejectsIOManager
from bronze_assets.resources import LakeResource, ManifestResource
from schemas.schemas import TABLES_BY_NAME

SAMPLE = Path(__file__).resolve().parents[1] / "data_raw"
ORDERS = TABLES_BY_NAME["orders"]


@dataclass
class Env:
    root: Path
    instance: dg.DagsterInstance

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    def resources(self) -> dict[str, object]:
        return {
            "lake": LakeResource(raw=str(self.raw), lake=str(self.lake)),
            "manifest": ManifestResource(database=str(self.root / "m.duckdb")),
            "delta_io": DeltaIOManager(lake=str(self.lake)),
            "parquet_io": ParquetIOManager(lake=str(self.lake)),
            "rejects_io": RejectsIOManager(lake=str(self.lake)),
        }

    def materialize(self, keys: list[str], *, table: str = "orders", **kwargs: object) -> dg.ExecuteInProcessResult:
        t = TABLES_BY_NAME[table]
        self.instance.add_dynamic_partitions(partitions_name(t), keys)
        asset = build_table_asset(t)
        if len(keys) == 1:
            return dg.materialize(
                [asset], partition_key=keys[0], instance=self.instance, resources=self.resources(),
                raise_on_error=False, **kwargs  # type: ignore[arg-type]
            )
        tags = {"dagster/asset_partition_range_start": keys[0], "dagster/asset_partition_range_end": keys[-1]}
        return dg.materialize(
            [asset], instance=self.instance, resources=self.resources(), raise_on_error=False, tags=tags,
            **kwargs,  # type: ignore[arg-type]
        )

    def rows(self, fmt: str, table: str = "orders") -> dict[str, int]:
        path = self.lake / "bronze" / fmt / table
        if fmt == "delta":
            t = DeltaTable(str(path)).to_pyarrow_table(columns=["src_filename"])
        else:
            t = pads.dataset(str(path), format="parquet", partitioning="hive").to_table(columns=["src_filename"])
        out: dict[str, int] = {}
        for name in t.column("src_filename").to_pylist():
            out[name] = out.get(name, 0) + 1
        return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    (tmp_path / "raw" / "orders").mkdir(parents=True)
    for name in ("orders_2024-01-01.csv", "orders_2024-01-02.csv", "orders_2024-01-03.csv"):
        shutil.copy(SAMPLE / "orders" / name, tmp_path / "raw" / "orders" / name)
    with dg.instance_for_test() as instance:
        yield Env(tmp_path, instance)


def checks_of(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, dg.AssetCheckSeverity]]:
    return {e.check_name: (e.passed, e.severity) for e in result.get_asset_check_evaluations()}


def test_one_partition_lands_in_both_outputs_with_metadata_and_passing_checks(env: Env) -> None:
    result = env.materialize(["orders/orders_2024-01-01.csv"])
    assert result.success
    assert env.rows("delta") == env.rows("parquet") == {"orders/orders_2024-01-01.csv": 297}
    mats = {m.asset_key.to_user_string(): m for m in result.asset_materializations_for_node("bronze_orders")}
    assert set(mats) == {"bronze/orders/delta", "bronze/orders/parquet", "bronze/orders/rejects"}
    rejects_md = mats["bronze/orders/rejects"].metadata
    assert (rejects_md["rows_rejected"].value, rejects_md["reject_files"].value) == (3, 1)
    md = mats["bronze/orders/delta"].metadata
    assert md["dagster/row_count"].value == 297
    assert md["rows_rejected"].value == 3
    assert md["rejected_malformed_record"].value == 1
    assert md["files_written"].value == 1
    assert md["bytes_written"].value > 0
    assert md["delta_version"].value == 1
    assert checks_of(result) == {
        "schema_conforms": (True, dg.AssetCheckSeverity.ERROR),
        "reject_rate": (True, dg.AssetCheckSeverity.WARN),
        "audit_columns_complete": (True, dg.AssetCheckSeverity.ERROR),
        "parquet_matches_delta": (True, dg.AssetCheckSeverity.ERROR),
    }


def test_a_multi_partition_run_adds_without_losing_other_partitions(env: Env) -> None:
    assert env.materialize(["orders/orders_2024-01-01.csv"]).success
    version = DeltaTable(str(env.lake / "bronze/delta/orders")).version()
    result = env.materialize(["orders/orders_2024-01-02.csv", "orders/orders_2024-01-03.csv"])
    assert result.success
    expected = {"orders/orders_2024-01-01.csv": 297, "orders/orders_2024-01-02.csv": 296, "orders/orders_2024-01-03.csv": 297}
    assert env.rows("delta") == env.rows("parquet") == expected
    assert DeltaTable(str(env.lake / "bronze/delta/orders")).version() == version + 1  # one commit for the run


def test_materializing_an_unchanged_source_writes_nothing_unless_reprocessed(env: Env) -> None:
    key = "orders/orders_2024-01-01.csv"
    assert env.materialize([key]).success
    dt_path = str(env.lake / "bronze/delta/orders")
    version = DeltaTable(dt_path).version()
    again = env.materialize([key])
    assert again.success and DeltaTable(dt_path).version() == version
    assert env.rows("delta") == {key: 297}
    config = dg.RunConfig(ops={"bronze_orders": {"config": {"reprocess": True}}})
    forced = env.materialize([key], run_config=config)
    assert forced.success and DeltaTable(dt_path).version() == version + 1
    assert env.rows("delta") == env.rows("parquet") == {key: 297}


def test_a_reject_rate_over_the_threshold_fails_its_check_with_warn_severity(env: Env) -> None:
    bad = env.raw / "orders" / "orders_bad.csv"
    lines = (SAMPLE / "orders" / "orders_2024-01-05.csv").read_text().splitlines()
    bad.write_text("\n".join([lines[0]] + [ln.replace(",PAID,", ",paid,") for ln in lines[1:40]]) + "\n")
    result = env.materialize(["orders/orders_bad.csv"])
    assert result.success  # a WARN check does not fail the run
    passed, severity = checks_of(result)["reject_rate"]
    assert not passed and severity == dg.AssetCheckSeverity.WARN
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "reject_rate")
    assert evaluation.metadata["reject_rate"].value > ORDERS.max_reject_fraction


def test_a_tampered_delta_table_fails_the_identity_check(env: Env) -> None:
    assert env.materialize(["orders/orders_2024-01-01.csv"]).success
    DeltaTable(str(env.lake / "bronze/delta/orders")).delete("src_row_number = 5")
    result = env.materialize(["orders/orders_2024-01-02.csv"])
    passed, severity = checks_of(result)["parquet_matches_delta"]
    assert not passed and severity == dg.AssetCheckSeverity.ERROR
    evaluation = next(e for e in result.get_asset_check_evaluations() if e.check_name == "parquet_matches_delta")
    assert evaluation.metadata["files_only_in_delta"].value or evaluation.metadata["files_only_in_parquet"].value


def test_strict_mode_failure_fails_the_run_and_loads_nothing(env: Env) -> None:
    config = dg.RunConfig(ops={"bronze_orders": {"config": {"validation_mode": "strict"}}})
    result = env.materialize(["orders/orders_2024-01-01.csv"], run_config=config)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    assert "strict mode" in str(failure.event_specific_data)
    assert not list((env.lake / "bronze/parquet/orders").rglob("*.parquet"))


def test_definitions_load() -> None:
    from bronze_assets.definitions import defs

    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"bronze/orders/delta", "bronze/orders/parquet", "bronze/returns/delta"} <= keys


def test_returns_upserted_through_the_io_managers_with_the_one_row_per_key_check(env: Env) -> None:
    shutil.copytree(SAMPLE / "returns", env.raw / "returns")
    keys = ["returns/changes", "returns/returns_2024-01.csv", "returns/returns_2024-02.csv"]
    result = env.materialize(keys, table="returns")
    assert result.success
    checks = checks_of(result)
    assert checks["one_row_per_key"] == (True, dg.AssetCheckSeverity.ERROR)
    assert all(passed for passed, _ in checks.values()), checks
    delta = DeltaTable(str(env.lake / "bronze" / "delta" / "returns")).to_pyarrow_table()
    ids = delta.column("return_id").to_pylist()
    assert len(ids) == len(set(ids)) == 259
    assert sum(env.rows("parquet", "returns").values()) == 259
    mats = [m for m in result.asset_materializations_for_node("bronze_returns") if m.asset_key.path[-1] == "delta"]
    assert sorted(str(m.partition) for m in mats) == keys
    mat = mats[0]
    assert mat.metadata["dagster/row_count"].value == 312  # valid records read, before the merge
    assert mat.metadata["sources_ingested"].value == 6  # two files and four Delta versions

    # A row appended behind the merge's back: the key check fails and shows the key.
    from deltalake import write_deltalake

    write_deltalake(str(env.lake / "bronze" / "delta" / "returns"), delta.slice(0, 1), mode="append")
    from bronze_assets import checks as checks_module
    from bronze_assets.lake import Lake

    passed, evidence = checks_module.one_row_per_key(Lake(env.lake), TABLES_BY_NAME["returns"])
    assert not passed
    assert evidence["keys_with_several_rows"] == 1
    assert evidence["examples"] == [{"return_id": ids[0], "rows": 2}]


def test_the_rejects_asset_loads_the_reject_rows_of_its_partitions(env: Env) -> None:
    assert env.materialize(["orders/orders_2024-01-01.csv", "orders/orders_2024-01-02.csv"]).success
    manager = RejectsIOManager(lake=str(env.lake))
    context = dg.build_input_context(
        asset_key=dg.AssetKey(["bronze", "orders", "rejects"]),
        partition_key="orders/orders_2024-01-01.csv",
        asset_partitions_def=dg.DynamicPartitionsDefinition(name=partitions_name(ORDERS)),
        instance=env.instance,
    )
    rows = manager.load_input(context)
    assert rows.num_rows == 3
    assert set(rows.column("src_filename").to_pylist()) == {"orders/orders_2024-01-01.csv"}
    assert rows.schema.field("src_row_number").type == pa.int64()
    everything = manager.load_input(dg.build_input_context(asset_key=dg.AssetKey(["bronze", "orders", "rejects"])))
    assert everything.num_rows == 3 + 4
