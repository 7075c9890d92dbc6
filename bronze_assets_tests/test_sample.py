"""The bundled sample (CONTRACT section 9): what ingesting data_raw/ yields, and that its generator
is deterministic."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from deltalake import DeltaTable

from bronze_assets.sample import write_bundled_sample
from bronze_assets_tests.runhelpers import REPO_ROOT, Env, pairs, snapshot

BUNDLED = REPO_ROOT / "data_raw"

# table -> (rows written, rejects by reason)
EXPECTED: dict[str, tuple[int, Counter[str]]] = {
    "customers": (194, Counter(UNREADABLE_FILE=1, MISSING_REQUIRED=3, TYPE_MISMATCH=3)),
    "products": (294, Counter(MALFORMED_RECORD=1, MISSING_REQUIRED=1, TYPE_MISMATCH=3, CONSTRAINT_VIOLATION=1)),
    "stores": (27, Counter(MALFORMED_RECORD=1, MISSING_REQUIRED=1, TYPE_MISMATCH=1)),
    "orders": (
        1936,
        Counter(SCHEMA_MISMATCH=20, MALFORMED_RECORD=4, MISSING_REQUIRED=2, TYPE_MISMATCH=4, CONSTRAINT_VIOLATION=4),
    ),
    "events": (895, Counter(MALFORMED_RECORD=2, MISSING_REQUIRED=1, TYPE_MISMATCH=2)),
    "sensors": (795, Counter(UNREADABLE_FILE=1, MISSING_REQUIRED=2, TYPE_MISMATCH=1, CONSTRAINT_VIOLATION=2)),
    "returns": (312, Counter(MISSING_REQUIRED=1, CONSTRAINT_VIOLATION=1)),
}
APPEND_TABLES = [t for t in EXPECTED if t != "returns"]
RETURNS_SOURCES = [
    "returns/changes@v0",
    "returns/changes@v1",
    "returns/changes@v2",
    "returns/changes@v3",
    "returns/returns_2024-01.csv",
    "returns/returns_2024-02.csv",
]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The bundled sample, copied and ingested once: (env, result)."""
    env = Env(tmp_path_factory.mktemp("sample"))
    shutil.copytree(BUNDLED, env.raw)
    return env, env.run()


def per_table(result) -> dict[str, tuple[int, Counter[str]]]:
    out: dict[str, tuple[int, Counter[str]]] = {}
    for o in result.outcomes:
        rows, rejects = out.get(o.table, (0, Counter()))
        out[o.table] = (rows + o.rows, rejects + o.rejects)
    return out


def test_sample_rows_written_and_rejects_by_reason(sample):
    _, result = sample
    assert per_table(result) == EXPECTED
    assert result.exit_code == 1
    assert result.unmatched == ("inventory_2024-01-01.csv",)
    assert result.too_new == ()


def test_sample_outputs_hold_the_rows_written(sample):
    env, _ = sample
    for table in APPEND_TABLES:
        rows, _ = EXPECTED[table]
        pq_pairs = pairs(env.parquet(table))
        assert len(pq_pairs) == rows, table
        assert len(set(pq_pairs)) == rows, table
        assert sorted(pairs(env.delta(table))) == sorted(pq_pairs), table


def test_sample_rejects_files_hold_the_rejects(sample):
    env, result = sample
    for table, (_, rejects) in EXPECTED.items():
        assert Counter(r["reason_code"] for r in env.rejects(table)) == rejects, table
    # one rejects file per ingested source, and no other .csv file
    ingested = Counter(o.table for o in result.outcomes if o.status in ("success", "rejected"))
    assert {t: len(env.rejects_files(t)) for t in EXPECTED} == dict(ingested)
    all_csv = sorted((env.lake / "_rejects").rglob("*.csv"))
    assert len(all_csv) == sum(ingested.values())


def test_sample_manifest(sample):
    env, _ = sample
    rows = env.manifest_rows()
    assert "inventory_2024-01-01.csv" not in rows
    assert "orders/_notes.csv" not in rows
    copy = rows["orders/orders_2024-01-02_copy.csv"]
    assert (copy["status"], copy["row_count"], copy["reject_count"]) == ("duplicate", 0, 0)
    statuses = {p: r["status"] for p, r in rows.items() if r["status"] != "success"}
    assert statuses == {
        "orders/orders_2024-01-02_copy.csv": "duplicate",
        "orders/orders_2024-01-07_legacy.csv": "rejected",
        "customers_legacy.xlsx": "rejected",
        "sensors/sensors_corrupt.parquet": "rejected",
    }
    for path in ("customers_legacy.xlsx", "sensors/sensors_corrupt.parquet"):
        assert (rows[path]["row_count"], rows[path]["reject_count"]) == (0, 1)
    legacy = rows["orders/orders_2024-01-07_legacy.csv"]
    assert (legacy["row_count"], legacy["reject_count"]) == (0, 20)

    for table, (written, rejects) in EXPECTED.items():
        mine = [r for r in rows.values() if r["table_name"] == table]
        assert sum(r["row_count"] for r in mine) == written, table
        assert sum(r["reject_count"] for r in mine) == sum(rejects.values()), table


def test_sample_returns_sources_and_watermark(sample):
    env, result = sample
    returns = [o for o in result.outcomes if o.table == "returns"]
    assert sorted(o.src_path for o in returns) == RETURNS_SOURCES
    assert all(o.status == "success" for o in returns)
    rows = env.manifest_rows()
    assert sorted(p for p, r in rows.items() if r["table_name"] == "returns") == RETURNS_SOURCES
    for version in range(4):
        assert rows[f"returns/changes@v{version}"]["file_size_bytes"] > 0
    marks = env.watermarks()
    assert marks["returns/changes"]["last_version"] == 3
    assert marks["returns/changes"]["table_name"] == "returns"


@pytest.mark.slow
def test_sample_second_run_writes_nothing(tmp_path):
    env = Env(tmp_path)
    shutil.copytree(BUNDLED, env.raw)
    env.run()
    lake_before = snapshot(env.lake)
    versions = env.delta_versions()
    manifest_before = env.manifest_rows()

    again = env.run()
    assert again.outcomes == []
    assert again.exit_code == 0
    assert env.delta_versions() == versions
    assert snapshot(env.lake) == lake_before
    assert env.manifest_rows() == manifest_before


@pytest.mark.slow
def test_sample_dry_run_predicts_the_figures_and_creates_nothing(tmp_path):
    env = Env(tmp_path)
    shutil.copytree(BUNDLED, env.raw)
    dry = env.run(dry_run=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_raw"]
    assert per_table(dry) == EXPECTED
    assert dry.exit_code == 1


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith("returns/changes/")
    }


def _delta_versions(path: Path) -> list[list[dict[str, object]]]:
    """Every version of a Delta table, as rows sorted by their values."""
    latest = DeltaTable(str(path)).version()
    out = []
    for version in range(latest + 1):
        rows = DeltaTable(str(path), version=version).to_pyarrow_table().to_pylist()
        out.append(sorted(rows, key=repr))
    return out


def test_sample_generator_is_deterministic(tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    write_bundled_sample(first)
    write_bundled_sample(second)
    one, two = _files(first), _files(second)
    assert sorted(one) == sorted(two)
    assert [p for p in one if one[p] != two[p]] == []
    assert len(one) >= 15
    # the Delta source has random file names, but the same versions holding the same rows
    assert _delta_versions(first / "returns" / "changes") == _delta_versions(second / "returns" / "changes")


def test_bundled_sample_is_what_the_generator_writes(tmp_path):
    write_bundled_sample(tmp_path)
    generated, bundled = _files(tmp_path), _files(BUNDLED)
    assert sorted(generated) == sorted(bundled)
    assert [p for p in generated if generated[p] != bundled[p]] == []
    assert _delta_versions(tmp_path / "returns" / "changes") == _delta_versions(BUNDLED / "returns" / "changes")
