"""The benchmark at small sizes (``make bench-quick``), so that it never rots: every case runs,
every configuration succeeds, and the report has its ratios and targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bronze_assets import bench

pytestmark = pytest.mark.slow


def test_quick_benchmark_runs_every_case_and_writes_its_report(tmp_path: Path) -> None:
    assert bench.main(["--quick", "--lake", str(tmp_path / "lake")]) == 0
    report = json.loads((tmp_path / "lake" / "_bench" / "quick.json").read_text())
    cases = {r["case"] for r in report["results"]}
    assert {"orders_20000", "events_10000", "sensors_20000", "small_files_50x200", "scale_10000", "scale_40000",
            "returns_merge_1000_into_20000"} <= cases
    for r in report["results"]:
        assert r["runs"], r["name"]
        assert all(m["returncode"] == 0 for m in r["runs"]), r
        assert all(m["wall_s"] > 0 and m["peak_mib"] > 0 for m in r["runs"])
    assert report["ratios"]["orders_20000"]["duckdb_bare"] == 1.0
    assert report["ratios"]["orders_20000"]["bronze"] > 0
    assert {"pyarrow_parse", "duckdb_validating", "duckdb_statement"} <= set(report["ratios"]["orders_20000"])
    orders = next(r for r in report["results"] if r["case"] == "orders_20000" and r["name"] == "bronze")
    assert orders["files"]["after_ingestion"]["files"] >= orders["files"]["after_compaction"]["files"] > 0
    shape = orders["files"]["after_ingestion"]
    assert shape["row_groups_per_file_max"] >= 1
    assert 0 < shape["rows_per_row_group_median"] <= 20_000
    assert {t["target"].split(":")[0] for t in report["targets"]} >= {"orders_20000", "small_files_50x200"}
    assert "duckdb_bare" in report["table"]
