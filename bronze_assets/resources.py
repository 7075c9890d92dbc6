"""Dagster resources: where the lake lives, and the DuckDB manifest."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from bronze_assets.lake import TARGET_FILE_BYTES
from bronze_assets.staging import Settings
from schemas.schemas import ValidationMode

SETTLE_SECONDS = 5.0


class ManifestResource(DuckDBResource):
    """The manifest as a ``DuckDBResource`` whose connection is closed even when the body raises
    (the base class leaves it open, and DuckDB's file lock with it, until garbage collection)."""

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:  # type: ignore[override]
        Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        con = duckdb.connect(self.database, config={"custom_user_agent": "dagster", **self.connection_config})
        try:
            yield con
        finally:
            con.close()


class LakeResource(dg.ConfigurableResource):
    """The raw folder, the lake and the run options shared by assets, sensors and jobs."""

    raw: str = "data_raw"
    lake: str = "lake"
    settle_seconds: float = SETTLE_SECONDS
    target_file_mb: int = TARGET_FILE_BYTES >> 20

    def settings(
        self,
        *,
        manifest: str,
        tables: tuple[str, ...] | None = None,
        only: tuple[str, ...] | None = None,
        reprocess: tuple[str, ...] = (),
        validation_mode: ValidationMode | None = None,
    ) -> Settings:
        return Settings(
            raw=Path(self.raw),
            lake=Path(self.lake),
            manifest=Path(manifest),
            tables=tables,
            only=only,
            reprocess=reprocess,
            validation_mode=validation_mode,
            target_file_bytes=self.target_file_mb << 20,
        )
