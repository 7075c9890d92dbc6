"""kill -9 at any point (CONTRACT section 7): a run killed at a named step (``BRONZE_KILL_AT``),
or after a random delay, and then run again, leaves exactly what one clean run leaves: the same
rows in both outputs, the same rejects, the same manifest, no stray file.

Two scenarios on the bundled sample (every table and format, the returns upsert, a Delta source):
``fresh`` (the first run over an empty lake is killed) and ``incremental`` (the sample is in the
lake; a changed and a new orders file, a copy, a returns file with updates, a tombstone and a
revival, and new Delta versions arrive, and that run is killed). A few kill points run in every
``make test``; the slow tier spreads many over the whole run and adds random timings, a killed
compaction and a killed Dagster run.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bronze_assets.ingest import run
from bronze_assets_tests.crashkit import (
    FRESH,
    INCREMENTAL,
    Lake,
    Scenario,
    environment,
    kill_after,
    kill_at,
    prepare,
    prepare_from,
    state,
    steps_of,
    total_rows,
)

KILLED = -signal.SIGKILL


class Bench:
    """A prepared scenario, its reference state, and the steps of the run that gets killed."""

    def __init__(self, root: Path, scenario: Scenario) -> None:
        self.root = root
        self.template = prepare(root / "template", scenario)
        reference = prepare_from(self.template.root, root / "reference")
        result = run(reference.settings())
        assert result.exit_code in (0, 1)
        self.reference = state(reference)
        assert total_rows(self.reference) > 0
        self.steps = steps_of(self.template, root / "counted")
        self.trials = 0

    def fresh(self) -> Lake:
        self.trials += 1
        return prepare_from(self.template.root, self.root / f"trial-{self.trials}")

    def check(self, lake: Lake) -> None:
        again = run(lake.settings())
        assert again.exit_code in (0, 1), [(o.src_path, o.status, o.error) for o in again.outcomes]
        assert state(lake) == self.reference
        assert run(lake.settings()).outcomes == []  # and nothing is left to do

    def kill_and_check(self, step: int) -> None:
        lake = self.fresh()
        done = kill_at(lake.cli(), step)
        assert done.returncode == KILLED, (step, self.steps[step - 1], done.returncode, done.stderr[-2000:])
        self.check(lake)


@pytest.fixture(scope="module")
def fresh_bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(tmp_path_factory.mktemp("crash_fresh"), FRESH)


@pytest.fixture(scope="module")
def incremental_bench(tmp_path_factory: pytest.TempPathFactory) -> Bench:
    return Bench(tmp_path_factory.mktemp("crash_incremental"), INCREMENTAL)


def first(bench: Bench, name: str, nth: int = 1) -> int:
    """The step number of the ``nth`` step called ``name``."""
    found = [i for i, s in enumerate(bench.steps, start=1) if s == name]
    assert len(found) >= nth, (name, sorted(set(bench.steps)))
    return found[nth - 1]


# ------------------------------------------------------------------------------------------
# Every make test: a kill inside each kind of publishing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["delta.linked", "parquet.linked", "manifest.in_transaction"])
def test_killed_during_a_fresh_run(fresh_bench: Bench, name: str) -> None:
    fresh_bench.kill_and_check(first(fresh_bench, name, 2))


@pytest.mark.parametrize("name", ["history.committed", "merge.committed", "rewrite.linked"])
def test_killed_during_the_returns_merge(incremental_bench: Bench, name: str) -> None:
    incremental_bench.kill_and_check(first(incremental_bench, name))


@pytest.mark.parametrize("leftover", ["empty-log", "temporary-commit"])
def test_killed_while_creating_a_delta_table(fresh_bench: Bench, leftover: str) -> None:
    """A run killed inside the first commit of a table leaves a ``_delta_log`` with no commit
    (empty, or with delta-rs's temporary commit file) and files linked beside it: the next run
    treats the folder as no table, removes it and creates the table afresh."""
    lake = fresh_bench.fresh()
    done = kill_at(lake.cli(), first(fresh_bench, "delta.linked"))
    assert done.returncode == KILLED
    tables = [d for d in (lake.lake / "bronze" / "delta").iterdir() if (d / "_delta_log").is_dir()]
    assert tables
    for table in tables:
        for commit in (table / "_delta_log").iterdir():
            commit.unlink()
        if leftover == "temporary-commit":
            (table / "_delta_log" / "_commit_0123456789abcdef.json.tmp").write_text('{"commitInfo":{}}\n')
    fresh_bench.check(lake)


# ------------------------------------------------------------------------------------------
# The slow tier: many kill points over the whole run, random timings, compaction, Dagster
# ------------------------------------------------------------------------------------------


def spread(steps: list[str], n: int) -> list[int]:
    """``n`` step numbers spread evenly over the run, plus the first step of every kind."""
    total = len(steps)
    even = {max(1, round(total * (k + 0.5) / n)) for k in range(n)}
    kinds = {steps.index(name) + 1 for name in set(steps)}
    return sorted(even | kinds)


@pytest.mark.slow
@pytest.mark.parametrize("run_kind", ["fresh", "incremental"])
def test_many_kill_points_over_a_run(request: pytest.FixtureRequest, run_kind: str) -> None:
    bench: Bench = request.getfixturevalue(f"{run_kind}_bench")
    points = spread(bench.steps, 8)
    for step in points:
        bench.kill_and_check(step)
    print(f"\n{run_kind}: {len(points)} kill points of {len(bench.steps)} steps survived")


@pytest.mark.slow
def test_random_kill_timings(incremental_bench: Bench) -> None:
    rng = random.Random(20261201)
    killed = 0
    for _ in range(4):
        lake = incremental_bench.fresh()
        code = kill_after(lake.cli(), rng.uniform(0.3, 2.5))
        killed += code == KILLED
        incremental_bench.check(lake)
    assert killed >= 1


COMPACT = (
    "import sys; from pathlib import Path; from bronze_assets.compaction import maintain; "
    "from bronze_assets.ingest import Settings; from schemas.schemas import TABLES; "
    "maintain(Settings(raw=Path(sys.argv[1]), lake=Path(sys.argv[2]), manifest=Path(sys.argv[3]), "
    "target_file_bytes=1 << 30), TABLES, retention_hours=0)"
)


def _thinly_partitioned_orders(raw: Path) -> None:
    from bronze_assets import sample

    sample.main(["--out", str(raw), "--rows", "260000", "--tables", "orders", "--bad-fraction", "0.01"])


@pytest.mark.slow
def test_killed_while_rows_are_set_aside_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a writer buffer of 1 MB, 260,000 orders over 365 days are set aside on disk more than
    once before their row groups are written: a kill just after the first and the last time is
    finished by the next run, which leaves what one clean run leaves (and no rows set aside)."""
    monkeypatch.setenv("BRONZE_WRITER_BUFFER_MB", "1")
    bench = Bench(tmp_path, Scenario("spill", None, _thinly_partitioned_orders))
    spills = [i for i, s in enumerate(bench.steps, start=1) if s == "writer.spilled"]
    assert len(spills) >= 2, sorted(set(bench.steps))
    for step in (spills[0], spills[-1]):
        bench.kill_and_check(step)
    for done in [Lake(tmp_path / "reference"), *(Lake(t) for t in tmp_path.glob("trial-*"))]:
        assert not list(done.root.rglob("_spill")) and not (done.lake / "_staging").exists(), done.root


@pytest.mark.slow
def test_killed_compaction_loses_nothing(tmp_path: Path) -> None:
    """Compaction (coalescing, rewriting, vacuum) killed at each of its steps: the rows stay, and
    the next maintenance and ingestion runs find a consistent lake."""
    base = prepare(tmp_path / "base", INCREMENTAL)
    run(base.settings())  # the incremental sources too: files to coalesce in several tables
    before = state(base)
    cmd = [sys.executable, "-c", COMPACT, str(base.raw), str(base.lake), str(base.manifest)]
    log = tmp_path / "compaction.steps"
    counted = prepare_from(base.root, tmp_path / "counted")
    done = subprocess.run(
        [*cmd[:3], str(counted.raw), str(counted.lake), str(counted.manifest)],
        env=environment(BRONZE_STEP_LOG=str(log)), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    steps = log.read_text().splitlines()
    assert any("rewrite.committed" in s for s in steps)
    compacted = state(counted)
    assert compacted["tables"] == before["tables"]
    for k, step in enumerate(spread([s.split(" ", 1)[1] for s in steps], 6)):
        lake = prepare_from(base.root, tmp_path / f"trial-{k}")
        trial = [*cmd[:3], str(lake.raw), str(lake.lake), str(lake.manifest)]
        assert kill_at(trial, step).returncode == KILLED
        assert subprocess.run(trial, env=environment(), capture_output=True).returncode == 0
        after: dict[str, Any] = state(lake)
        assert after["tables"] == before["tables"]
        assert after["manifest"] == before["manifest"] and after["rejects"] == before["rejects"]
        assert run(lake.settings()).outcomes == []


@pytest.mark.slow
def test_killed_dagster_run_is_finished_by_the_next_one(tmp_path: Path) -> None:
    """A ``dagster asset materialize`` over every orders source, its step process killed inside
    the Delta commit; materializing again leaves what one clean command-line run leaves."""
    from bronze_assets_tests.dagster_helpers import content, explain, manifest, rows_by_source
    from bronze_assets_tests.dagster_helpers import environment as dagster_environment
    from bronze_assets_tests.dagster_helpers import run as run_cmd
    from bronze_assets_tests.test_dagster_cli import registered_orders

    setup = registered_orders(tmp_path, "dagster")
    paths, reference, env, materialize = setup.paths, setup.reference, setup.env, setup.materialize
    # The reference run goes through the same steps as the Dagster run's step process (stage
    # every source, commit, mirror, record): its step log says where the Delta commit is.
    log = tmp_path / "reference.steps"
    ref = run_cmd(
        [sys.executable, "-m", "bronze_assets", "--raw", str(reference.raw), "--lake", str(reference.lake),
         "--manifest", str(reference.manifest)],
        env={**dagster_environment(reference), "BRONZE_STEP_LOG": str(log)},
    )  # fmt: skip
    assert ref.returncode == 1, explain(ref)
    names = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    at = names.index("delta.linked") + 1
    killed = run_cmd(materialize, env={**env, "BRONZE_KILL_AT": str(at)})
    assert killed.returncode != 0, explain(killed)  # the step process died: the run failed
    assert not (paths.lake / "bronze" / "parquet" / "orders").exists() or not any(
        (paths.lake / "bronze" / "parquet" / "orders").rglob("*.parquet")
    )
    again = run_cmd(materialize, env=env)
    assert again.returncode == 0, explain(again)
    for fmt in ("delta", "parquet"):
        assert rows_by_source(paths.lake, "orders", fmt) == rows_by_source(reference.lake, "orders", fmt)
        assert content(paths.lake, "orders", fmt) == content(reference.lake, "orders", fmt)
    assert manifest(paths.manifest) == manifest(reference.manifest)
    assert not (paths.lake / "_staging").exists()
