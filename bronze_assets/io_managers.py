"""IO managers for the two bronze outputs. The asset hands them the batches of sources it staged;
the Delta IO manager commits them (one Delta transaction per batch), the Parquet IO manager
mirrors those commits into the hive-partitioned Parquet dataset. The asset yields Delta first,
then Parquet.

Both replace exactly the rows of the sources in hand, whatever the number of partition keys in
the run: nothing here overwrites a table (dagster-deltalake's IO manager did, on multi-partition
runs).
"""

from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads

from bronze_assets.lake import Lake
from bronze_assets.staging import Batch, publish_delta, publish_parquet
from bronze_assets.validation import REJECT_SCHEMA


def _batches(obj: Any) -> list[Batch]:
    if not isinstance(obj, list) or not all(isinstance(b, Batch) for b in obj):
        raise dg.DagsterInvariantViolationError("bronze IO managers take the list of staged batches")
    return obj


def _table_name(context: dg.InputContext | dg.OutputContext) -> str:
    return context.asset_key.path[1]


def _only_partitions(context: dg.InputContext, dataset: pads.Dataset) -> pa.Table:
    if context.has_asset_partitions:
        keys = list(context.asset_partition_keys)
        return dataset.to_table(filter=pads.field("src_filename").isin(keys))
    return dataset.to_table()


class DeltaIOManager(dg.ConfigurableIOManager):
    """Commits staged sources to ``<lake>/bronze/delta/<table>``."""

    lake: str = "lake"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        lake = Lake(Path(self.lake))
        versions = []
        for batch in _batches(obj):
            publish_delta(lake, batch)
            if batch.commit is not None:
                versions.append(batch.commit.version)
        dt_ = lake.delta_table(_table_name(context))
        context.add_output_metadata(
            {
                "delta_versions_committed": len(versions),
                "delta_version": dt_.version() if dt_ is not None else -1,
                "dagster/uri": str(lake.delta_dir(_table_name(context))),
            }
        )

    def load_input(self, context: dg.InputContext) -> pa.Table:
        dt_ = Lake(Path(self.lake)).delta_table(_table_name(context))
        if dt_ is None:
            raise dg.DagsterInvariantViolationError(f"no Delta table for {context.asset_key.to_user_string()}")
        return _only_partitions(context, dt_.to_pyarrow_dataset())


class ParquetIOManager(dg.ConfigurableIOManager):
    """Mirrors the Delta commits of staged sources into ``<lake>/bronze/parquet/<table>``."""

    lake: str = "lake"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        lake = Lake(Path(self.lake))
        for batch in _batches(obj):
            publish_parquet(lake, batch)
        context.add_output_metadata({"dagster/uri": str(lake.parquet_dir(_table_name(context)))})

    def load_input(self, context: dg.InputContext) -> pa.Table:
        path = Lake(Path(self.lake)).parquet_dir(_table_name(context))
        return _only_partitions(context, pads.dataset(str(path), format="parquet", partitioning="hive"))


class RejectsIOManager(dg.ConfigurableIOManager):
    """The rejects of a table, ``<lake>/_rejects/<table>/``: the asset places them itself when its
    sources are recorded (one CSV per source, replaced when the source is ingested again), so
    writing does nothing more; reading gives the reject rows of the partitions asked for (all
    sources without partitions) as one Arrow table."""

    lake: str = "lake"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        return None

    def load_input(self, context: dg.InputContext) -> pa.Table:
        lake = Lake(Path(self.lake))
        table = _table_name(context)
        if context.has_asset_partitions:
            files = [lake.rejects_file(table, key) for key in context.asset_partition_keys]
        else:
            folder = lake.rejects_dir(table)
            files = sorted(folder.glob("*.csv")) if folder.is_dir() else []
        convert = pacsv.ConvertOptions(column_types=REJECT_SCHEMA, strings_can_be_null=True)
        parts = [pacsv.read_csv(f, convert_options=convert) for f in files if f.exists()]
        return pa.concat_tables([p.select(REJECT_SCHEMA.names) for p in parts]) if parts else REJECT_SCHEMA.empty_table()
