"""The lake: both bronze outputs, written once and shared, and the rejects.

Each source's valid rows are written once, as Parquet files in hive partition folders under a
staging area. The same files are then hard-linked into the Delta table and committed there in
one transaction that also removes the files of that source's previous ingestion, and finally
linked into the Parquet dataset, whose file set always mirrors the Delta table's active files.
Both outputs therefore hold exactly the same rows, the data is written once, and a source is
replaced atomically in Delta. The Delta log is the record of truth: at the start of every run
``reconcile`` repairs the Parquet mirror after a crash.

Every data file name starts with the source's id (``<src_id>-<token>-<n>.parquet``), which is how
a source's files are found again in the Delta log when it is replaced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from bronze_assets.faults import step
from bronze_assets.readers import normalize_schema
from bronze_assets.validation import REJECT_SCHEMA

if TYPE_CHECKING:
    from schemas.schemas import Table

TARGET_FILE_BYTES = 128 << 20
ROW_GROUP_ROWS = 262_144
BUFFER_BYTES = 128 << 20  # BRONZE_WRITER_BUFFER_MB overrides it (see writer_buffer_bytes)
SPILL_DIR = "_spill"  # inside a writer's directory: rows set aside on disk until their row group fills
SPILL_WRITE_BYTES = 4 << 20  # writes into a spill file are gathered up to this size
FILE_WRITE_BYTES = 256 << 10  # ... and into a data file up to this (one buffer per open file)
MAX_OPEN_FILES = 4096  # Parquet files a writer keeps open at once (one per partition being written)
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
STRING_STAT_CHARS = 32
MAX_CHAR = "\U0010ffff"
_WIDEST: dict[str, tuple[object, object]] = {
    "string": ("", MAX_CHAR),
    "large_string": ("", MAX_CHAR),
    "double": (-sys.float_info.max, sys.float_info.max),
}


def source_id(src_path: str) -> str:
    return hashlib.sha256(src_path.encode()).hexdigest()[:16]


def hive_value(value: object) -> str:
    if value is None:
        return HIVE_NULL
    if isinstance(value, dt.date):
        return value.isoformat()
    return urllib.parse.quote(str(value), safe="")


def delta_value(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    return str(value)


@dataclass
class WrittenFile:
    relpath: str  # '/'-separated, relative to the table folder
    partition_values: dict[str, str | None]
    rows: int
    size: int
    stats: str
    # Where the file sits in the folder it was written in, when that is not ``relpath``: a
    # partitioned writer puts its files flat (each partition folder would be one more inode to
    # allocate, and they are made once more in each output).
    staged: str = ""

    def staged_path(self, folder: Path) -> Path:
        return folder / (self.staged or self.relpath)


@dataclass
class DeltaCommit:
    """What one Delta commit changed (paths relative to the table folder)."""

    table: str
    version: int
    added: list[str]
    removed: list[str]

    def then(self, later: DeltaCommit) -> DeltaCommit:
        """This commit followed by ``later``, as one change of the table's file set."""
        gone = set(later.removed)
        added = [p for p in self.added if p not in gone] + later.added
        mine = set(self.added)
        return DeltaCommit(self.table, later.version, added, self.removed + [p for p in later.removed if p not in mine])


@dataclass
class _Open:
    writer: pq.ParquetWriter | None
    sink: pa.NativeFile | None
    relpath: str
    values: dict[str, object]
    pending: list[pa.Table] = field(default_factory=list)
    pending_rows: int = 0
    pending_bytes: int = 0
    rows: int = 0
    # Rows set aside on disk: (spill, offset, length) of each of their record batches in the
    # spill's file.
    spilled: list[tuple[int, int, int]] = field(default_factory=list)
    spilled_rows: int = 0


@dataclass
class _SpillFile:
    """One spill's file, shared by the partitions it set rows aside for."""

    path: Path
    holders: int  # partitions whose batches in it are not read back yet


UNIQUE_PER_ROW = ("src_row_number", "src_row_hash")
INCOMPRESSIBLE = ("src_row_hash",)  # stored without compression


class FolderMaker:
    """Makes a table's partition folders in its outputs (the Delta table's folder and the Parquet
    dataset's) on a thread of its own, as a writer meets each partition while its source is
    streamed, so that publishing finds them made and only links files into them.

    Why not at publish, where the files are linked: on ext4 a new folder's inode is allocated
    past every inode deleted in the last minutes in its group, each looked up, so that making
    folders where others were just removed (a lake rebuilt, a benchmark) costs far more than
    the syscall: 1.0 s on one core for the 1,300 folders of a 600-partition source, at the end
    of the run where nothing else was left to do. While the source streams, the second core
    has time to spare. Best effort: a folder that could not be made here is made (or its error
    raised) when its files are linked. A writer that aborts removes the folders it made that
    are still empty; a run killed meanwhile leaves empty folders, which no reader lists."""

    def __init__(self, roots: Sequence[Path]) -> None:
        self._roots = list(roots)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bronze-folders")
        self._made: list[str] = []

    def make(self, dirs: str) -> None:
        self._made.append(dirs)
        self._pool.submit(self._make, dirs)

    def _make(self, dirs: str) -> None:
        for root in self._roots:
            with contextlib.suppress(OSError):
                (root / dirs).mkdir(parents=True, exist_ok=True)

    def close(self, *, remove_empty: bool = False) -> None:
        self._pool.shutdown(wait=True)
        if not remove_empty:
            return
        for dirs in self._made:
            for root in self._roots:
                parts = dirs.split("/")
                while parts:  # the folder, then its parents up to the table's, while empty
                    try:
                        (root / "/".join(parts)).rmdir()
                    except OSError:
                        break
                    parts.pop()


DICTIONARY_SAMPLE_ROWS = 4096


def dictionary_columns(data: pa.Table, candidates: Sequence[str]) -> list[str]:
    """The ``candidates`` worth dictionary-encoding in a file that starts with ``data``: those
    whose first rows hold at most half as many distinct values as values. Parquet writers give
    up on a dictionary only when it outgrows its page (1 MB in pyarrow), which a file of a few
    thousand rows never reaches, so a column of unique values (an event's id, a URL) was
    dictionary-encoded whole: each value hashed, then stored once in the dictionary and once
    more as an index. Writing 2M events rows over 366 files took 1.77-2.06 CPU-s that way,
    1.64-1.74 with the three such columns stored plain, and the files came out 5% smaller."""
    sample = data.slice(0, DICTIONARY_SAMPLE_ROWS)
    chosen = []
    for name in candidates:
        column = sample.column(name)
        values = len(column) - column.null_count
        if values == 0 or 2 * pc.count_distinct(column).as_py() <= values:
            chosen.append(name)
    return chosen


class PartitionedWriter:
    """Write a stream of tables as hive-partitioned Parquet files under ``directory``.

    Memory is bounded: rows wait in memory per partition until a row group is full or the
    buffers of all partitions together pass ``buffer_bytes``. Then every partition's waiting rows
    are set aside on disk (``_spill/``, Arrow IPC: a copy, no encoding) and freed, and a
    partition's row group is written once its rows in memory and on disk fill one, or at close.
    One spill writes one file for all the partitions (a file per partition would be hundreds of
    inodes to allocate per spill); each partition maps and reads back only its own batches.
    A source spread thinly over hundreds of partitions thus gets row groups as large as its
    partitions (not a sliver per buffer's worth), and memory does not grow with the source:
    neither the buffer nor the Parquet footers, which a writer keeps until it closes a file and
    which grow with every row group. Files roll over at ``target_file_bytes``. Partition columns
    are not stored in the files (only in the folder names).

    ``constants`` names columns that hold one value in every row the writer is given (the
    source's name and ingestion time, for a writer of one source's rows): they are not carried
    through the buffer and the spill (a fifth of an orders row's bytes) but put back as each
    file's rows are written, as slices of one array of the value.
    """

    def __init__(
        self,
        directory: Path,
        schema: pa.Schema,
        *,
        partition_by: tuple[str, ...],
        prefix: str,
        target_file_bytes: int = TARGET_FILE_BYTES,
        row_group_rows: int = ROW_GROUP_ROWS,
        buffer_bytes: int | None = None,
        folders: FolderMaker | None = None,
        constants: Mapping[str, object] | None = None,
    ) -> None:
        self.directory = directory
        self.folders = folders
        self.schema = schema
        self.partition_by = partition_by
        self.file_schema = pa.schema([f for f in schema if f.name not in partition_by])
        self._constants = {
            name: pa.scalar(value, self.file_schema.field(name).type)
            for name, value in (constants or {}).items()
            if name in self.file_schema.names
        }
        self._repeated: dict[str, pa.Array] = {}  # each constant's value, repeated
        # The columns buffered and set aside: all but the constants.
        self._carried_schema = pa.schema([f for f in self.file_schema if f.name not in self._constants])
        # Dictionary encoding for text columns only, and not for the audit columns that differ on
        # every row: on numbers and timestamps it cost a quarter of the encoding time and made the
        # files no smaller (measured on orders: 66 MB against 73 MB with every column). Each file
        # then keeps it for the columns whose first rows repeat values (see dictionary_columns).
        self._dictionary_columns = [
            f.name for f in self.file_schema if pa.types.is_string(f.type) and f.name not in UNIQUE_PER_ROW
        ]
        # Snappy for every column but the row hash: its hex digits are random, snappy saved a
        # tenth of its bytes (5-6% of a file) for 9% of the writer's CPU (orders and sensors).
        self._compression = {f.name: "none" if f.name in INCOMPRESSIBLE else "snappy" for f in self.file_schema}
        self.prefix = prefix
        self.target_file_bytes = target_file_bytes
        self.row_group_rows = row_group_rows
        self.buffer_bytes = writer_buffer_bytes() if buffer_bytes is None else buffer_bytes
        self._open: dict[tuple[object, ...], _Open] = {}
        self._buffered = 0
        self._seq = 0
        self._spill_files: dict[int, _SpillFile] = {}
        self._directory_made = False
        self._lock = threading.Lock()  # the counters and the file list, when partitions flush in parallel
        self.files: list[WrittenFile] = []
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.rows += table.num_rows
        for name, value in self._constants.items():
            column = table.column(name)
            if not (column[0] == value and column[-1] == value):  # a caller's mistake, not the data's
                raise ValueError(f"{name} is not {value} in every row given to this writer")
        # A slice's share of the table's bytes, by its rows: asking each slice for its own
        # size costs a walk over its buffers (a tenth of the writer's time over 600 partitions).
        row_bytes = (table.nbytes - sum(table.column(c).nbytes for c in self._constants)) / table.num_rows
        if not self.partition_by:
            carried = table.select(self._carried_schema.names)
            self._append((), {}, carried, carried.nbytes)
        else:
            for values, part in self._split(table):
                self._append(tuple(values.values()), values, part.select(self._carried_schema.names), int(part.num_rows * row_bytes))
        if self._buffered > self.buffer_bytes:
            # Every partition, not just the largest: the pending slices share the buffers of the
            # batches they came from, which stay alive until the last slice is released.
            self._spill()
            step("writer.spilled")

    def _split(self, table: pa.Table) -> Iterable[tuple[dict[str, object], pa.Table]]:
        bounds = self._runs(table)
        if len(bounds) - 1 > table.select(list(self.partition_by)).group_by(list(self.partition_by)).aggregate([]).num_rows:
            # Some partition's rows are not together: sort (a copy of every column). Input that
            # comes grouped (the validating statement orders its rows by partition) skips it.
            table = table.take(pc.sort_indices(table, sort_keys=[(c, "ascending") for c in self.partition_by]))
            bounds = self._runs(table)
        for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            part = table.slice(start, stop - start)
            values = {c: part.column(c)[0].as_py() for c in self.partition_by}
            yield values, part

    def _runs(self, table: pa.Table) -> np.ndarray:
        """Where each run of rows with equal partition values starts, and the end."""
        n = table.num_rows
        change = np.zeros(n, dtype=bool)
        change[0] = True
        for c in self.partition_by:
            col = table.column(c).combine_chunks()
            if n > 1:
                differs = pc.not_equal(col.slice(1), col.slice(0, n - 1))
                differs = pc.fill_null(differs, True)
                change[1:] |= differs.to_numpy(zero_copy_only=False)
        return np.append(np.flatnonzero(change), n)

    def _append(self, key: tuple[object, ...], values: dict[str, object], part: pa.Table, nbytes: int) -> None:
        state = self._open.get(key)
        if state is None:
            if len(self._open) >= open_file_budget():
                self._close(next(iter(self._open)))
            state = self._open[key] = _Open(None, None, "", values)
            if self.folders is not None and self.partition_by:
                self.folders.make(self._folder_of(values))
        state.pending.append(part)
        state.pending_rows += part.num_rows
        state.pending_bytes += nbytes
        self._buffered += nbytes
        if state.pending_rows + state.spilled_rows >= self.row_group_rows:
            self._flush(key)

    def _folder_of(self, values: dict[str, object]) -> str:
        """A partition's hive folder, relative to the table's (empty when unpartitioned)."""
        return "/".join(f"{c}={hive_value(values[c])}" for c in self.partition_by)

    def _take_pending(self, state: _Open) -> pa.Table:
        data = pa.concat_tables(state.pending)  # the chunks as they are: no copy
        with self._lock:
            self._buffered -= state.pending_bytes
        state.pending, state.pending_rows, state.pending_bytes = [], 0, 0
        return data

    def _spill(self) -> None:
        """Set every partition's waiting rows aside on disk, in one file, releasing the batches
        they came from."""
        keys = [key for key, state in self._open.items() if state.pending]
        if not keys:
            return
        with self._lock:
            self._seq += 1
            seq = self._seq
        folder = self.directory / SPILL_DIR
        if not self._spill_files:
            folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{seq:05d}.arrow"
        # Buffered: the IPC writer writes every buffer of every batch on its own (a few KB for a
        # partition's slice of a batch), and each small write into a new page of the file makes
        # the kernel clear the page first.
        with (
            pa.OSFile(str(path), "wb") as raw,
            pa.BufferedOutputStream(raw, SPILL_WRITE_BYTES) as sink,
            pa.ipc.new_stream(sink, self._carried_schema) as out,
        ):
            # The schema goes out with the first batch: an empty one, so that every partition's
            # batches start past it.
            out.write_batch(pa.RecordBatch.from_pylist([], schema=self._carried_schema))
            for key in keys:
                state = self._open[key]
                data = self._take_pending(state)
                for batch in data.to_batches():
                    at = sink.tell()
                    out.write_batch(batch)
                    state.spilled.append((seq, at, sink.tell() - at))
                state.spilled_rows += data.num_rows
        with self._lock:
            self._spill_files[seq] = _SpillFile(path, len(keys))

    def _unspill(self, state: _Open) -> pa.Table | None:
        """The rows a partition set aside, read back memory-mapped (not copied). Each partition
        maps the files on its own, so that the pages it read leave the process with its rows
        (one mapping shared by all would keep every page read until the last partition is
        written). A spill's file is unlinked once the last of its partitions has mapped it: its
        pages stay readable while the mappings live."""
        if not state.spilled:
            return None
        maps: dict[int, pa.MemoryMappedFile] = {}
        with self._lock:  # partitions are flushed in parallel, and their spills share files
            for seq, _, _ in state.spilled:
                if seq not in maps:
                    spill_file = self._spill_files[seq]
                    maps[seq] = pa.memory_map(str(spill_file.path))
                    spill_file.holders -= 1
                    if spill_file.holders == 0:
                        spill_file.path.unlink()
                        del self._spill_files[seq]
        batches = [pa.ipc.read_record_batch(_mapped(maps[seq], at, length), self._carried_schema) for seq, at, length in state.spilled]
        state.spilled, state.spilled_rows = [], 0
        return pa.Table.from_batches(batches, schema=self._carried_schema)

    def _flush(self, key: tuple[object, ...]) -> None:
        state = self._open[key]
        if not state.pending and not state.spilled:
            return
        spilled = self._unspill(state)
        parts = [] if spilled is None else [spilled]
        if state.pending:
            parts.append(self._take_pending(state))
        data = self._with_constants(pa.concat_tables(parts))  # the chunks as they are: no copy
        if state.writer is None:
            with self._lock:
                self._seq += 1
                seq = self._seq
            dirs = self._folder_of(state.values)
            name = f"{self.prefix}-{seq:05d}.parquet"
            state.relpath = f"{dirs}/{name}" if dirs else name
            with self._lock:
                if not self._directory_made:
                    self.directory.mkdir(parents=True, exist_ok=True)
                    self._directory_made = True
            # Buffered, as the spill is: the Parquet writer writes each page and header on its own.
            state.sink = pa.BufferedOutputStream(pa.OSFile(str(self.directory / name), "wb"), FILE_WRITE_BYTES)
            state.writer = pq.ParquetWriter(
                state.sink,
                self.file_schema,
                compression=self._compression,
                use_dictionary=dictionary_columns(data, self._dictionary_columns),
            )
            state.rows = 0
        assert state.writer is not None and state.sink is not None
        state.writer.write_table(data, row_group_size=max(self.row_group_rows, data.num_rows))
        state.rows += data.num_rows
        if state.sink.tell() >= self.target_file_bytes:
            self._finish(state)

    def _with_constants(self, data: pa.Table) -> pa.Table:
        """The carried columns of a file's rows with the constant ones put back in their place."""
        if not self._constants:
            return data
        n = data.num_rows
        columns = []
        for f in self.file_schema:
            if f.name not in self._constants:
                columns.append(data.column(f.name))
                continue
            with self._lock:  # partitions are flushed in parallel
                repeated = self._repeated.get(f.name)
                if repeated is None or len(repeated) < n:
                    size = n if repeated is None else max(n, 2 * len(repeated))
                    repeated = self._repeated[f.name] = pa.repeat(self._constants[f.name], size)
            columns.append(repeated.slice(0, n))
        return pa.Table.from_arrays(columns, schema=self.file_schema)

    def _finish(self, state: _Open) -> None:
        if state.writer is None:
            return
        state.writer.close()
        assert state.sink is not None
        state.sink.close()
        name = state.relpath.rsplit("/", 1)[-1]
        written = WrittenFile(
            relpath=state.relpath,
            partition_values={c: delta_value(state.values[c]) for c in self.partition_by},
            rows=state.rows,
            size=(self.directory / name).stat().st_size,
            stats=file_stats(state.writer.writer.metadata, state.rows),
            staged=name if name != state.relpath else "",
        )
        with self._lock:
            self.files.append(written)
        state.writer, state.sink = None, None

    def _flush_and_finish(self, key: tuple[object, ...]) -> None:
        self._flush(key)
        self._finish(self._open[key])

    def _close(self, key: tuple[object, ...]) -> None:
        self._flush_and_finish(key)
        del self._open[key]

    def close(self) -> list[WrittenFile]:
        keys = list(self._open)
        _in_parallel(self._flush_and_finish, keys)  # each file's footer and statistics too
        self._open.clear()
        shutil.rmtree(self.directory / SPILL_DIR, ignore_errors=True)
        if self.folders is not None:
            self.folders.close()
        self.files.sort(key=lambda f: f.relpath)
        return self.files

    def abort(self) -> None:
        for state in self._open.values():
            if state.writer is not None:
                state.writer.close()
            if state.sink is not None:
                state.sink.close()
        self._open.clear()
        self._spill_files.clear()
        shutil.rmtree(self.directory / SPILL_DIR, ignore_errors=True)
        if self.folders is not None:
            self.folders.close(remove_empty=True)


def _mapped(mapping: pa.MemoryMappedFile, at: int, length: int) -> pa.Buffer:
    """Bytes of a memory-mapped file as a slice of the mapping (``read_at`` copies them into a
    new object)."""
    mapping.seek(at)
    return mapping.read_buffer(length)


WRITER_THREADS = 2


def writer_buffer_bytes() -> int:
    """The rows a writer holds in memory before setting them aside on disk: BUFFER_BYTES, or
    ``BRONZE_WRITER_BUFFER_MB`` from the environment (a memory budget for small machines, or a
    larger one for fewer disk writes)."""
    value = os.environ.get("BRONZE_WRITER_BUFFER_MB", "").strip()
    if not value:
        return BUFFER_BYTES
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"BRONZE_WRITER_BUFFER_MB must be a number of megabytes, not {value!r}") from None
    if not 0 < mb <= 1 << 20:
        raise ValueError(f"BRONZE_WRITER_BUFFER_MB must be above 0 and at most {1 << 20}, not {value!r}")
    return max(1, int(mb * (1 << 20)))


def open_file_budget() -> int:
    """How many Parquet files a writer may keep open: one per partition, so that a source spread
    over hundreds of partitions (sensors: stores x months) makes one file per partition, not one
    per partition and batch. The process's soft limit on open files is raised toward its hard
    limit for that (the default of 1,024 on many systems is a convention, not a cost)."""
    global _BUDGET
    if _BUDGET is None:
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            wanted = MAX_OPEN_FILES * 2 + 256
            if soft != resource.RLIM_INFINITY and soft < wanted:
                new = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            limit = soft if soft != resource.RLIM_INFINITY else wanted
        except (ImportError, ValueError, OSError):
            limit = 1024
        _BUDGET = max(16, min(MAX_OPEN_FILES, (limit - 256) // 2))
    return _BUDGET


_BUDGET: int | None = None


def _in_parallel(fn: Callable[[Any], None], items: list[Any]) -> None:
    """``fn`` over ``items`` on WRITER_THREADS threads: each partition has a Parquet writer of its
    own, and encoding and compressing release the GIL, so partitions are written side by side."""
    if len(items) < 2:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="bronze-partition") as pool:
        for _ in pool.map(fn, items):
            pass


def _bound(value: object, *, upper: bool) -> object | None:
    """A statistic as Delta's JSON spells it, or None when there is none. Strings longer than
    STRING_STAT_CHARS are cut, as Delta writers do (the log would otherwise carry whole values):
    the prefix is still a lower bound, and ``_above_prefix`` gives an upper one."""
    if value is None:
        return None
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, decimal.Decimal):
        return _decimal_bound(value, upper=upper)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return value.isoformat(timespec="microseconds") + "Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        if len(value) <= STRING_STAT_CHARS or not upper:
            return value[:STRING_STAT_CHARS]
        return _above_prefix(value)
    return None


def _above_prefix(value: str) -> str:
    """The shortest string made from ``value``'s first STRING_STAT_CHARS characters that sorts
    after every string starting with them: the last one that can be is moved up a code point."""
    prefix = value[:STRING_STAT_CHARS]
    for i in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[i]) + 1
        if code <= 0x10FFFF:
            if 0xD800 <= code <= 0xDFFF:
                code = 0xE000  # surrogates are not characters
            return prefix[:i] + chr(code)
    return value  # only the highest code point: no shorter upper bound exists


def file_stats(meta: pq.FileMetaData, rows: int) -> str:
    """Delta ``stats`` of a file from its Parquet footer: row count, null counts, and min/max for
    every column that has values.

    Every column gets its bounds, because delta-rs's pyarrow dataset turns a missing min or max
    into a comparison with null and then skips the file on any filter over that column. A string
    column whose footer has no min/max (values over the Parquet writer's statistics size) gets
    the widest bounds instead.
    """
    nulls: dict[str, int] = {}
    mins: dict[str, object] = {}
    maxs: dict[str, object] = {}
    schema = meta.schema.to_arrow_schema()
    for i, f in enumerate(schema):
        total_nulls = 0
        lo: object | None = None
        hi: object | None = None
        counted = True
        bounded = True
        for g in range(meta.num_row_groups):
            col = meta.row_group(g).column(i)
            st = col.statistics
            if st is None or not st.has_null_count:
                counted = bounded = False
                break
            total_nulls += st.null_count
            if st.null_count == col.num_values:
                continue  # only nulls: no bound needed
            a = _bound(st.min, upper=False) if st.has_min_max else None
            b = _bound(st.max, upper=True) if st.has_min_max else None
            if a is None or b is None:
                widest = _WIDEST.get(str(f.type))
                if widest is None:
                    bounded = False
                    continue
                a, b = widest
            lo = a if lo is None or a < lo else lo  # type: ignore[operator]
            hi = b if hi is None or b > hi else hi  # type: ignore[operator]
        if not counted:
            continue
        nulls[f.name] = total_nulls
        if bounded and lo is not None:
            mins[f.name], maxs[f.name] = lo, hi
    return json.dumps({"numRecords": rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls}, ensure_ascii=False)


def _decimal_bound(value: decimal.Decimal, *, upper: bool) -> float | None:
    """Delta's JSON holds decimal statistics as numbers: a float whose shortest text is the
    decimal's own digits (any decimal of up to 15 significant digits), else the next float on
    the safe side."""
    if not value.is_finite():
        return None
    bound = float(value)
    text = decimal.Decimal(repr(bound))
    if upper and text < value:
        bound = math.nextafter(bound, math.inf)
    elif not upper and text > value:
        bound = math.nextafter(bound, -math.inf)
    return bound


def _has_commit(log: Path) -> bool:
    """Whether a ``_delta_log`` folder holds a commit or a checkpoint: a table exists. A run
    killed while creating a table leaves the folder with at most a temporary file in it."""
    try:
        return any(COMMIT_FILE.match(e.name) for e in os.scandir(log))
    except (FileNotFoundError, NotADirectoryError):
        return False


COMMIT_FILE = re.compile(r"^\d{20}\.(json|checkpoint(\.\d+\.\d+)?\.parquet|checkpoint\.[^.]+\.(json|parquet))$")


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except FileExistsError:
        dst.unlink()
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _mirror_file(src: Path, dst: Path) -> None:
    """Put a Delta data file into the Parquet dataset: a hard link of the very file, unless its
    embedded Arrow schema holds types other than the declared ones (delta-rs's MERGE writes
    string columns as ``string_view``), in which case the dataset gets a copy with the declared
    types (the same rows and values; written aside, then renamed into place)."""
    if not src.name.startswith(FOREIGN_PREFIX):  # written by this project: the declared types
        _link(src, dst)
        return
    schema = pq.read_schema(src)
    plain = normalize_schema(schema)
    if plain.equals(schema, check_metadata=False):
        _link(src, dst)
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    pf = pq.ParquetFile(src)
    with pq.ParquetWriter(tmp, plain.remove_metadata(), compression="snappy") as writer:
        for g in range(pf.num_row_groups):
            writer.write_table(pf.read_row_group(g).cast(plain.remove_metadata()))
    os.replace(tmp, dst)


OldFile = tuple[str, int, dict[str, str | None]]  # an active file: path, size, partition values
FOREIGN_PREFIX = "part-"  # how delta-rs names the files it writes (its MERGE)
# A data file written for one source: ``<source id>-<token>-<n>.parquet``. Any other name is a
# file shared by several sources (batched small sources, compaction).
SOURCE_FILE_NAME = r"(?:^|/)(?P<sid>[0-9a-f]{16})-[0-9a-f]{12}-[0-9]+\.parquet$"


def add_actions(dt_: DeltaTable) -> pa.Table:
    """The Delta table's active files (``get_add_actions``), paths decoded."""
    actions = pa.table(dt_.get_add_actions(flatten=False))
    if actions.num_rows == 0:
        return actions
    paths = pa.array([urllib.parse.unquote(p) for p in actions.column("path").to_pylist()], pa.string())
    return actions.set_column(actions.schema.get_field_index("path"), "path", paths)


def _old_files(actions: pa.Table) -> list[OldFile]:
    if actions.num_rows == 0:
        return []
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    if "partition" in actions.column_names:
        parts = [{k: delta_value(v) for k, v in (pv or {}).items()} for pv in actions.column("partition").to_pylist()]
    else:
        parts = [{} for _ in paths]
    return [(p, int(s), v) for p, s, v in zip(paths, sizes, parts, strict=True)]


def is_shared_file(relpath: str) -> bool:
    return re.search(SOURCE_FILE_NAME, relpath) is None


class Lake:
    """Paths and publishing for one lake root."""

    mirrored = True  # every Delta table has its Parquet dataset

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tables: dict[str, DeltaTable] = {}

    @property
    def history(self) -> HistoryLake:
        """Where upserted tables keep every valid record, by source (see ``upsert.py``)."""
        return HistoryLake(self.root / "_history")

    def parquet_dir(self, table: str) -> Path:
        return self.root / "bronze" / "parquet" / table

    def delta_dir(self, table: str) -> Path:
        return self.root / "bronze" / "delta" / table

    def folder_maker(self, table: str) -> FolderMaker:
        """Makes ``table``'s partition folders in its outputs ahead of publishing (see FolderMaker)."""
        return FolderMaker([self.delta_dir(table), *([self.parquet_dir(table)] if self.mirrored else [])])

    def rejects_dir(self, table: str) -> Path:
        return self.root / "_rejects" / table

    @property
    def staging_root(self) -> Path:
        return self.root / "_staging"

    def rejects_file(self, table: str, src_path: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in src_path.replace("/", "__"))
        return self.rejects_dir(table) / f"{safe[:150]}.{source_id(src_path)[:8]}.csv"

    def clear_staging(self) -> None:
        shutil.rmtree(self.staging_root, ignore_errors=True)

    def staging_left_over(self) -> bool:
        return self.staging_root.is_dir() and any(self.staging_root.iterdir())

    def remove_empty_staging(self) -> None:
        with contextlib.suppress(OSError):
            self.staging_root.rmdir()

    def delta_table(self, table: str) -> DeltaTable | None:
        """The Delta table, brought up to its latest version (opened once per ``Lake``: a run
        holds the lake alone, and catching up with new commits only lists the log)."""
        path = self.delta_dir(table)
        dt_ = self._tables.get(table)
        if dt_ is not None and (path / "_delta_log").is_dir():
            dt_.update_incremental()
            return dt_
        if not _has_commit(path / "_delta_log"):
            self._tables.pop(table, None)
            return None
        dt_ = self._tables[table] = DeltaTable(str(path))
        return dt_

    def ensure_delta(self, table: str, schema: pa.Schema, partition_by: tuple[str, ...]) -> DeltaTable:
        existing = self.delta_table(table)
        if existing is not None:
            return existing
        path = self.delta_dir(table)
        path.mkdir(parents=True, exist_ok=True)
        if self.mirrored:
            self.parquet_dir(table).mkdir(parents=True, exist_ok=True)
        DeltaTable.create(str(path), schema, mode="ignore", partition_by=list(partition_by) or None)
        created = self.delta_table(table)
        assert created is not None
        return created

    def source_files(self, dt_: DeltaTable, src_paths: Iterable[str]) -> list[OldFile]:
        """The active files named after any of ``src_paths``: (path, size, partition values)."""
        ids = pa.array(sorted({source_id(p) for p in src_paths}), pa.string())
        actions = add_actions(dt_)
        if actions.num_rows == 0 or len(ids) == 0:
            return []
        owner = pc.struct_field(pc.extract_regex(actions.column("path"), SOURCE_FILE_NAME), "sid")
        return _old_files(actions.filter(pc.fill_null(pc.is_in(owner, value_set=ids), False)))

    def active_files(self, dt_: DeltaTable) -> list[OldFile]:
        """Every active file of the Delta table: (path relative to the table, size, partition values)."""
        return _old_files(add_actions(dt_))

    def commit_delta(
        self,
        *,
        table: str,
        src_paths: Sequence[str],
        schema: pa.Schema,
        partition_by: tuple[str, ...],
        files: Sequence[tuple[Path, WrittenFile]],
        scratch: Path,
        run_id: str,
    ) -> DeltaCommit | None:
        """Replace the rows of ``src_paths`` in the Delta table with ``files`` (each with the
        folder it was written in) in one commit; None when there was nothing to replace and
        nothing to add. Files shared by several sources that hold rows of these sources are
        rewritten without them, under ``scratch``, in the same commit."""
        from bronze_assets.compaction import rewrite_without_sources

        dt_ = self.ensure_delta(table, schema, partition_by)
        self._add_new_columns(dt_, schema)
        old = self.source_files(dt_, src_paths)
        shared_old, rewritten = rewrite_without_sources(self, dt_, table, src_paths, scratch)
        old += shared_old
        placed = [*files, *((scratch, f) for f in rewritten)]
        if not old and not placed:
            return None
        delta_dir = self.delta_dir(table)
        now_ms = int(time.time() * 1000)
        actions: list[AddAction | RemoveAction] = []
        for folder, f in placed:
            _link(f.staged_path(folder), delta_dir / f.relpath)
            actions.append(
                AddAction(
                    path=uri_path(f.relpath),
                    size=f.size,
                    partition_values=f.partition_values,
                    modification_time=now_ms,
                    data_change=True,
                    stats=f.stats,
                )
            )
        for path, size, values in old:
            actions.append(RemoveAction(uri_path(path), True, now_ms, size, values))
        step("delta.linked")
        metadata = {"bronze.operation": "ingest", "bronze.run_id": run_id, "bronze.sources": str(len(src_paths))}
        if len(src_paths) == 1:
            metadata["bronze.src_path"] = src_paths[0]
        dt_.create_write_transaction(
            actions,
            mode="append",
            schema=self.table_schema(dt_),
            partition_by=list(partition_by) or None,
            commit_properties=CommitProperties(custom_metadata=metadata),
        )
        step("delta.committed")
        dt_.update_incremental()
        return DeltaCommit(table, dt_.version(), [f.relpath for _, f in placed], [p for p, _, _ in old])

    @staticmethod
    def commit_delta_of(
        lake: Lake,
        table: Table,
        *,
        src_paths: Sequence[str],
        schema: pa.Schema,
        files: Sequence[tuple[Path, WrittenFile]],
        scratch: Path,
        run_id: str,
    ) -> DeltaCommit | None:
        """``commit_delta`` for a declared table (the same call shape as ``commit_upsert``)."""
        return lake.commit_delta(
            table=table.name,
            src_paths=src_paths,
            schema=schema,
            partition_by=table.partition_by,
            files=files,
            scratch=scratch,
            run_id=run_id,
        )

    def commit_actions(self, table: str, version: int) -> DeltaCommit:
        """What the Delta commit ``version`` of ``table`` added and removed (paths relative to the
        table folder), read from its log entry."""
        added: list[str] = []
        removed: list[str] = []
        log = self.delta_dir(table) / "_delta_log" / f"{version:020d}.json"
        with open(log, encoding="utf-8") as fh:
            for line in fh:
                action = json.loads(line)
                if "add" in action:
                    added.append(urllib.parse.unquote(action["add"]["path"]))
                elif "remove" in action:
                    removed.append(urllib.parse.unquote(action["remove"]["path"]))
        return DeltaCommit(table, version, added, removed)

    def mirror_parquet(self, commit: DeltaCommit) -> None:
        """Make the Parquet dataset follow a Delta commit: link its new files, drop its removed ones."""
        parquet_dir, delta_dir = self.parquet_dir(commit.table), self.delta_dir(commit.table)
        for rel in commit.added:
            _mirror_file(delta_dir / rel, parquet_dir / rel)
            step("parquet.linked")
        for rel in commit.removed:
            _remove(parquet_dir / rel, within=parquet_dir)
        step("parquet.mirrored")

    @staticmethod
    def _add_new_columns(dt_: DeltaTable, schema: pa.Schema) -> None:
        """Schema evolution: columns of ``schema`` the Delta table lacks are added (nullable)."""
        from deltalake.schema import Schema as DeltaSchema

        have = {f.name for f in pa.schema(dt_.schema().to_arrow())}  # type: ignore[arg-type]
        new = [f.with_nullable(True) for f in schema if f.name not in have]
        if new:
            dt_.alter.add_columns(DeltaSchema.from_arrow(pa.schema(new)).fields)

    def table_schema(self, dt_: DeltaTable) -> pa.Schema:
        return pa.schema(dt_.schema().to_arrow())  # type: ignore[arg-type]

    def write_rejects(self, table: str, src_path: str, staged: Path) -> None:
        final = self.rejects_file(table, src_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, final)

    def remove_orphans(self, table: str) -> list[str]:
        """Delete the data files in the Delta table's folder that no commit references: those a
        run that died wrote or linked there before it could commit them. Files that a commit
        removed stay for vacuum (older versions still read them). Returns their paths.

        A folder whose log holds no commit at all (a run killed while creating the table) is no
        table yet: it and whatever was linked into it are removed, and the next publish creates
        the table afresh. Nothing was mirrored to the Parquet dataset before that first commit."""
        dt_ = self.delta_table(table)
        if dt_ is None:
            root = self.delta_dir(table)
            if root.is_dir():
                orphans = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
                shutil.rmtree(root)
                return orphans
            return []
        unreferenced = dt_.vacuum(retention_hours=0, dry_run=True, enforce_retention_duration=False, full=True)
        log = self.delta_dir(table) / "_delta_log"
        removed_by_commits: set[str] = set()
        for entry in log.glob("*.json"):
            with open(entry, encoding="utf-8") as fh:
                for line in fh:
                    if '"remove"' in line:
                        removed_by_commits.add(urllib.parse.unquote(json.loads(line)["remove"]["path"]))
        root = self.delta_dir(table)
        orphans = []
        for path in unreferenced:
            rel = urllib.parse.unquote(path)
            if rel not in removed_by_commits:
                _remove(root / rel, within=root)
                orphans.append(rel)
        return orphans

    def reconcile(self, table: str) -> int:
        """Make the Parquet dataset's file set equal the Delta table's active files; return the
        number of files fixed. Needed only after a run died between the two."""
        dt_ = self.delta_table(table)
        if dt_ is None:
            return 0
        actions = pa.table(dt_.get_add_actions(flatten=False))
        active = {urllib.parse.unquote(p) for p in actions.column("path").cast(pa.string()).to_pylist()}
        pdir = self.parquet_dir(table)
        present: set[str] = set()
        fixed = 0
        if pdir.is_dir():
            for dirpath, _, filenames in os.walk(pdir):
                for name in filenames:
                    rel = (Path(dirpath) / name).relative_to(pdir).as_posix()
                    if rel in active:
                        present.add(rel)
                    else:
                        _remove(pdir / rel, within=pdir)
                        fixed += 1
        for rel in active - present:
            _mirror_file(self.delta_dir(table) / rel, pdir / rel)
            fixed += 1
        return fixed


class HistoryLake(Lake):
    """Delta tables without a Parquet dataset, at ``<root>/<table>``: the history of upserted
    tables. Publishing, compaction and vacuum work on it as on the lake itself."""

    mirrored = False

    def delta_dir(self, table: str) -> Path:
        return self.root / table

    def mirror_parquet(self, commit: DeltaCommit) -> None:
        return None

    def reconcile(self, table: str) -> int:
        return 0


def uri_path(relpath: str) -> str:
    return "/".join(urllib.parse.quote(part, safe="=-_.") for part in relpath.split("/"))


def _remove(path: Path, *, within: Path) -> None:
    """Delete a data file, and the partition folders it leaves empty, up to (not including) the
    table folder ``within``."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    parent = path.parent
    try:
        while parent != within and parent.is_relative_to(within) and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    except OSError:
        pass


class RejectsWriter:
    """Streams one source's rejects to a CSV file (created on first write, or empty on close)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: pacsv.CSVWriter | None = None
        self.rows = 0

    def write(self, rejects: pa.Table) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pacsv.CSVWriter(str(self.path), REJECT_SCHEMA)
        if rejects.num_rows:
            self._writer.write_table(rejects)
            self.rows += rejects.num_rows

    def close(self) -> None:
        if self._writer is None:
            self.write(REJECT_SCHEMA.empty_table())
        assert self._writer is not None
        self._writer.close()

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.path.unlink(missing_ok=True)
        self.rows = 0
