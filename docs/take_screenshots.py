"""Take the README's screenshots of the Dagster UI: a headless ``dagster dev`` over a copy of the
bundled sample (its own DAGSTER_HOME, lake and manifest under a temporary folder), the sensors'
runs awaited through GraphQL, then Debian's Chromium, headless, against the running UI.

    .venv/bin/python docs/take_screenshots.py      # needs the chromium package (apt install chromium)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bronze_assets.discovery import discover  # noqa: E402
from bronze_assets_tests.dagster_helpers import SAMPLE, DagsterDev, Paths, environment, make_dagster_home  # noqa: E402
from schemas.schemas import TABLES  # noqa: E402

SHOTS = {
    "asset-graph.png": "/asset-groups/bronze/lineage",
    "materialization.png": "/assets/bronze/orders/delta?view=events",
    "checks.png": "/assets/bronze/returns/delta?view=checks",
}


def chromium(url: str, out: Path, profile: Path) -> None:
    subprocess.run(
        [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--window-size=1600,1000", "--hide-scrollbars",
            "--virtual-time-budget=20000", f"--screenshot={out}", url,
        ],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = Paths(root)
        shutil.copytree(SAMPLE, paths.raw)
        home = make_dagster_home(root / "home")
        dev = DagsterDev(home, environment(paths, home), root / "dev.log")
        try:
            dev.start()
            keys = [s.src_path for s in discover(paths.raw, TABLES).sources]
            dev.wait_for_success(keys, timeout=300)
            dev.graphql("mutation { setNuxSeen }")  # the UI's first-visit dialog, already answered
            for name, path in SHOTS.items():
                chromium(dev.url + path, ROOT / "docs" / name, root / "chromium")
                print(f"docs/{name}: {path}")
        finally:
            dev.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
