"""Find raw sources under the raw root and say which table each belongs to (CONTRACT section 3)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from schemas.schemas import Table

Format = Literal["csv", "parquet", "xlsx", "jsonl", "json", "delta"]

# Longest suffix first, so that ".csv.gz" wins over ".gz".
SUFFIXES: tuple[tuple[str, Format, str | None], ...] = (
    (".csv.gz", "csv", "gzip"),
    (".jsonl.gz", "jsonl", "gzip"),
    (".ndjson.gz", "jsonl", "gzip"),
    (".json.gz", "json", "gzip"),
    (".csv", "csv", None),
    (".parquet", "parquet", None),
    (".xlsx", "xlsx", None),
    (".jsonl", "jsonl", None),
    (".ndjson", "jsonl", None),
    (".json", "json", None),
)
IGNORED_SUFFIXES = (".tmp", ".crc", ".part")


@dataclass(frozen=True)
class RawSource:
    """One raw file (or Delta source table) and the table it belongs to."""

    src_path: str  # relative to the raw root, '/'-separated
    table: str
    format: Format
    path: Path
    size: int
    mtime_ns: int
    compression: str | None = None
    # The inode's change time: set by the kernel on every write, rename or copy, and never
    # backdated (unlike mtime, which `cp -p`, `rsync -t` or `touch -d` carry over or set).
    ctime_ns: int = 0


@dataclass(frozen=True)
class Discovery:
    sources: tuple[RawSource, ...]
    unmatched: tuple[str, ...]
    too_new: tuple[str, ...]


def is_ignored(name: str) -> bool:
    return name.startswith((".", "_", "~$")) or name.lower().endswith(IGNORED_SUFFIXES)


def file_format(name: str) -> tuple[Format, str | None] | None:
    lower = name.lower()
    for suffix, fmt, compression in SUFFIXES:
        if lower.endswith(suffix):
            return fmt, compression
    return None


def table_for_root_file(name: str, tables: Iterable[Table]) -> Table | None:
    """A file directly in the raw root belongs to T when its name is T followed by '.', '_' or '-'."""
    best: Table | None = None
    for table in tables:
        n = len(table.name)
        matches = name.startswith(table.name) and len(name) > n and name[n] in "._-"
        if matches and (best is None or n > len(best.name)):
            best = table
    return best


def discover(
    raw_root: Path, tables: Sequence[Table], *, min_file_age: float = 0.0, now: float | None = None
) -> Discovery:
    """List the raw sources of ``tables`` under ``raw_root``, sorted by ``src_path``.

    Files modified less than ``min_file_age`` seconds ago are listed in ``too_new`` and left for
    a later run. Symbolic links are followed only when they resolve inside the raw root.
    """
    now = time.time() if now is None else now
    root = raw_root.resolve()
    sources: list[RawSource] = []
    unmatched: list[str] = []
    too_new: list[str] = []
    by_name = {t.name: t for t in tables}

    def consider(path: Path, rel: str, table: Table | None) -> None:
        name = path.name
        fmt = file_format(name)
        if table is None or fmt is None:
            unmatched.append(rel)
            return
        try:
            if not _inside(path, root):
                unmatched.append(rel)
                return
            st = path.stat()
        except OSError:
            return
        if min_file_age and now - st.st_mtime < min_file_age:
            too_new.append(rel)
            return
        sources.append(RawSource(rel, table.name, fmt[0], path, st.st_size, st.st_mtime_ns, fmt[1], st.st_ctime_ns))

    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError:
        return Discovery((), (), ())
    for entry in entries:
        if is_ignored(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            # A folder that is no table is walked too: its files are reported as unmatched.
            _walk_table_dir(
                Path(entry.path), root, by_name.get(entry.name), sources, consider, min_file_age, now, too_new
            )
        elif entry.is_file():
            consider(Path(entry.path), entry.name, table_for_root_file(entry.name, tables))
    sources.sort(key=lambda s: s.src_path)
    return Discovery(tuple(sources), tuple(sorted(unmatched)), tuple(sorted(too_new)))


def _walk_table_dir(
    directory: Path,
    root: Path,
    table: Table | None,
    sources: list[RawSource],
    consider: Callable[[Path, str, Table | None], None],
    min_file_age: float,
    now: float,
    too_new: list[str],
) -> None:
    for dirpath, dirnames, filenames in os.walk(directory):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if is_ignored(d):
                continue
            sub = here / d
            if table is not None and (sub / "_delta_log").is_dir():
                rel = sub.relative_to(root).as_posix()
                newest, changed = _delta_log_times(sub)
                if min_file_age and now - newest / 1e9 < min_file_age:
                    too_new.append(rel)
                else:
                    sources.append(RawSource(rel, table.name, "delta", sub, 0, newest, None, changed))
                continue
            keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if is_ignored(f):
                continue
            path = here / f
            consider(path, path.relative_to(root).as_posix(), table)


def _delta_log_times(table_dir: Path) -> tuple[int, int]:
    """The newest modification and change times in a Delta table's log (a commit adds a file)."""
    try:
        stats = [e.stat() for e in os.scandir(table_dir / "_delta_log")]
    except OSError:
        return 0, 0
    return max((s.st_mtime_ns for s in stats), default=0), max((s.st_ctime_ns for s in stats), default=0)


def _inside(path: Path, root: Path) -> bool:
    if not path.is_symlink():
        return True
    try:
        return path.resolve().is_relative_to(root)
    except OSError:
        return False
