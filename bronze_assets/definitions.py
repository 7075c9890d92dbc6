"""Dagster code location. Wiring only: the ingestion itself is ``bronze_assets.ingest``.

For now one asset runs a whole ingestion (every table); per-table assets partitioned by source
file, sensors, IO managers and checks come on top of the same core.
"""

from pathlib import Path

import dagster as dg

from bronze_assets.ingest import Settings, run


class BronzeSettings(dg.ConfigurableResource):
    """Where the raw files, the lake and the manifest live (relative to the working directory)."""

    raw: str = "data_raw"
    lake: str = "lake"
    manifest: str = "duckdb/warehouse.duckdb"

    def settings(self) -> Settings:
        return Settings(raw=Path(self.raw), lake=Path(self.lake), manifest=Path(self.manifest))


@dg.asset(
    key=["bronze", "ingestion"],
    kinds={"parquet", "delta", "duckdb"},
    description="Ingest every new or changed raw source into the bronze Parquet and Delta outputs.",
    pool="manifest",
)
def bronze_ingestion(context: dg.AssetExecutionContext, bronze: BronzeSettings) -> dg.MaterializeResult:
    result = run(bronze.settings(), progress=context.log.info)
    failed = [o for o in result.outcomes if o.status == "failed"]
    if failed:
        raise dg.Failure(
            description=f"{len(failed)} source(s) failed",
            metadata={o.src_path: o.error or "" for o in failed[:50]},
        )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(o.rows for o in result.outcomes),
            "rows_rejected": sum(o.reject_count for o in result.outcomes),
            "sources_ingested": len(result.outcomes),
            "bytes_written": sum(o.bytes for o in result.outcomes),
            "files_written": sum(o.files for o in result.outcomes),
        }
    )


defs = dg.Definitions(
    assets=[bronze_ingestion],
    resources={
        "bronze": BronzeSettings(
            raw=dg.EnvVar("BRONZE_RAW").get_value("data_raw") or "data_raw",
            lake=dg.EnvVar("BRONZE_LAKE").get_value("lake") or "lake",
            manifest=dg.EnvVar("BRONZE_MANIFEST").get_value("duckdb/warehouse.duckdb") or "duckdb/warehouse.duckdb",
        )
    },
)
