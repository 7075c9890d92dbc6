"""The bronze assets: one multi-asset per declared table, partitioned by source (dynamic
partitions, key = ``src_path``), with a Delta and a Parquet output and the table's checks.

Generated from ``schemas.schemas.TABLES``; adding a table there adds its assets here.
"""

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import dagster as dg

from bronze_assets import checks
from bronze_assets.ingest import Session
from bronze_assets.lake import Lake
from bronze_assets.resources import LakeResource, ManifestResource
from bronze_assets.staging import Batch, Outcome
from bronze_assets.validation import REASONS, REJECT_SCHEMA, output_schema
from schemas.schemas import Table


class IngestConfig(dg.Config):
    """Run options: ``reprocess`` ingests the run's sources again even if unchanged;
    ``validation_mode`` ('quarantine' or 'strict', empty = the table's own) overrides the table's."""

    reprocess: bool = False
    validation_mode: str = ""


def partitions_name(table: Table) -> str:
    return f"{table.name}__sources"


def partitions_for(table: Table) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=partitions_name(table))


def delta_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["bronze", table.name, "delta"])


def parquet_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["bronze", table.name, "parquet"])


def rejects_key(table: Table) -> dg.AssetKey:
    return dg.AssetKey(["bronze", table.name, "rejects"])


def column_schema(table: Table) -> dg.TableSchema:
    required = set(table.required)
    return dg.TableSchema(
        columns=[
            dg.TableColumn(f.name, str(f.type), constraints=dg.TableColumnConstraints(nullable=f.name not in required))
            for f in output_schema(table)
        ]
    )


def _metrics(batches: list[Batch], seconds: float) -> dict[str, Any]:
    outcomes = [o for b in batches for o in b.outcomes]
    reasons: Counter[str] = Counter()
    for o in outcomes:
        reasons.update(o.rejects)
    partitions = set().union(*(b.partitions for b in batches)) if batches else set()
    metrics: dict[str, Any] = {
        "dagster/row_count": sum(o.rows for o in outcomes),
        "rows_rejected": sum(o.reject_count for o in outcomes),
        "sources_ingested": sum(o.status in ("success", "rejected") for o in outcomes),
        "sources_duplicate": sum(o.status == "duplicate" for o in outcomes),
        "sources_failed": sum(o.status == "failed" for o in outcomes),
        "files_written": sum(o.files for o in outcomes) + sum(len(b.files) for b in batches),
        "bytes_written": sum(o.bytes for o in outcomes) + sum(f.size for b in batches for f in b.files),
        "partitions_touched": len(partitions),
        "duration_s": round(seconds, 3),
    }
    for reason in REASONS:
        metrics[f"rejected_{reason.lower()}"] = reasons[reason]
    return metrics


def build_table_asset(table: Table) -> dg.AssetsDefinition:
    """The multi-asset of one table."""
    partitions = partitions_for(table)
    dkey, pkey, rkey = delta_key(table), parquet_key(table), rejects_key(table)
    metadata = {"dagster/column_schema": column_schema(table), "dagster/table_name": table.name}
    specs = [
        dg.AssetSpec(dkey, kinds={"delta"}, metadata=metadata, group_name="bronze", description=table.description)
        .with_io_manager_key("delta_io"),
        dg.AssetSpec(pkey, kinds={"parquet"}, metadata=metadata, group_name="bronze", description=table.description)
        .with_io_manager_key("parquet_io"),
        dg.AssetSpec(
            rkey, kinds={"csv"}, group_name="bronze",
            description=f"The rejected records of {table.name}: one CSV per source under _rejects/{table.name}/, "
            "with the reason code, the column and value, and the record as read.",
            metadata={"dagster/column_schema": dg.TableSchema(columns=[dg.TableColumn(f.name, str(f.type)) for f in REJECT_SCHEMA])},
        ).with_io_manager_key("rejects_io"),
    ]
    check_specs = [
        dg.AssetCheckSpec("schema_conforms", asset=dkey, description="Both outputs carry the declared columns and types."),
        dg.AssetCheckSpec(
            "reject_rate", asset=dkey, description=f"Rejected records under {table.max_reject_fraction:.0%} of those read."
        ),
        dg.AssetCheckSpec("audit_columns_complete", asset=dkey, description="No null audit value in the rows written."),
        dg.AssetCheckSpec("parquet_matches_delta", asset=pkey, description="Parquet and Delta hold the same rows."),
    ]
    if table.key:
        check_specs.append(
            dg.AssetCheckSpec("one_row_per_key", asset=dkey, description=f"One row per {', '.join(table.key)}.")
        )

    @dg.multi_asset(
        name=f"bronze_{table.name}",
        specs=specs,
        check_specs=check_specs,
        partitions_def=partitions,
        backfill_policy=dg.BackfillPolicy.single_run(),
        pool="manifest",
    )
    def ingest(
        context: dg.AssetExecutionContext, config: IngestConfig, lake: LakeResource, manifest: ManifestResource
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckResult]:
        keys = tuple(sorted(context.partition_keys))
        mode = config.validation_mode or None
        if mode not in (None, "quarantine", "strict"):
            raise dg.Failure(description=f"validation_mode must be 'quarantine' or 'strict', not {mode!r}")
        settings = lake.settings(
            manifest=manifest.database,
            tables=(table.name,),
            only=keys,
            reprocess=keys if config.reprocess else (),
            validation_mode=mode,  # type: ignore[arg-type]
        )
        started = time.monotonic()
        with Session(
            settings, progress=context.log.info, manifest_connector=manifest.get_connection, run_id=context.run.run_id
        ) as session:
            missing = sorted(set(keys) - {s.src_path for s in session.sources})
            if missing:
                context.log.warning(f"not found under {lake.raw} (or still being written): {', '.join(missing[:20])}")
            batches = list(session.batches(session.sources))
            batches += session.batches(session.orphaned_duplicates())
            metrics = _metrics(batches, time.monotonic() - started)
            # Delta first: the Parquet IO manager mirrors the commits the Delta IO manager made.
            yield dg.MaterializeResult(asset_key=dkey, value=batches, metadata=metrics)
            yield dg.MaterializeResult(asset_key=pkey, value=batches, metadata=metrics)
            outcomes = [o for b in batches for o in session.finish(b)]
        lake_ = Lake(settings.lake)
        # The rejects are placed once their sources are recorded: their asset comes last.
        yield dg.MaterializeResult(
            asset_key=rkey,
            value=[o.src_path for o in outcomes],
            metadata={
                **{k: v for k, v in metrics.items() if k == "rows_rejected" or k.startswith("rejected_")},
                "reject_files": sum(lake_.rejects_file(table.name, o.src_path).exists() for o in outcomes),
                "dagster/uri": str(lake_.rejects_dir(table.name)),
            },
        )
        yield from _check_results(table, lake_, outcomes)
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            raise dg.Failure(
                description=f"{len(failed)} source(s) of {table.name} failed: {failed[0].src_path}: {failed[0].error}",
                metadata={o.src_path: o.error or "" for o in failed[:50]},
            )

    return ingest


def _check_results(table: Table, lake: Lake, outcomes: list[Outcome]) -> Iterator[dg.AssetCheckResult]:
    touched = [o.src_path for o in outcomes if o.status in ("success", "rejected")]
    dkey, pkey = delta_key(table), parquet_key(table)
    runs: list[tuple[str, dg.AssetKey, dg.AssetCheckSeverity, tuple[bool, dict[str, object]]]] = [
        ("schema_conforms", dkey, dg.AssetCheckSeverity.ERROR, checks.schema_conforms(lake, table)),
        ("reject_rate", dkey, dg.AssetCheckSeverity.WARN, checks.reject_rate(table, outcomes)),
        ("audit_columns_complete", dkey, dg.AssetCheckSeverity.ERROR, checks.audit_complete(lake, table, touched)),
        ("parquet_matches_delta", pkey, dg.AssetCheckSeverity.ERROR, checks.outputs_identical(lake, table, touched)),
    ]
    if table.key:
        runs.append(("one_row_per_key", dkey, dg.AssetCheckSeverity.ERROR, checks.one_row_per_key(lake, table)))
    for name, key, severity, (passed, evidence) in runs:
        yield dg.AssetCheckResult(
            check_name=name, asset_key=key, passed=passed, severity=severity, metadata=_as_metadata(evidence)
        )


def _as_metadata(evidence: dict[str, object]) -> dict[str, Any]:
    return {k: (v if isinstance(v, int | float | str) else dg.MetadataValue.json(v)) for k, v in evidence.items()}  # type: ignore[arg-type]
