"""Helpers for the tests that drive the real Dagster front door: the ``dagster`` CLI on a fresh
``DAGSTER_HOME`` and a headless ``dagster dev`` (webserver + daemon) queried through GraphQL.

Everything works on explicit temporary folders; the repository is only the working directory (the
code location is ``bronze_assets.definitions``, loaded from it) and the source of ``dagster.yaml``.
Nothing here needs the network: the server listens on 127.0.0.1 and is queried with urllib.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads
from deltalake import DeltaTable

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "data_raw"
BIN = Path(sys.executable).parent
LOCATION = "bronze_assets"
REPOSITORY = "__repository__"
MODULE = "bronze_assets.definitions"

T = TypeVar("T")


# ------------------------------------------------------------------------------------------
# Processes and environment
# ------------------------------------------------------------------------------------------


def executable(name: str) -> str:
    """A console script of the virtualenv that runs these tests (same bin dir as sys.executable)."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}")
    return str(path)


def load_to_bronze_command() -> list[str]:
    """``load-to-bronze`` when installed next to the interpreter, else ``python -m bronze_assets``
    (the same entry point)."""
    script = BIN / "load-to-bronze"
    return [str(script)] if script.exists() else [sys.executable, "-m", "bronze_assets"]


def make_dagster_home(path: Path) -> Path:
    """A fresh, absolute DAGSTER_HOME holding a copy of the repository's instance config."""
    path = path.resolve()
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "dagster.yaml", path / "dagster.yaml")
    return path


@dataclass(frozen=True)
class Paths:
    """A raw folder, a lake and a manifest under one temporary root."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def lake(self) -> Path:
        return self.root / "lake"

    @property
    def manifest(self) -> Path:
        return self.root / "duckdb" / "warehouse.duckdb"


def environment(paths: Paths, home: Path | None = None) -> dict[str, str]:
    """The environment of a ``dagster`` subprocess pointed at ``paths`` (and ``home``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["BRONZE_RAW"] = str(paths.raw)
    env["BRONZE_LAKE"] = str(paths.lake)
    env["BRONZE_MANIFEST"] = str(paths.manifest)
    env["PYTHONWARNINGS"] = "ignore"
    env["DAGSTER_DISABLE_TELEMETRY"] = "1"
    env.pop("DAGSTER_HOME", None)
    if home is not None:
        env["DAGSTER_HOME"] = str(home)
    return env


def run(cmd: list[str], *, env: Mapping[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )


def explain(proc: subprocess.CompletedProcess[str], limit: int = 4000) -> str:
    return f"$ {' '.join(proc.args)}\nexit {proc.returncode}\n--- stdout\n{proc.stdout[-limit:]}\n--- stderr\n{proc.stderr[-limit:]}"


def load_to_bronze(paths: Paths, *extra: str) -> subprocess.CompletedProcess[str]:
    """A clean command-line run over ``paths`` (the reference the Dagster front door must match)."""
    args = ["--raw", str(paths.raw), "--lake", str(paths.lake), "--manifest", str(paths.manifest), *extra]
    return run([*load_to_bronze_command(), *args], env=environment(paths))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], *, timeout: float, interval: float = 1.0,
             describe: Callable[[], str] | None = None) -> T:
    """Call ``probe`` until it returns something other than None/False, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = describe() if describe else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{detail}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------
# A headless `dagster dev`
# ------------------------------------------------------------------------------------------

RUNS_QUERY = """
{ runsOrError(limit: 200) { __typename ... on Runs { results { runId status tags { key value } } } } }
"""

CHECKS_QUERY = """
query Checks($keys: [AssetKeyInput!]) {
  assetNodes(assetKeys: $keys) {
    assetKey { path }
    assetChecksOrError {
      __typename
      ... on AssetChecks { checks { name executionForLatestMaterialization { status runId } } }
    }
  }
}
"""

TICKS_QUERY = """
query Ticks($selector: RepositorySelector!) {
  sensorsOrError(repositorySelector: $selector) {
    __typename
    ... on Sensors { results { name sensorState { status ticks(limit: 5) {
        status skipReason runIds error { message } } } } }
  }
}
"""


def _default_sigint() -> None:
    # A process started from a non-interactive shell's background job inherits SIGINT ignored,
    # and `dagster dev` would then not stop on the SIGINT of ``DagsterDev.stop``.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Run:
    run_id: str
    status: str
    tags: dict[str, str]
    keys: list[str] = field(default_factory=list)  # the partition keys it ingests (one, or a range)

    @property
    def partition(self) -> str | None:
        return self.tags.get("dagster/partition")


@dataclass
class DagsterDev:
    """``dagster dev -w workspace.yaml`` on 127.0.0.1, started from the repository root with its
    own DAGSTER_HOME, in its own session (so a SIGINT reaches the webserver, the daemon and the
    code server, and so pytest's own signals do not)."""

    home: Path
    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout: float = 120) -> DagsterDev:
        cmd = [executable("dagster"), "dev", "-w", "workspace.yaml", "-p", str(self.port), "-h", "127.0.0.1"]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
        try:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_default_sigint,
            )
        finally:
            log.close()
        wait_for("the webserver's /server_info", self._ready, timeout=timeout, interval=0.5, describe=self.log_tail)
        # The code location is loaded once the repository answers.
        wait_for("the code location", self._location_loaded, timeout=timeout, interval=0.5, describe=self.log_tail)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"dagster dev exited with {self.proc.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/server_info", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _location_loaded(self) -> bool:
        data = self.graphql(TICKS_QUERY, {"selector": self.selector})
        return data["sensorsOrError"]["__typename"] == "Sensors"

    @property
    def selector(self) -> dict[str, str]:
        return {"repositoryLocationName": LOCATION, "repositoryName": REPOSITORY}

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(
            f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            payload = json.loads(resp.read())
        if payload.get("errors"):
            raise AssertionError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def runs(self) -> list[Run]:
        data = self.graphql(RUNS_QUERY)["runsOrError"]
        assert data["__typename"] == "Runs", data
        runs = [Run(r["runId"], r["status"], {t["key"]: t["value"] for t in r["tags"]}) for r in data["results"]]
        for run in runs:
            run.keys = self._keys_of(run)
        return runs

    def _keys_of(self, run: Run) -> list[str]:
        if run.partition is not None:
            return [run.partition]
        start, end = run.tags.get("dagster/asset_partition_range_start"), run.tags.get("dagster/asset_partition_range_end")
        table = run.tags.get("bronze/table")
        if start is None or end is None or table is None:
            return []
        import dagster as dg
        from dagster._core.instance.ref import InstanceRef

        with dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))) as instance:
            order = list(instance.get_dynamic_partitions(f"{table}__sources"))
        return order[order.index(start) : order.index(end) + 1]

    def runs_for(self, partitions: Iterable[str]) -> dict[str, list[Run]]:
        wanted = set(partitions)
        out: dict[str, list[Run]] = {p: [] for p in wanted}
        for r in self.runs():
            for key in r.keys:
                if key in wanted:
                    out[key].append(r)
        return out

    def wait_for_success(self, partitions: Iterable[str], *, timeout: float) -> dict[str, Run]:
        """Wait until each partition has a successful run; fail at once if a run of one fails."""
        wanted = sorted(set(partitions))

        def probe() -> dict[str, Run] | None:
            by_partition = self.runs_for(wanted)
            failed = [r for rs in by_partition.values() for r in rs if r.status in ("FAILURE", "CANCELED")]
            if failed:
                raise AssertionError(f"run(s) failed: {failed}\n{self.run_errors(failed)}\n{self.log_tail()}")
            done = {p: next((r for r in rs if r.status == "SUCCESS"), None) for p, rs in by_partition.items()}
            return done if all(done.values()) else None  # type: ignore[return-value]

        return wait_for(f"successful runs of {wanted}", probe, timeout=timeout, interval=1.0, describe=self.status)

    def run_errors(self, runs: Iterable[Run]) -> str:
        query = """
        query Logs($runId: ID!) { logsForRun(runId: $runId) { __typename ... on EventConnection {
            events { __typename ... on MessageEvent { message level } } } } }
        """
        out = []
        for r in runs:
            events = self.graphql(query, {"runId": r.run_id})["logsForRun"].get("events", [])
            out += [f"{r.run_id[:8]} {e['message'][:500]}" for e in events if e.get("level") in ("ERROR", "CRITICAL")]
        return "\n".join(out)

    def checks(self, asset_paths: Iterable[list[str]]) -> dict[tuple[str, str], str | None]:
        """{(asset key, check name): status of the execution for the latest materialization}."""
        keys = [{"path": p} for p in asset_paths]
        out: dict[tuple[str, str], str | None] = {}
        for node in self.graphql(CHECKS_QUERY, {"keys": keys})["assetNodes"]:
            checks = node["assetChecksOrError"]
            assert checks["__typename"] == "AssetChecks", checks
            for c in checks["checks"]:
                execution = c["executionForLatestMaterialization"]
                out[("/".join(node["assetKey"]["path"]), c["name"])] = execution["status"] if execution else None
        return out

    def status(self) -> str:
        """Runs and recent sensor ticks, for a failure message."""
        try:
            runs = [(r.keys, r.status) for r in self.runs()]
            sensors = self.graphql(TICKS_QUERY, {"selector": self.selector})["sensorsOrError"].get("results", [])
            ticks = {s["name"]: s["sensorState"]["ticks"][:2] for s in sensors}
        except Exception as exc:  # diagnostics only
            return f"(status unavailable: {exc})\n{self.log_tail()}"
        return f"runs: {runs}\nticks: {json.dumps(ticks)[:3000]}\n{self.log_tail()}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "--- dagster dev output (tail)\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        # Run workers started by the daemon live in the same session; make sure none is left.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# Reading a lake back
# ------------------------------------------------------------------------------------------


def delta_table(lake: Path, table: str) -> pa.Table:
    return DeltaTable(str(lake / "bronze" / "delta" / table)).to_pyarrow_table()


def parquet_table(lake: Path, table: str) -> pa.Table:
    path = lake / "bronze" / "parquet" / table
    return pads.dataset(str(path), format="parquet", partitioning="hive").to_table()


def read_output(lake: Path, table: str, fmt: str) -> pa.Table:
    return delta_table(lake, table) if fmt == "delta" else parquet_table(lake, table)


def rows_by_source(lake: Path, table: str, fmt: str) -> Counter[str]:
    """Rows per ``src_filename`` in one output (empty when the output does not exist yet)."""
    path = lake / "bronze" / fmt / table
    if not path.is_dir():
        return Counter()
    t = read_output(lake, table, fmt)
    return Counter(t.column("src_filename").to_pylist()) if "src_filename" in t.column_names else Counter()


def content(lake: Path, table: str, fmt: str) -> list[tuple[Any, ...]]:
    """Every row of an output but ``ingestion_ts`` (which differs between two runs), as sorted
    tuples of values in column-name order, so two lakes compare equal when they hold the same data."""
    t = read_output(lake, table, fmt)
    names = sorted(n for n in t.column_names if n != "ingestion_ts")
    columns = [t.column(n).to_pylist() for n in names]
    return sorted(zip(*columns, strict=True), key=lambda row: tuple(repr(v) for v in row))


def manifest(path: Path) -> dict[str, tuple[Any, ...]]:
    """{src_path: (table_name, status, row_count, reject_count)} of ``manifest_processed_files``."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        rows = con.execute(
            "SELECT src_path, table_name, status, row_count, reject_count FROM manifest_processed_files"
        ).fetchall()
    finally:
        con.close()
    return {r[0]: tuple(r[1:]) for r in rows}
