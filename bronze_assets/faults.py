"""Named steps of a run, for the crash tests: with ``BRONZE_KILL_AT=N`` in its environment the
process kills itself (SIGKILL, as ``kill -9`` would) on reaching its N-th step, and with
``BRONZE_STEP_LOG=<file>`` it appends each step's name to that file. Without them a step costs
one dictionary lookup. The environment is read on the first step, not at import.
"""

from __future__ import annotations

import os
import signal

_state: dict[str, object] = {}


def step(name: str) -> None:
    """A point where a crash must leave nothing that the next run does not finish or replace."""
    if not _state:
        kill_at = os.environ.get("BRONZE_KILL_AT", "")
        _state["kill_at"] = int(kill_at) if kill_at.isdigit() else 0
        _state["log"] = os.environ.get("BRONZE_STEP_LOG") or None
        _state["count"] = 0
    count = int(_state["count"]) + 1  # type: ignore[call-overload]
    _state["count"] = count
    log = _state["log"]
    if isinstance(log, str):
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"{count} {name}\n")
    if count == _state["kill_at"]:
        os.kill(os.getpid(), signal.SIGKILL)
