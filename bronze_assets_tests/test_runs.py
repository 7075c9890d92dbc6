"""Run-level behaviour (CONTRACT sections 5, 7, 10, 11): idempotency, replacement of changed
sources, duplicates, --reprocess, --dry-run, strict mode, file-level rejects, table selection,
--min-file-age, and what the manifest records."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from bronze_assets.cli import main
from bronze_assets.ingest import RunResult, Session
from bronze_assets_tests.runhelpers import (
    ORDERS_HEADER,
    Env,
    by_src,
    orders_csv,
    pairs,
    products_csv,
    rows_of,
    snapshot,
    write,
)

A = "orders/orders_a.csv"
B = "orders/orders_b.csv"
P = "products/products.csv"


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.raw.mkdir()
    return e


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_outputs_agree(env: Env, table: str) -> None:
    """Parquet and Delta hold the same rows (by source and record number), none twice."""
    pq_pairs = pairs(env.parquet(table))
    delta_pairs = pairs(env.delta(table))
    assert sorted(pq_pairs) == sorted(delta_pairs)
    assert len(set(pq_pairs)) == len(pq_pairs)


def order_ids(env: Env, table_src: str, *, output: str = "parquet") -> set[int]:
    data = env.parquet("orders") if output == "parquet" else env.delta("orders")
    return set(rows_of(data, table_src).column("order_id").to_pylist())


def ingestion_ts(env: Env, src: str, *, output: str) -> set[dt.datetime]:
    data = env.parquet("orders") if output == "parquet" else env.delta("orders")
    return set(rows_of(data, src).column("ingestion_ts").to_pylist())


def rejects_by_src(env: Env, table: str) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for row in env.rejects(table):
        out.setdefault(row["src_filename"], []).append(row)
    return out


# --- idempotency ------------------------------------------------------------------------------


def test_second_run_writes_nothing(env):
    write(env.raw / A, orders_csv(range(1, 6), bad={3: {"quantity": "x"}}))
    write(env.raw / "orders_2024-01-02.csv", orders_csv(range(10, 13), day="2024-01-02"))
    write(env.raw / P, products_csv(range(1, 4)))

    first = env.run()
    assert {o.src_path: (o.status, o.rows, o.reject_count) for o in first.outcomes} == {
        A: ("success", 4, 1),
        "orders_2024-01-02.csv": ("success", 3, 0),
        P: ("success", 3, 0),
    }
    assert first.exit_code == 1
    lake_before = snapshot(env.lake)
    versions_before = env.delta_versions()
    manifest_before = env.manifest_rows()
    history_before = env.schema_history()
    assert versions_before.keys() == {"orders", "products"}

    second = env.run()
    assert second.outcomes == []
    assert second.unchanged == Counter(orders=2, products=1)
    assert second.exit_code == 0
    assert env.delta_versions() == versions_before
    assert snapshot(env.lake) == lake_before
    assert env.manifest_rows() == manifest_before
    assert env.schema_history() == history_before

    # the command line agrees: nothing new is exit 0, and still nothing is written
    assert main([*env.cli_args("--quiet")], out=io.StringIO()) == 0
    assert snapshot(env.lake) == lake_before
    assert env.delta_versions() == versions_before
    assert env.parquet("orders").num_rows == 7
    assert_outputs_agree(env, "orders")


def test_touched_but_unchanged_source_is_not_ingested_again(env):
    data = orders_csv(range(1, 4))
    write(env.raw / A, data)
    env.run()
    lake_before = snapshot(env.lake)
    versions_before = env.delta_versions()
    write(env.raw / A, data, age_s=None)  # same bytes, new modification time

    again = env.run()
    assert again.outcomes == []
    assert again.unchanged == Counter(orders=1)
    assert again.exit_code == 0
    assert snapshot(env.lake) == lake_before
    assert env.delta_versions() == versions_before


# --- a changed source replaces its rows and rejects -----------------------------------------------


def test_changed_source_replaces_its_rows_and_rejects(env):
    write(env.raw / A, orders_csv(range(1, 5), bad={2: {"quantity": "x"}}))
    write(env.raw / B, orders_csv(range(100, 103), day="2024-01-03"))
    env.run()
    b_ts_before = ingestion_ts(env, B, output="parquet")
    v_before = env.delta_version("orders")
    assert order_ids(env, A) == {1, 3, 4}
    assert len(env.rejects_files("orders")) == 2

    new_a = orders_csv(range(50, 55), day="2024-01-02", bad={51: {"quantity": "0"}, 53: {"customer_id": ""}})
    write(env.raw / A, new_a, age_s=5)
    res = env.run()

    assert [(o.src_path, o.status, o.rows, o.rejects) for o in res.outcomes] == [
        (A, "success", 3, Counter(CONSTRAINT_VIOLATION=1, MISSING_REQUIRED=1))
    ]
    assert res.unchanged == Counter(orders=1)
    assert env.delta_version("orders") > v_before
    for output in ("parquet", "delta"):
        assert order_ids(env, A, output=output) == {50, 52, 54}
        assert order_ids(env, B, output=output) == {100, 101, 102}
        assert ingestion_ts(env, B, output=output) == b_ts_before
    assert_outputs_agree(env, "orders")
    assert env.parquet("orders").num_rows == 6
    # the old partition held only A's old rows: no data file of it is left
    assert not list((env.parquet_dir("orders") / "order_dt=2024-01-01").glob("**/*.parquet"))

    # one rejects file per source; A's old reject is gone, its two new ones are there once
    assert len(env.rejects_files("orders")) == 2
    rejects = rejects_by_src(env, "orders")
    assert sorted((r["src_row_number"], r["reason_code"]) for r in rejects[A]) == [
        ("2", "CONSTRAINT_VIOLATION"),
        ("4", "MISSING_REQUIRED"),
    ]
    assert B not in rejects

    row = env.manifest_rows()[A]
    assert (row["status"], row["row_count"], row["reject_count"]) == ("success", 3, 2)
    assert row["file_checksum"] == sha256(new_a)
    assert row["file_size_bytes"] == len(new_a)


def test_changed_source_that_became_unloadable_withdraws_its_rows(env):
    write(env.raw / A, orders_csv(range(1, 4)))
    write(env.raw / B, orders_csv(range(100, 102)))
    env.run()
    legacy = ORDERS_HEADER.replace(",order_ts", "") + "\n7,1,1,1,2024-01-01,1,9.99,0,EUR,PAID,card\n"
    write(env.raw / A, legacy.encode(), age_s=5)

    res = env.run()
    assert [(o.src_path, o.status, o.rows, o.rejects) for o in res.outcomes] == [
        (A, "rejected", 0, Counter(SCHEMA_MISMATCH=1))
    ]
    for output in ("parquet", "delta"):
        assert order_ids(env, A, output=output) == set()
        assert order_ids(env, B, output=output) == {100, 101}
    assert_outputs_agree(env, "orders")
    assert [r["reason_code"] for r in rejects_by_src(env, "orders")[A]] == ["SCHEMA_MISMATCH"]


def test_changed_source_that_became_a_duplicate_withdraws_its_rows_and_rejects(env):
    write(env.raw / A, orders_csv(range(1, 4), bad={2: {"quantity": "x"}}))
    b = orders_csv(range(100, 102))
    write(env.raw / B, b)
    env.run()
    write(env.raw / A, b, age_s=5)

    res = env.run()
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in res.outcomes] == [(A, "duplicate", 0, 0)]
    for output in ("parquet", "delta"):
        assert order_ids(env, A, output=output) == set()
        assert order_ids(env, B, output=output) == {100, 101}
    assert A not in rejects_by_src(env, "orders")
    assert len(env.rejects_files("orders")) == 1
    row = env.manifest_rows()[A]
    assert (row["status"], row["row_count"], row["reject_count"]) == ("duplicate", 0, 0)


# --- duplicates -------------------------------------------------------------------------------


def test_copy_of_an_ingested_source_is_a_duplicate_and_loads_nothing(env):
    data = orders_csv(range(1, 5), bad={4: {"quantity": "x"}})
    write(env.raw / A, data)
    first = env.run()
    assert first.exit_code == 1
    lake_before = snapshot(env.lake / "bronze")
    versions_before = env.delta_versions()

    copy = "orders/zz/orders_copy.csv"
    write(env.raw / copy, data)
    res = env.run()
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in res.outcomes] == [(copy, "duplicate", 0, 0)]
    assert res.exit_code == 0  # its only new source is a duplicate, although the original had rejects
    assert env.delta_versions() == versions_before
    assert snapshot(env.lake / "bronze") == lake_before
    assert copy not in {s for s, _ in pairs(env.parquet("orders"))}
    assert list(rejects_by_src(env, "orders")) == [A]
    assert len(env.rejects_files("orders")) == 1

    row = env.manifest_rows()[copy]
    assert (row["status"], row["row_count"], row["reject_count"]) == ("duplicate", 0, 0)
    assert row["file_checksum"] == sha256(data)

    # known duplicates are not reported again
    assert env.run().outcomes == []
    assert main(env.cli_args("--quiet"), out=io.StringIO()) == 0


def test_duplicate_only_run_exits_0_on_the_command_line(env):
    data = orders_csv(range(1, 3), bad={1: {"quantity": "0"}})
    write(env.raw / A, data)
    assert main(env.cli_args("--quiet"), out=io.StringIO()) == 1
    write(env.raw / "orders_2024-03-01.csv", data)
    out = io.StringIO()
    assert main(env.cli_args("--quiet"), out=out) == 0
    assert env.manifest_rows()["orders_2024-03-01.csv"]["status"] == "duplicate"


def test_within_a_run_the_later_src_path_is_the_duplicate(env):
    data = orders_csv(range(1, 4))
    # written in the reverse of lexicographic order, so that neither mtime nor creation order decides
    write(env.raw / "orders_2024-01-01.csv", data, age_s=30)
    write(env.raw / "orders/b.csv", data, age_s=20)
    write(env.raw / "orders/a.csv", data, age_s=10)

    res = env.run()
    # 'orders/a.csv' < 'orders/b.csv' < 'orders_2024-01-01.csv'
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in res.outcomes] == [
        ("orders/a.csv", "success", 3, 0),
        ("orders/b.csv", "duplicate", 0, 0),
        ("orders_2024-01-01.csv", "duplicate", 0, 0),
    ]
    assert res.exit_code == 0
    assert {s for s, _ in pairs(env.parquet("orders"))} == {"orders/a.csv"}
    assert_outputs_agree(env, "orders")
    rows = env.manifest_rows()
    assert {p: (r["status"], r["row_count"], r["reject_count"]) for p, r in rows.items()} == {
        "orders/a.csv": ("success", 3, 0),
        "orders/b.csv": ("duplicate", 0, 0),
        "orders_2024-01-01.csv": ("duplicate", 0, 0),
    }


def test_identical_bytes_in_another_table_are_not_a_duplicate(env):
    data = orders_csv(range(1, 3))
    write(env.raw / A, data)
    write(env.raw / "products/orders_like.csv", data)
    res = by_src(env.run())
    assert res[A].status == "success"
    # products lacks its required columns in this file: rejected, never 'duplicate'
    assert res["products/orders_like.csv"].status == "rejected"


# --- checksums --------------------------------------------------------------------------------


def _run_after_listing(env: Env, then) -> RunResult:
    """A run whose sources are listed, then ``then()`` is called before they are staged."""
    with Session(env.settings()) as session:
        then()
        for batch in session.batches(session.sources):
            session.publish(batch)
            session.finish(batch)
        return session.result()


def test_a_source_gone_after_listing_fails_alone_and_the_others_load(env):
    big = orders_csv(range(1, 200))
    write(env.raw / A, orders_csv(range(1, 4)))
    write(env.raw / B, big)  # no ingested source has its size: checksummed while it is staged

    res = _run_after_listing(env, lambda: (env.raw / A).unlink())
    out = by_src(res)
    assert out[A].status == "failed" and out[A].rows == 0
    assert "\n" not in out[A].error and "No such file" in out[A].error
    assert (out[B].status, out[B].rows) == ("success", 199)
    assert res.exit_code == 2
    rows = env.manifest_rows()
    assert rows[A]["status"] == "failed"
    assert rows[B]["file_checksum"] == sha256(big)
    assert {s for s, _ in pairs(env.parquet("orders"))} == {B}


def test_a_changed_source_gone_before_its_checksum_keeps_what_it_loaded(env):
    # The changed file has the size of an ingested one, so its checksum is needed before it is
    # staged (it could be a duplicate); the file goes away first.
    write(env.raw / A, orders_csv(range(1, 4)))
    env.run()
    write(env.raw / A, orders_csv(range(4, 7)), age_s=5)  # same length, other content

    res = _run_after_listing(env, lambda: (env.raw / A).unlink())
    assert [(o.src_path, o.status) for o in res.outcomes] == [(A, "failed")]
    assert res.outcomes[0].error == "not readable since it was listed: No such file or directory"
    assert order_ids(env, A) == order_ids(env, A, output="delta") == {1, 2, 3}
    assert env.manifest_rows()[A]["status"] == "failed"


def test_a_changed_source_gone_while_it_is_staged_keeps_what_it_loaded(env):
    write(env.raw / A, orders_csv(range(1, 4)))
    env.run()
    write(env.raw / A, orders_csv(range(1, 40)), age_s=5)  # a new size: checksummed while staged
    versions = env.delta_versions()

    res = _run_after_listing(env, lambda: (env.raw / A).unlink())
    assert [(o.src_path, o.status) for o in res.outcomes] == [(A, "failed")]
    assert order_ids(env, A) == order_ids(env, A, output="delta") == {1, 2, 3}
    assert env.delta_versions() == versions


def test_a_checksum_that_fails_while_its_source_is_staged_loads_nothing(env, monkeypatch):
    import bronze_assets.ingest as ingest

    data = orders_csv(range(1, 50))
    write(env.raw / A, data)

    def unreadable(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ingest, "sha256_file", unreadable)
    res = env.run()
    assert [(o.src_path, o.status, o.error) for o in res.outcomes] == [(A, "failed", "checksum: Permission denied")]
    assert env.delta_version("orders") in (None, 0)
    assert not (env.delta_dir("orders").exists() and env.delta("orders").num_rows)
    assert env.manifest_rows()[A]["status"] == "failed"

    monkeypatch.undo()
    res = env.run()
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [(A, "success", 49)]
    assert env.manifest_rows()[A]["file_checksum"] == sha256(data)
    assert sorted(order_ids(env, A)) == list(range(1, 50))


# --- --reprocess ------------------------------------------------------------------------------


def test_reprocess_reingests_an_unchanged_source(env):
    write(env.raw / A, orders_csv(range(1, 5), bad={2: {"quantity": "x"}}))
    write(env.raw / B, orders_csv(range(100, 103)))
    env.run()
    a_ts = ingestion_ts(env, A, output="parquet")
    b_ts = ingestion_ts(env, B, output="parquet")
    a_rejects_ts = {r["ingestion_ts"] for r in rejects_by_src(env, "orders")[A]}
    v_before = env.delta_version("orders")
    run_before = env.manifest_rows()[A]["run_id"]

    res = env.run(reprocess=(A,))
    assert [(o.src_path, o.status, o.rows, o.rejects) for o in res.outcomes] == [
        (A, "success", 3, Counter(TYPE_MISMATCH=1))
    ]
    assert res.unchanged == Counter(orders=1)
    assert env.delta_version("orders") > v_before
    for output in ("parquet", "delta"):
        new_ts = ingestion_ts(env, A, output=output)
        assert len(new_ts) == 1 and new_ts != a_ts
        assert order_ids(env, A, output=output) == {1, 3, 4}
        assert ingestion_ts(env, B, output=output) == b_ts
    assert env.parquet("orders").num_rows == 6
    assert_outputs_agree(env, "orders")
    rejects = rejects_by_src(env, "orders")
    assert [r["src_row_number"] for r in rejects[A]] == ["2"]
    assert {r["ingestion_ts"] for r in rejects[A]} != a_rejects_ts
    assert len(env.rejects_files("orders")) == 2
    assert env.manifest_rows()[A]["run_id"] == res.run_id != run_before


def test_reprocess_takes_several_paths(env):
    write(env.raw / A, orders_csv(range(1, 4)))
    write(env.raw / B, orders_csv(range(100, 103)))
    write(env.raw / P, products_csv(range(1, 3)))
    env.run()
    before = env.manifest_rows()
    versions = env.delta_versions()

    assert main(env.cli_args("--quiet", "--reprocess", A, P), out=io.StringIO()) == 0
    after = env.manifest_rows()
    assert after[A]["run_id"] == after[P]["run_id"] != before[A]["run_id"]
    assert after[B] == before[B]
    assert env.delta_version("orders") > versions["orders"]
    assert env.delta_version("products") > versions["products"]
    assert env.parquet("orders").num_rows == 6
    assert env.parquet("products").num_rows == 2
    assert_outputs_agree(env, "orders")
    assert_outputs_agree(env, "products")


def test_reprocess_of_an_unknown_path_is_a_bad_argument(env, capsys):
    write(env.raw / A, orders_csv(range(1, 3)))
    env.run()
    lake_before = snapshot(env.lake)
    capsys.readouterr()

    assert main(env.cli_args("--quiet", "--reprocess", "orders/nope.csv"), out=io.StringIO()) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "orders/nope.csv" in err
    assert "Traceback" not in err
    assert snapshot(env.lake) == lake_before


# --- --dry-run --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "expected_code"),
    [("clean", 0), ("rejects", 1), ("strict", 2)],
)
def test_dry_run_on_a_fresh_folder_creates_nothing_and_predicts_the_exit_code(tmp_path, scenario, expected_code):
    env = Env(tmp_path)
    bad = {} if scenario == "clean" else {2: {"quantity": "x"}}
    write(env.raw / A, orders_csv(range(1, 5), bad=bad))
    write(env.raw / P, products_csv(range(1, 3)))
    mode = "strict" if scenario == "strict" else None
    raw_before = snapshot(env.raw)

    dry = env.run(dry_run=True, validation_mode=mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_raw"]
    assert snapshot(env.raw) == raw_before
    assert dry.exit_code == expected_code

    flags = ["--quiet", "--dry-run"] + (["--validation-mode", "strict"] if mode else [])
    out = io.StringIO()
    assert main(env.cli_args(*flags), out=out) == expected_code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_raw"]
    assert "orders" in out.getvalue()

    real = env.run(validation_mode=mode)
    assert real.exit_code == expected_code
    summary = [(o.src_path, o.status, o.rows, o.rejects) for o in dry.outcomes]
    assert summary == [(o.src_path, o.status, o.rows, o.rejects) for o in real.outcomes]


def test_dry_run_on_an_existing_lake_writes_nothing_and_reports_only_new_sources(env):
    write(env.raw / A, orders_csv(range(1, 4)))
    env.run()
    write(env.raw / B, orders_csv(range(100, 105), bad={101: {"quantity": "0"}}))
    everything_before = snapshot(env.root)
    manifest_before = env.manifest_rows()

    dry = env.run(dry_run=True)
    assert [(o.src_path, o.status, o.rows, o.rejects) for o in dry.outcomes] == [
        (B, "success", 4, Counter(CONSTRAINT_VIOLATION=1))
    ]
    assert dry.exit_code == 1
    assert snapshot(env.root) == everything_before
    assert env.manifest_rows() == manifest_before

    real = env.run()
    assert [(o.src_path, o.status, o.rows, o.rejects) for o in real.outcomes] == [
        (o.src_path, o.status, o.rows, o.rejects) for o in dry.outcomes
    ]
    assert real.exit_code == dry.exit_code


# --- strict mode ------------------------------------------------------------------------------


def test_strict_mode_a_source_with_rejects_loads_nothing(env):
    write(env.raw / A, orders_csv(range(1, 6), bad={2: {"quantity": "x"}, 3: {"quantity": "0"}}))
    write(env.raw / B, orders_csv(range(100, 103)))
    write(env.raw / P, products_csv(range(1, 3)))

    res = env.run(validation_mode="strict")
    got = by_src(res)
    assert (got[A].status, got[A].rows) == ("failed", 0)
    assert got[A].rejects == Counter(TYPE_MISMATCH=1, CONSTRAINT_VIOLATION=1)
    assert (got[B].status, got[B].rows) == ("success", 3)
    assert (got[P].status, got[P].rows) == ("success", 2)
    assert res.exit_code == 2

    for output in ("parquet", "delta"):
        assert order_ids(env, A, output=output) == set()
        assert order_ids(env, B, output=output) == {100, 101, 102}
    assert env.parquet("products").num_rows == 2
    assert_outputs_agree(env, "orders")
    rejects = rejects_by_src(env, "orders")
    assert sorted((r["src_row_number"], r["reason_code"]) for r in rejects[A]) == [
        ("2", "TYPE_MISMATCH"),
        ("3", "CONSTRAINT_VIOLATION"),
    ]
    row = env.manifest_rows()[A]
    assert row["status"] == "failed"
    assert row["row_count"] == 0
    assert "2" in (row["error_message"] or "")


def test_strict_mode_on_the_command_line_exits_2(env):
    write(env.raw / A, orders_csv(range(1, 4), bad={2: {"customer_id": ""}}))
    write(env.raw / B, orders_csv(range(100, 102)))
    assert main(env.cli_args("--quiet", "--validation-mode", "strict"), out=io.StringIO()) == 2
    rows = env.manifest_rows()
    assert (rows[A]["status"], rows[B]["status"]) == ("failed", "success")


def test_a_failed_source_is_retried_next_run(env):
    write(env.raw / A, orders_csv(range(1, 6), bad={2: {"quantity": "x"}, 4: {"quantity": "0"}}))
    write(env.raw / B, orders_csv(range(100, 102)))
    assert env.run(validation_mode="strict").exit_code == 2

    again = env.run(validation_mode="strict")
    assert [(o.src_path, o.status) for o in again.outcomes] == [(A, "failed")]
    assert again.unchanged == Counter(orders=1)
    assert again.exit_code == 2
    assert len(rejects_by_src(env, "orders")[A]) == 2  # rejects replaced, not duplicated

    relaxed = env.run()
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in relaxed.outcomes] == [(A, "success", 3, 2)]
    assert relaxed.exit_code == 1
    assert order_ids(env, A) == {1, 3, 5}
    assert len(rejects_by_src(env, "orders")[A]) == 2
    assert len(env.rejects_files("orders")) == 2
    assert env.manifest_rows()[A]["status"] == "success"
    assert_outputs_agree(env, "orders")


# --- unreadable and SCHEMA_MISMATCH files -------------------------------------------------------


@pytest.mark.parametrize("mode", [None, "strict"])
def test_unreadable_and_schema_mismatch_files_are_rejected_in_both_modes(env, mode):
    broken_parquet = "sensors/broken.parquet"
    broken_gz = "orders/orders_broken.csv.gz"
    legacy = "orders/orders_legacy.csv"
    write(env.raw / broken_parquet, b"this is not a parquet file at all")
    write(env.raw / broken_gz, b"\x1f\x8b\x08\x00garbage that does not inflate")
    legacy_text = (
        ORDERS_HEADER.replace(",order_ts", "")
        + "\n"
        + "\n".join(f"{i},1,1,1,2024-01-01,1,9.99,0,EUR,PAID,card" for i in range(1, 4))
    )
    write(env.raw / legacy, (legacy_text + "\n").encode())
    write(env.raw / A, orders_csv(range(1, 3)))

    res = env.run(validation_mode=mode)
    got = by_src(res)
    assert (got[broken_parquet].status, got[broken_parquet].rows, got[broken_parquet].rejects) == (
        "rejected",
        0,
        Counter(UNREADABLE_FILE=1),
    )
    assert (got[broken_gz].status, got[broken_gz].rows, got[broken_gz].rejects) == (
        "rejected",
        0,
        Counter(UNREADABLE_FILE=1),
    )
    assert (got[legacy].status, got[legacy].rows, got[legacy].rejects) == ("rejected", 0, Counter(SCHEMA_MISMATCH=3))
    assert (got[A].status, got[A].rows) == ("success", 2)
    if mode is None:
        assert res.exit_code == 1

    rows = env.manifest_rows()
    for path in (broken_parquet, broken_gz):
        assert (rows[path]["status"], rows[path]["row_count"], rows[path]["reject_count"]) == ("rejected", 0, 1)
    assert (rows[legacy]["status"], rows[legacy]["row_count"], rows[legacy]["reject_count"]) == ("rejected", 0, 3)

    assert [r["reason_code"] for r in env.rejects("sensors")] == ["UNREADABLE_FILE"]
    orders_rejects = rejects_by_src(env, "orders")
    assert [r["reason_code"] for r in orders_rejects[broken_gz]] == ["UNREADABLE_FILE"]
    assert sorted(r["src_row_number"] for r in orders_rejects[legacy]) == ["1", "2", "3"]
    assert {r["reason_code"] for r in orders_rejects[legacy]} == {"SCHEMA_MISMATCH"}
    assert {s for s, _ in pairs(env.parquet("orders"))} == {A}
    assert_outputs_agree(env, "orders")


def test_rejected_file_is_retried_only_when_its_content_changes(env):
    broken_gz = "orders/orders_broken.csv.gz"
    write(env.raw / broken_gz, b"\x1f\x8b\x08\x00garbage")
    assert by_src(env.run())[broken_gz].status == "rejected"

    again = env.run()
    assert again.outcomes == []
    assert again.exit_code == 0

    write(env.raw / broken_gz, gzip.compress(orders_csv(range(1, 4)), mtime=0), age_s=5)
    fixed = env.run()
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in fixed.outcomes] == [(broken_gz, "success", 3, 0)]
    assert fixed.exit_code == 0
    assert order_ids(env, broken_gz) == {1, 2, 3}
    assert rejects_by_src(env, "orders") == {}
    assert len(env.rejects_files("orders")) == 1


# --- selection: --tables and --min-file-age --------------------------------------------------------


def test_tables_option_ingests_only_those_tables(env):
    write(env.raw / A, orders_csv(range(1, 3)))
    write(env.raw / "orders_2024-02-01.csv", orders_csv(range(10, 12), day="2024-02-01"))
    write(env.raw / P, products_csv(range(1, 3)))

    res = env.run(tables=("orders",))
    assert sorted(o.src_path for o in res.outcomes) == [A, "orders_2024-02-01.csv"]
    assert {o.table for o in res.outcomes} == {"orders"}
    assert not env.delta_dir("products").exists()
    assert not env.parquet_dir("products").exists()
    assert {r["table_name"] for r in env.manifest_rows().values()} == {"orders"}
    assert env.parquet("orders").num_rows == 4

    assert main(env.cli_args("--quiet", "--tables", "products"), out=io.StringIO()) == 0
    assert {p: r["table_name"] for p, r in env.manifest_rows().items()} == {
        A: "orders",
        "orders_2024-02-01.csv": "orders",
        P: "products",
    }
    assert env.parquet("products").num_rows == 2


def test_min_file_age_skips_a_file_just_written(env):
    old = "orders/orders_old.csv"
    new = "orders/orders_new.csv"
    write(env.raw / old, orders_csv(range(1, 3)), age_s=7200)
    write(env.raw / new, orders_csv(range(10, 13)), age_s=None)

    out = io.StringIO()
    assert main(env.cli_args("--quiet", "--min-file-age", "3600"), out=out) == 0
    assert new in out.getvalue()
    assert set(env.manifest_rows()) == {old}
    assert {s for s, _ in pairs(env.parquet("orders"))} == {old}

    res = env.run(min_file_age=3600)
    assert res.too_new == (new,)
    assert res.outcomes == []
    assert set(env.manifest_rows()) == {old}

    res = env.run()  # the default waits for nothing
    assert [o.src_path for o in res.outcomes] == [new]
    assert set(env.manifest_rows()) == {old, new}


# --- the manifest -----------------------------------------------------------------------------


def test_manifest_rows_describe_each_source(env):
    nested = "orders/2024/orders_a.csv"
    root_file = "orders_2024-01-02.csv"
    files = {
        nested: orders_csv(range(1, 6), bad={5: {"quantity": "x"}}),
        root_file: orders_csv(range(10, 12), day="2024-01-02"),
        P: products_csv(range(1, 4), bad_price=(2,)),
    }
    for path, data in files.items():
        write(env.raw / path, data)
    write(env.raw / "inventory.csv", b"store_id,on_hand\n1,2\n")
    write(env.raw / "orders/_notes.csv", b"ignored\n")
    write(env.raw / "orders/.hidden.csv", b"ignored\n")
    write(env.raw / "orders/upload.csv.tmp", b"ignored\n")

    started = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    res = env.run()
    finished = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    assert res.unmatched == ("inventory.csv",)

    rows = env.manifest_rows()
    assert set(rows) == set(files)
    expected = {nested: ("orders", 4, 1), root_file: ("orders", 2, 0), P: ("products", 2, 1)}
    for path, data in files.items():
        row = rows[path]
        assert (row["table_name"], row["row_count"], row["reject_count"]) == expected[path]
        assert row["status"] == "success"
        assert row["file_format"] == "csv"
        assert row["file_size_bytes"] == len(data)
        assert row["file_checksum"] == sha256(data)
        assert row["run_id"] == res.run_id
        assert row["error_message"] is None
        processed = row["processed_at"]
        assert isinstance(processed, dt.datetime) and processed.tzinfo is None
        assert started - dt.timedelta(seconds=2) <= processed <= finished + dt.timedelta(seconds=2)


def test_manifest_status_values(env):
    write(env.raw / A, orders_csv(range(1, 4), bad={1: {"quantity": "x"}}))
    write(env.raw / "sensors/broken.parquet", b"PAR1 nope")
    write(env.raw / P, products_csv(range(1, 3), bad_price=(1,)))
    env.run(validation_mode="strict")
    statuses = {p: r["status"] for p, r in env.manifest_rows().items()}
    assert statuses == {
        A: "failed",
        "sensors/broken.parquet": "rejected",
        P: "failed",
    }


def test_schema_history_has_a_row_per_ingested_source(env):
    write(env.raw / A, orders_csv(range(1, 3)))
    extra = (
        ORDERS_HEADER
        + ",coupon\n"
        + "\n".join(line + ",SAVE10" for line in orders_csv(range(20, 22)).decode().splitlines()[1:])
    )
    write(env.raw / B, (extra + "\n").encode())
    write(env.raw / P, products_csv(range(1, 3)))
    before = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    env.run()

    history = env.schema_history()
    assert sorted((h["table_name"], h["src_path"]) for h in history) == [
        ("orders", A),
        ("orders", B),
        ("products", P),
    ]
    by_path = {h["src_path"]: h for h in history}
    assert json.loads(by_path[A]["columns"]) == ORDERS_HEADER.split(",")
    assert json.loads(by_path[B]["columns"]) == [*ORDERS_HEADER.split(","), "coupon"]
    assert "coupon" in (by_path[B]["change"] or "")
    assert json.loads(by_path[P]["columns"])[:2] == ["product_id", "sku"]
    for h in history:
        assert h["detected_at"].tzinfo is None
        assert h["detected_at"] >= before - dt.timedelta(seconds=2)

    env.run()
    assert len(env.schema_history()) == 3


def test_source_names_that_need_quoting_are_replaced_cleanly(env):
    odd = 'orders/o\'brien "x" %20.csv'
    write(env.raw / odd, orders_csv(range(1, 4), bad={2: {"quantity": "x"}}))
    write(env.raw / B, orders_csv(range(100, 102)))
    env.run()
    write(env.raw / odd, orders_csv(range(7, 9)), age_s=5)
    res = env.run()
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [(odd, "success", 2)]
    for output in ("parquet", "delta"):
        assert order_ids(env, odd, output=output) == {7, 8}
        assert order_ids(env, B, output=output) == {100, 101}
    assert_outputs_agree(env, "orders")
    assert odd not in rejects_by_src(env, "orders")
    assert len(env.rejects_files("orders")) == 2


def test_raw_files_are_never_modified(env):
    write(env.raw / A, orders_csv(range(1, 3)))
    write(env.raw / "sensors/broken.parquet", b"nope")
    before = snapshot(env.raw)
    env.run()
    env.run(reprocess=(A,))
    assert snapshot(env.raw) == before


def test_copy_is_ingested_in_the_run_where_its_original_changes(env):
    old = orders_csv(range(1, 4))
    write(env.raw / "orders/a.csv", old)
    write(env.raw / "orders/b.csv", old)
    first = env.run()
    assert [(o.src_path, o.status) for o in first.outcomes] == [
        ("orders/a.csv", "success"),
        ("orders/b.csv", "duplicate"),
    ]

    # a.csv gets new content: b.csv's content is no longer in the lake under any path, so this run
    # must load it, exactly as one clean run over the raw folder as it now is would
    write(env.raw / "orders/a.csv", orders_csv(range(10, 12)), age_s=5)
    second = env.run()
    assert sorted((o.src_path, o.status, o.rows) for o in second.outcomes) == [
        ("orders/a.csv", "success", 2),
        ("orders/b.csv", "success", 3),
    ]
    for output in ("parquet", "delta"):
        assert order_ids(env, "orders/a.csv", output=output) == {10, 11}
        assert order_ids(env, "orders/b.csv", output=output) == {1, 2, 3}

    versions = env.delta_versions()
    third = env.run()
    assert third.outcomes == []
    assert env.delta_versions() == versions


def _delta_source(env: Env, *, bad_op_in_v0: bool = False) -> None:
    """A small Delta source of returns changes with two versions, under data_raw/returns/changes
    (with ``bad_op_in_v0``, one record of version 0 has op 'X': a CONSTRAINT_VIOLATION)."""
    import pyarrow as pa
    from deltalake import write_deltalake

    schema = pa.schema(
        [
            ("return_id", pa.int64()),
            ("order_id", pa.int64()),
            ("product_id", pa.int64()),
            ("return_ts", pa.timestamp("us", tz="UTC")),
            ("quantity", pa.int32()),
            ("updated_at", pa.timestamp("us", tz="UTC")),
            ("op", pa.string()),
        ]
    )
    ts = dt.datetime(2024, 1, 5, tzinfo=dt.UTC)
    for version, ids in enumerate(([1, 2, 3], [4, 5])):
        batch = pa.table(
            {
                "return_id": ids,
                "order_id": [i + 100 for i in ids],
                "product_id": [1] * len(ids),
                "return_ts": [ts] * len(ids),
                "quantity": [1] * len(ids),
                "updated_at": [ts + dt.timedelta(hours=version)] * len(ids),
                "op": ["X" if bad_op_in_v0 and i == 2 else "I" for i in ids],
            },
            schema=schema,
        )
        write_deltalake(str(env.raw / "returns" / "changes"), batch, mode="append")


def test_delta_source_versions_are_recorded_and_not_read_twice(env):
    _delta_source(env)
    first = env.run()
    assert [(o.src_path, o.status, o.rows) for o in first.outcomes] == [
        ("returns/changes@v0", "success", 3),
        ("returns/changes@v1", "success", 2),
    ]
    rows = env.manifest_rows()
    assert {p: (r["status"], r["row_count"]) for p, r in rows.items()} == {
        "returns/changes@v0": ("success", 3),
        "returns/changes@v1": ("success", 2),
    }
    assert rows["returns/changes@v0"]["file_size_bytes"] > 0
    assert env.watermarks()["returns/changes"]["last_version"] == 1
    versions = env.delta_versions()
    lake_before = snapshot(env.lake)

    again = env.run()
    assert again.outcomes == []
    assert again.exit_code == 0
    assert env.delta_versions() == versions
    assert snapshot(env.lake) == lake_before


def test_reprocess_a_delta_source_version(env):
    _delta_source(env)
    env.run()
    before = env.manifest_rows()["returns/changes@v1"]
    v = env.delta_version("returns")

    res = env.run(reprocess=("returns/changes@v1",))
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [("returns/changes@v1", "success", 2)]
    after = env.manifest_rows()["returns/changes@v1"]
    assert after["run_id"] == res.run_id != before["run_id"]
    assert env.delta_version("returns") > v


def test_reprocess_a_delta_source_reingests_its_versions(env):
    _delta_source(env)
    env.run()
    v = env.delta_version("returns")

    res = env.run(reprocess=("returns/changes",))
    assert sorted(o.src_path for o in res.outcomes) == ["returns/changes@v0", "returns/changes@v1"]
    rows = env.manifest_rows()
    assert rows["returns/changes@v0"]["run_id"] == rows["returns/changes@v1"]["run_id"] == res.run_id
    assert env.delta_version("returns") > v


def test_strict_failure_of_a_changed_source_leaves_none_of_its_old_rows(env):
    # The changed source is ingested again and replaces its rows and rejects (section 7); in strict
    # mode it loads nothing (section 11). Keeping the old content's rows beside the new content's
    # rejects would put record 2 of the file both in the outputs and in the rejects.
    write(env.raw / A, orders_csv(range(1, 4)))
    write(env.raw / B, orders_csv(range(100, 102)))
    env.run()
    write(env.raw / A, orders_csv(range(10, 14), bad={11: {"quantity": "x"}}), age_s=5)

    res = env.run(validation_mode="strict")
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [(A, "failed", 0)]
    assert [r["src_row_number"] for r in rejects_by_src(env, "orders")[A]] == ["2"]
    for output in ("parquet", "delta"):
        assert order_ids(env, A, output=output) == set()
        assert order_ids(env, B, output=output) == {100, 101}


def test_strict_failure_of_a_delta_version_blocks_the_later_ones_until_retried(env):
    _delta_source(env, bad_op_in_v0=True)
    res = env.run(validation_mode="strict")
    assert [(o.src_path, o.status, o.rows) for o in res.outcomes] == [("returns/changes@v0", "failed", 0)]
    assert res.exit_code == 2
    rows = env.manifest_rows()
    assert set(rows) == {"returns/changes@v0"}
    assert rows["returns/changes@v0"]["status"] == "failed"
    assert "returns/changes" not in env.watermarks()
    assert [r["reason_code"] for r in env.rejects("returns")] == ["CONSTRAINT_VIOLATION"]

    retried = env.run()
    assert [(o.src_path, o.status, o.rows, o.reject_count) for o in retried.outcomes] == [
        ("returns/changes@v0", "success", 2, 1),
        ("returns/changes@v1", "success", 2, 0),
    ]
    assert retried.exit_code == 1
    assert env.watermarks()["returns/changes"]["last_version"] == 1
    assert {p: r["status"] for p, r in env.manifest_rows().items()} == {
        "returns/changes@v0": "success",
        "returns/changes@v1": "success",
    }
    assert len(env.rejects("returns")) == 1


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux only")
@pytest.mark.parametrize(("setting", "turned_off"), [(None, True), ("1", False)])
def test_a_run_turns_transparent_huge_pages_off_unless_told(tmp_path: Path, setting: str | None, turned_off: bool) -> None:
    # In a process of its own: the flag lasts for the life of the process (and its children
    # inherit it, so the second case asks whether the run set it, not what the kernel says).
    code = (
        "import sys; from pathlib import Path; from bronze_assets.ingest import Settings, run; "
        "from bronze_assets.pipeline import without_huge_pages; "
        "root = Path(sys.argv[1]); (root / 'raw').mkdir(); "
        "run(Settings(raw=root / 'raw', lake=root / 'lake', manifest=root / 'm.duckdb')); "
        "print(without_huge_pages(), open('/proc/self/status').read().split('THP_enabled:')[1].split()[0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "BRONZE_HUGE_PAGES"}
    if setting is not None:
        env["BRONZE_HUGE_PAGES"] = setting
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=True)
    took, kernel = done.stdout.split()[-2:]
    assert took == str(turned_off)
    if turned_off:
        assert kernel == "0"
