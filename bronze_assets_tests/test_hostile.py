"""Hostile input (CONTRACT sections 3, 5 and 11): a generated corpus of broken, odd and
malicious files, each of which must get its named outcome (a manifest status and reject
reasons) and never crash the run, while the good files beside them still load; and what the
project writes never lets a value or a file name out of the lake or into a statement."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from deltalake import DeltaTable

import bronze_assets.readers as readers
from bronze_assets.ingest import RunResult, Settings, run
from bronze_assets.lake import Lake, hive_value
from bronze_assets_tests.hostile import GOOD, write_corpus


class Corpus:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.raw = root / "raw"
        self.expect = write_corpus(self.raw)
        self.settings = Settings(raw=self.raw, lake=root / "lake", manifest=root / "m.duckdb")

    def manifest(self) -> dict[str, dict[str, Any]]:
        with duckdb.connect(str(self.settings.manifest), read_only=True) as con:
            cur = con.execute("SELECT * FROM manifest_processed_files")
            names = [d[0] for d in cur.description]
            return {r[0]: dict(zip(names, r, strict=True)) for r in cur.fetchall()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, RunResult]:
    c = Corpus(tmp_path_factory.mktemp("hostile"))
    # The XLSX guard's limit is 2 GiB; a bomb of that size would take minutes to make here.
    mp = pytest.MonkeyPatch()
    mp.setattr(readers, "MAX_XLSX_UNCOMPRESSED", 32 << 20)
    try:
        result = run(c.settings)
    finally:
        mp.undo()
    return c, result


def test_the_corpus_is_large_enough(corpus: tuple[Corpus, RunResult]) -> None:
    c, _ = corpus
    assert len(c.expect) - len(GOOD) >= 40


def test_every_hostile_file_gets_its_outcome(corpus: tuple[Corpus, RunResult]) -> None:
    c, result = corpus
    got = {o.src_path: o for o in result.outcomes}
    problems = []
    for path, e in sorted(c.expect.items()):
        if e.status is None:
            if path in got or path not in result.unmatched:
                problems.append(f"{path!r}: expected to be listed as unmatched")
            continue
        o = got.get(path)
        if o is None:
            problems.append(f"{path!r}: no outcome")
            continue
        if o.status != e.status:
            problems.append(f"{path!r}: status {o.status} ({o.error}), expected {e.status} ({e.note})")
        if e.reasons and dict(o.rejects) != e.reasons:
            problems.append(f"{path!r}: rejects {dict(o.rejects)}, expected {e.reasons}")
        if o.rows != e.rows:
            problems.append(f"{path!r}: {o.rows} rows, expected {e.rows}")
        if o.status in ("rejected", "failed") and not o.error:
            problems.append(f"{path!r}: {o.status} without a one-line error")
        if o.error and "\n" in o.error:
            problems.append(f"{path!r}: error of several lines")
    assert not problems, "\n".join(problems)
    assert result.exit_code == 2  # the broken Delta source failed; nothing crashed


def test_every_record_is_accounted_for(corpus: tuple[Corpus, RunResult]) -> None:
    c, result = corpus
    manifest = c.manifest()
    for o in result.outcomes:
        if o.status == "failed":
            assert manifest[o.src_path]["row_count"] == 0
            continue
        assert (manifest[o.src_path]["row_count"], manifest[o.src_path]["reject_count"]) == (o.rows, o.reject_count)
    lake = Lake(c.settings.lake)
    for table in ("orders", "events", "sensors", "stores", "customers"):
        dt_ = lake.delta_table(table)
        assert dt_ is not None
        rows = Counter(dt_.to_pyarrow_table(columns=["src_filename"]).column(0).to_pylist())
        expected = {o.src_path: o.rows for o in result.outcomes if o.table == table and o.rows}
        assert dict(rows) == expected, table


def test_good_files_load_next_to_the_hostile_ones(corpus: tuple[Corpus, RunResult]) -> None:
    _, result = corpus
    got = {o.src_path: o for o in result.outcomes}
    for path, rows in GOOD.items():
        assert (got[path].status, got[path].rows, got[path].reject_count) == ("success", rows, 0), path


def test_values_of_the_odd_files(corpus: tuple[Corpus, RunResult]) -> None:
    c, _ = corpus
    lake = Lake(c.settings.lake)
    orders = {r["src_filename"]: r for r in lake.delta_table("orders").to_pyarrow_table().to_pylist()}  # type: ignore[union-attr]
    assert len(orders["orders/big_field.csv"]["payment_method"]) == 20 << 20
    wide = json.loads(orders["orders/wide.csv"]["_rescued_data"])
    assert len(wide) == 10_000 - 12 and set(wide.values()) == {"v"} and list(wide)[:2] == ["extra_0", "extra_1"]
    assert orders["orders/o'brien; DROP TABLE manifest_processed_files; --.csv"]["order_id"] > 0
    events = {r["event_id"]: r for r in lake.delta_table("events").to_pyarrow_table().to_pylist()}  # type: ignore[union-attr]
    assert events["d1"]["properties"] == "[" * 10_000 + "]" * 10_000
    sensors = lake.delta_table("sensors").to_pyarrow_table().to_pylist()  # type: ignore[union-attr]
    nested = [r for r in sensors if r["src_filename"] == "sensors/nested.parquet"]
    assert json.loads(nested[0]["_rescued_data"]) == {"tags": ["x", "y"], "meta": {"k": 1}}
    customers = {r["customer_id"]: r for r in lake.delta_table("customers").to_pyarrow_table().to_pylist()}  # type: ignore[union-attr]
    assert customers[5]["signup_dt"].isoformat() == "2024-01-01"  # an Excel date stored as a number
    assert customers[2]["first_name"] is None  # a formula without a cached value
    latin = [r for r in Lake(c.settings.lake).rejects_dir("orders").glob("*.csv") if "latin1" in r.name]
    assert "caf\\xe9" in latin[0].read_text()


def test_nothing_escapes_the_lake_and_the_manifest_survives(corpus: tuple[Corpus, RunResult]) -> None:
    c, _ = corpus
    lake_root = c.settings.lake.resolve()
    for path in lake_root.rglob("*"):
        assert path.resolve().is_relative_to(lake_root)
    outside = [p for p in c.root.iterdir() if p.name not in {"raw", "lake", "m.duckdb", "m.duckdb.lock", "outside.csv"}]
    assert outside == [], outside
    assert "manifest_processed_files" in {r[0] for r in duckdb.connect(str(c.settings.manifest), read_only=True).execute("SHOW TABLES").fetchall()}


@pytest.mark.parametrize("value", ["../../etc", "a/b", "x%2Fy", "..", "'; DROP TABLE t; --", "é ☃", "", " ", None])
def test_partition_values_cannot_leave_the_table_folder(value: str | None, tmp_path: Path) -> None:
    folder = f"order_dt={hive_value(value)}"
    assert "/" not in folder and "\\" not in folder
    assert (tmp_path / folder).resolve().parent == tmp_path.resolve()


def test_duplicate_json_keys_take_the_first_value(corpus: tuple[Corpus, RunResult]) -> None:
    c, _ = corpus
    events = Lake(c.settings.lake).delta_table("events").to_pyarrow_table()  # type: ignore[union-attr]
    dup = [r for r in events.to_pylist() if r["src_filename"] == "events/dup_keys.jsonl"]
    assert [r["event_id"] for r in dup] == ["k1"]


def test_a_file_that_grows_while_it_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer appends while the run reads: the source fails and loads nothing; the next run
    reads it whole."""
    from bronze_assets import staging
    from bronze_assets_tests.hostile import order, orders_text

    raw = tmp_path / "raw" / "orders"
    raw.mkdir(parents=True)
    path = raw / "growing.csv"
    path.write_text(orders_text(order(1), order(2)))
    real = staging.open_source

    def appending(source: Any) -> Any:
        reading = real(source)
        with open(source.path, "a") as fh:
            fh.write(order(3) + "\n")
        return reading

    monkeypatch.setattr(staging, "open_source", appending)
    settings = Settings(raw=tmp_path / "raw", lake=tmp_path / "lake", manifest=tmp_path / "m.duckdb")
    first = run(settings)
    assert [(o.status, o.rows) for o in first.outcomes] == [("failed", 0)]
    assert "changed while it was read" in (first.outcomes[0].error or "")
    assert first.exit_code == 2
    monkeypatch.setattr(staging, "open_source", real)
    second = run(settings)
    assert [(o.status, o.rows) for o in second.outcomes] == [("success", 3)]
    assert DeltaTable(str(tmp_path / "lake" / "bronze" / "delta" / "orders")).to_pyarrow_table().num_rows == 3


def test_wide_and_narrow_rescue_write_the_same_json(tmp_path: Path) -> None:
    """More than WIDE_RESCUE undeclared columns are rescued another way: the JSON is the same."""
    from bronze_assets.validation import WIDE_RESCUE
    from bronze_assets_tests.hostile import ORDERS_HEADER, order

    values = ['a"b', " ", "", "x\\y", "ü"]
    raw = tmp_path / "raw" / "orders"
    raw.mkdir(parents=True)
    for name, n in (("narrow.csv", len(values)), ("wide.csv", WIDE_RESCUE + 10)):
        names = [f"e{i}" for i in range(n)]
        cells = [f'"{v}"'.replace('a"b', 'a""b') if '"' in v else v for v in (values * n)[:n]]
        (raw / name).write_text(",".join([ORDERS_HEADER, *names]) + "\n" + ",".join([order(1), *cells]) + "\n")
    run(Settings(raw=tmp_path / "raw", lake=tmp_path / "lake", manifest=tmp_path / "m.duckdb"))
    table = DeltaTable(str(tmp_path / "lake" / "bronze" / "delta" / "orders")).to_pyarrow_table()
    got = dict(zip(table.column("src_filename").to_pylist(), table.column("_rescued_data").to_pylist(), strict=True))
    narrow, wide = got["orders/narrow.csv"], got["orders/wide.csv"]
    assert narrow == '{"e0":"a\\"b","e3":"x\\\\y","e4":"ü"}'
    assert wide.startswith(narrow[:-1] + ",")
    assert pa.array([wide]).cast(pa.string())[0].as_py() == wide
