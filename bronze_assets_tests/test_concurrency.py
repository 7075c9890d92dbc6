"""Runs at the same time on the same lake (CONTRACT sections 7 and 11): neither duplicates nor
corrupts anything; a second run waits for the first and then finds nothing left to do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest

from bronze_assets_tests.runhelpers import (
    REPO_ROOT,
    Env,
    orders_csv,
    pairs,
    products_csv,
    summary_total_rows,
    write,
)

pytestmark = pytest.mark.slow


def make_raw(env: Env) -> None:
    for day in range(1, 7):
        bad = {day * 100 + 3: {"quantity": "x"}} if day % 2 else {}
        write(
            env.raw / "orders" / f"orders_2024-01-0{day}.csv",
            orders_csv(range(day * 100, day * 100 + 400), day=f"2024-01-0{day}", bad=bad),
        )
    write(env.raw / "orders_2024-01-09.csv", orders_csv(range(9000, 9300), day="2024-01-09"))
    write(env.raw / "products" / "products.csv", products_csv(range(1, 300), bad_price=(7,)))
    write(env.raw / "sensors" / "broken.parquet", b"not parquet")


def start_runs(env: Env, n: int) -> list[subprocess.CompletedProcess[str]]:
    """Start ``n`` command-line runs at once on the same raw folder, lake and manifest."""
    penv = dict(os.environ)
    penv["PYTHONPATH"] = str(REPO_ROOT)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bronze_assets", *env.cli_args("--quiet")],
            cwd=env.root,
            env=penv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def outputs(env: Env) -> dict[str, object]:
    tables = sorted(p.name for p in (env.lake / "bronze" / "delta").iterdir())
    rows = {}
    for t in tables:
        # a table that got only rejected files may have an empty Delta table and no Parquet folder
        pq_pairs = pairs(env.parquet(t)) if env.parquet_dir(t).exists() else []
        delta_pairs = pairs(env.delta(t))
        assert len(set(pq_pairs)) == len(pq_pairs), f"duplicate rows in parquet {t}"
        assert len(set(delta_pairs)) == len(delta_pairs), f"duplicate rows in delta {t}"
        assert sorted(pq_pairs) == sorted(delta_pairs), t
        rows[t] = len(pq_pairs)
    rejects = {
        t.name: (len(env.rejects_files(t.name)), Counter(r["reason_code"] for r in env.rejects(t.name)))
        for t in sorted((env.lake / "_rejects").iterdir())
    }
    manifest = {
        p: (r["status"], r["row_count"], r["reject_count"], r["file_checksum"]) for p, r in env.manifest_rows().items()
    }
    return {"rows": rows, "rejects": rejects, "manifest": manifest}


@pytest.fixture
def reference(tmp_path):
    """What one clean run writes."""
    env = Env(tmp_path / "reference")
    make_raw(env)
    result = env.run()
    assert result.exit_code == 1
    return outputs(env)


@pytest.mark.parametrize("n", [2, 4])
def test_simultaneous_runs_end_with_the_data_of_one_run(tmp_path, reference, n):
    env = Env(tmp_path / "shared")
    make_raw(env)
    done = start_runs(env, n)

    for proc in done:
        assert proc.returncode in (0, 1), proc.stderr
        assert "Traceback" not in proc.stderr
    assert outputs(env) == reference

    written = sorted(summary_total_rows(p.stdout) for p in done)
    total = sum(reference["rows"].values())  # type: ignore[arg-type]
    # one run did the work; the others waited and then found nothing new
    assert written == [0] * (n - 1) + [total]
    assert sorted(p.returncode for p in done) == [0] * (n - 1) + [1]

    # and a later run still finds nothing to do
    again = env.run()
    assert again.outcomes == []


@pytest.mark.parametrize(("after_lines", "pause"), [(1, 0.0), (2, 0.04), (4, 0.08), (6, 0.02), (8, 0.0)])
def test_a_killed_run_is_finished_by_the_next_one(tmp_path, reference, after_lines, pause):
    """kill -9 at some moment of a run (after its n-th source, plus a pause that lands inside the
    next one): the re-run leaves exactly what one clean run writes."""
    import signal
    import time

    env = Env(tmp_path / "killed")
    make_raw(env)
    penv = dict(os.environ)
    penv["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bronze_assets", *env.cli_args()],
        cwd=env.root,
        env=penv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for _ in range(after_lines):
        if not proc.stderr.readline():
            break
    time.sleep(pause)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()

    env.run()
    assert outputs(env) == reference
    assert env.run().outcomes == []


def test_a_command_line_run_during_a_dagster_run(tmp_path):
    """A ``dagster asset materialize`` of every orders source and a ``load-to-bronze`` on the same
    lake at the same time: neither fails on a lock, and the lake holds one clean run's data."""
    import time

    from bronze_assets_tests.dagster_helpers import content, explain, load_to_bronze, rows_by_source
    from bronze_assets_tests.test_dagster_cli import registered_orders

    setup = registered_orders(tmp_path, "shared")
    paths, reference = setup.paths, setup.reference
    dagster_run = subprocess.Popen(
        setup.materialize, cwd=REPO_ROOT, env=setup.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    time.sleep(3)  # the Dagster run is starting up or ingesting
    cli = load_to_bronze(paths)
    _, err = dagster_run.communicate(timeout=180)
    assert dagster_run.returncode == 0, err[-3000:]
    assert cli.returncode in (0, 1), explain(cli)
    assert "Traceback" not in cli.stderr
    ref = load_to_bronze(reference)
    for fmt in ("delta", "parquet"):
        assert rows_by_source(paths.lake, "orders", fmt) == rows_by_source(reference.lake, "orders", fmt)
        assert content(paths.lake, "orders", fmt) == content(reference.lake, "orders", fmt)
    assert ref.returncode == 1
