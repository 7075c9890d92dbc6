"""Compaction: coalesce small files toward the target size, and keep replace-by-source working
on the coalesced files.

Data files are named after the source that wrote them (``<src_id>-...``), which is how a source's
files are found when it is replaced. Compaction merges files of several sources into files named
``compacted-...``; a later replacement of one of those sources rewrites the compacted files that
may hold its rows (by their ``src_filename`` statistics) without them, in the same Delta commit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from deltalake import DeltaTable

if TYPE_CHECKING:
    from bronze_assets.lake import Lake, WrittenFile

COMPACTED_PREFIX = "compacted-"

OldFile = tuple[str, int, dict[str, str | None]]


def compacted_files(lake: Lake, dt_: DeltaTable) -> list[OldFile]:
    """Active files of the table written by compaction."""
    return [f for f in lake.active_files(dt_) if f[0].rsplit("/", 1)[-1].startswith(COMPACTED_PREFIX)]


def rewrite_without_source(
    lake: Lake, dt_: DeltaTable, table: str, src_path: str, staged_dir: Path
) -> tuple[list[OldFile], list[WrittenFile]]:
    """Compacted files that may hold rows of ``src_path``, and their rewrites without those rows
    (written under ``staged_dir``). Nothing to do while the table has no compacted file."""
    if not compacted_files(lake, dt_):
        return [], []
    raise NotImplementedError("replacing a source inside compacted files")
