"""The DuckDB manifest: what was processed, the schema history and the Delta source watermarks.

Connections are short: one per read and one per recorded source, so that another process (a
Dagster run, a dry run) is never kept out for long. Every statement is parameterised.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from bronze_assets.faults import step

SCHEMA_SQL = (
    """CREATE TABLE IF NOT EXISTS manifest_processed_files(
        src_path TEXT PRIMARY KEY,
        table_name TEXT,
        file_format TEXT,
        file_size_bytes BIGINT,
        file_checksum TEXT,
        processed_at TIMESTAMP,
        row_count BIGINT,
        reject_count BIGINT,
        status TEXT,
        error_message TEXT,
        run_id TEXT,
        file_mtime_ns BIGINT,
        duplicate_of TEXT,
        rejects_by_reason JSON,
        delta_version BIGINT)""",
    """CREATE TABLE IF NOT EXISTS schema_history(
        table_name TEXT,
        src_path TEXT,
        columns JSON,
        change TEXT,
        detected_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS watermarks(
        source_path TEXT PRIMARY KEY,
        table_name TEXT,
        last_version BIGINT,
        updated_at TIMESTAMP)""",
)

INGESTED = ("success", "rejected")


@dataclass(frozen=True)
class ManifestRow:
    src_path: str
    table_name: str
    file_format: str
    file_size_bytes: int | None
    file_checksum: str | None
    processed_at: dt.datetime | None
    row_count: int
    reject_count: int
    status: str
    error_message: str | None
    run_id: str | None
    file_mtime_ns: int | None = None
    duplicate_of: str | None = None
    rejects_by_reason: str | None = None
    delta_version: int | None = None


COLUMNS = tuple(ManifestRow.__dataclass_fields__)


def utcnow() -> dt.datetime:
    """Now in UTC, as a naive timestamp (the manifest's TIMESTAMP columns hold UTC)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


Connector = Callable[[], AbstractContextManager[duckdb.DuckDBPyConnection]]


class Manifest:
    """The manifest database at ``path``; ``read_only`` never creates or changes anything.

    ``connector`` supplies connections instead (Dagster passes its DuckDB resource's); ``hold``
    keeps the database open until ``release`` (see ``hold``)."""

    def __init__(
        self, path: Path, *, read_only: bool = False, connector: Connector | None = None, hold: bool = False
    ) -> None:
        self.path = path
        self.read_only = read_only
        self.connector = None if read_only else connector
        self._held: duckdb.DuckDBPyConnection | None = None
        if not read_only:
            path.parent.mkdir(parents=True, exist_ok=True)
            if hold:
                self.hold()
            with self.connect() as con:
                for stmt in SCHEMA_SQL:
                    con.execute(stmt)

    def hold(self) -> None:
        """Keep the database open until ``release``: each call then takes a cursor of that one
        connection instead of opening the file (20-45 ms an open and close here, about ten of
        them in a run). For a run that holds the manifest's lock, which every other writer
        waits for; not with a connector (Dagster's resource) or read-only."""
        if self._held is None and self.connector is None and not self.read_only:
            self._held = duckdb.connect(str(self.path))

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self._held is not None:
            cursor = self._held.cursor()  # a connection of its own to the open database: thread-safe
            try:
                yield cursor
            finally:
                cursor.close()
            return
        if self.connector is not None:
            with self.connector() as con:
                yield con
            return
        if self.read_only:
            if not self.path.exists():
                con = duckdb.connect(":memory:")
                for stmt in SCHEMA_SQL:
                    con.execute(stmt)
            else:
                con = duckdb.connect(str(self.path), read_only=True)
        else:
            con = duckdb.connect(str(self.path))
        try:
            yield con
        finally:
            con.close()

    def rows(self, *, table_names: Sequence[str] | None = None) -> dict[str, ManifestRow]:
        sql = f"SELECT {', '.join(COLUMNS)} FROM manifest_processed_files"
        params: list[Any] = []
        if table_names is not None:
            sql += " WHERE table_name IN (SELECT unnest(?::TEXT[]))"
            params.append(list(table_names))
        with self.connect() as con:
            fetched = con.execute(sql, params).fetchall()
        return {r[0]: ManifestRow(*r) for r in fetched}

    def table_columns(self) -> dict[str, list[str]]:
        """The latest column list recorded per table."""
        with self.connect() as con:
            fetched = con.execute(
                """SELECT table_name, columns FROM schema_history
                   QUALIFY row_number() OVER (PARTITION BY table_name ORDER BY detected_at DESC) = 1"""
            ).fetchall()
        return {t: json.loads(c) for t, c in fetched}

    def record(
        self, rows: Sequence[ManifestRow], *, schema_rows: Sequence[tuple[str, str, list[str], str | None]] = ()
    ) -> None:
        """Insert or replace ``rows`` and append schema history rows, in one transaction."""
        if self.read_only or not (rows or schema_rows):
            return
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    "DELETE FROM manifest_processed_files WHERE src_path IN (SELECT unnest(?::TEXT[]))",
                    [[r.src_path for r in rows]],
                )
                con.executemany(
                    f"INSERT INTO manifest_processed_files ({', '.join(COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in COLUMNS)})",
                    [[getattr(row, c) for c in COLUMNS] for row in rows],
                )
                now = utcnow()
                for table_name, src_path, columns, change in schema_rows:
                    con.execute(
                        "INSERT INTO schema_history VALUES (?, ?, ?, ?, ?)",
                        [table_name, src_path, json.dumps(columns), change, now],
                    )
                step("manifest.in_transaction")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def touch(self, src_path: str, *, mtime_ns: int) -> None:
        """Remember a new modification time for a source whose content did not change."""
        if self.read_only:
            return
        with self.connect() as con:
            con.execute(
                "UPDATE manifest_processed_files SET file_mtime_ns = ? WHERE src_path = ?", [mtime_ns, src_path]
            )

    def watermarks(self) -> dict[str, int]:
        with self.connect() as con:
            return dict(con.execute("SELECT source_path, last_version FROM watermarks").fetchall())

    def set_watermarks(self, marks: Sequence[tuple[str, str, int]]) -> None:
        """Record (source_path, table_name, last_version) of Delta sources."""
        if self.read_only or not marks:
            return
        latest: dict[str, tuple[str, str, int]] = {}
        for mark in marks:
            latest[mark[0]] = mark if mark[0] not in latest else max(latest[mark[0]], mark, key=lambda m: m[2])
        now = utcnow()
        with self.connect() as con:
            con.executemany(
                "INSERT OR REPLACE INTO watermarks VALUES (?, ?, ?, ?)", [[*m, now] for m in latest.values()]
            )
