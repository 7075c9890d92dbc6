"""Delta Lake tables as incremental sources (a folder with ``_delta_log/`` under ``data_raw/<table>/``).

Each run reads only the versions committed after the watermark kept in the manifest, one version
at a time, each as its own source ``<path>@v<version>`` going through the same validation and
publishing as a raw file. With the change data feed enabled on the source, a version contributes
its inserted rows and the post-images of its updates (upstream deletes and file rewrites such as
OPTIMIZE carry no new records). Without it, a version contributes the rows of the data files it
added with ``dataChange = true``; OPTIMIZE adds none, but a rewrite by DELETE or UPDATE re-adds the
rows it kept, which upserted tables absorb (the same record wins again) and appended tables receive
again, so sources that rewrite should enable the change data feed.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

from bronze_assets.discovery import RawSource
from bronze_assets.errors import SourceFailed
from bronze_assets.readers import Reading, normalize_native, normalize_schema
from schemas.schemas import Table

if TYPE_CHECKING:
    from bronze_assets.ingest import Session
    from bronze_assets.staging import Staged

CDF_COLUMNS = ("_change_type", "_commit_version", "_commit_timestamp")
BATCH_ROWS = 131_072


def _plain(batch: pa.RecordBatch) -> pa.RecordBatch:
    """delta-rs hands out string_view columns; the rest of the pipeline speaks plain strings."""
    return normalize_native(batch)


def _with_bookkeeping(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    row = 1
    for batch in batches:
        n = batch.num_rows
        if not n:
            continue
        arrays = {
            "_row": pa.array(np.arange(row, row + n, dtype=np.int64)),
            "_raw": pa.nulls(n, pa.string()),
            "_bad": pa.nulls(n, pa.string()),
        }
        row += n
        for name, col in zip(batch.schema.names, batch.columns, strict=True):
            arrays[name] = col
        yield pa.RecordBatch.from_pydict(arrays)


def _cdf_batches(dt_: DeltaTable, version: int) -> Iterator[pa.RecordBatch]:
    reader = pa.RecordBatchReader.from_stream(dt_.load_cdf(starting_version=version, ending_version=version))
    for batch in reader:
        batch = _plain(batch)
        keep = pc.is_in(batch.column("_change_type"), pa.array(["insert", "update_postimage"]))
        batch = batch.filter(keep)
        yield batch.select([n for n in batch.schema.names if n not in CDF_COLUMNS])


def _commit_adds(root: str, version: int) -> list[dict[str, object]]:
    path = f"{root}/_delta_log/{version:020d}.json"
    adds = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            action = json.loads(line)
            add = action.get("add")
            if add and add.get("dataChange", True):
                adds.append(add)
    return adds


def _added_file_batches(root: str, adds: list[dict[str, object]], schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for add in adds:
        path = f"{root}/{urllib.parse.unquote(str(add['path']))}"
        pf = pq.ParquetFile(path)
        partition_values = dict(add.get("partitionValues") or {})  # type: ignore[call-overload]
        for batch in pf.iter_batches(batch_size=BATCH_ROWS):
            for name, value in partition_values.items():
                if name not in batch.schema.names:
                    f = schema.field(name)
                    col = pa.array([value] * batch.num_rows, pa.string()).cast(f.type)
                    batch = batch.append_column(pa.field(name, f.type), col)
            yield _plain(batch)


def stage_delta_source(source: RawSource, table: Table, *, session: Session) -> Iterator[Staged]:
    """Stage the versions of a Delta source committed since its watermark (and any the run was
    asked to reprocess), oldest first. A version that fails stops the ones after it."""
    from bronze_assets.staging import Outcome, Staged, stage_source

    settings = session.settings
    root = str(source.path)
    try:
        dt_ = DeltaTable(root)
        current = dt_.version()
        cdf = dt_.metadata().configuration.get("delta.enableChangeDataFeed", "false").lower() == "true"
        arrow_schema = normalize_schema(pa.schema(dt_.schema().to_arrow()))  # type: ignore[arg-type]
    except Exception as exc:
        outcome = Outcome(source.src_path, source.table, "failed", error=f"cannot open the Delta source: {exc}")
        staged = Staged(source, table, outcome, session.run_id)
        staged.replace = False
        yield staged
        return
    last = session.manifest.watermarks().get(source.src_path, -1)
    versions = set(range(last + 1, current + 1))
    if source.src_path in settings.reprocess:
        versions |= set(range(current + 1))
    prefix = source.src_path + "@v"
    versions |= {int(p[len(prefix) :]) for p in settings.reprocess if p.startswith(prefix) and p[len(prefix) :].isdigit()}
    for version in sorted(v for v in versions if v <= current):
        version_source = replace(source, src_path=f"{source.src_path}@v{version}", size=0)
        try:
            adds = _commit_adds(root, version)
        except (OSError, ValueError) as exc:
            outcome = Outcome(version_source.src_path, source.table, "failed", error=f"cannot read the log: {exc}")
            staged = Staged(version_source, table, outcome, session.run_id)
            staged.replace = False
            yield staged
            return
        version_source = replace(version_source, size=sum(int(a.get("size", 0)) for a in adds))  # type: ignore[call-overload]

        def opener(vs: RawSource, version: int = version, adds: list[dict[str, object]] = adds) -> Reading:
            batches = _cdf_batches(dt_, version) if cdf else _added_file_batches(root, adds, arrow_schema)
            return Reading(list(arrow_schema.names), _guard(vs, _with_bookkeeping(batches)), "row", arrow_schema)

        staged = stage_source(
            version_source,
            table,
            lake=session.lake,
            settings=settings,
            run_id=session.run_id,
            progress=session.say,
            opener=opener,
        )
        if version > last:
            staged.watermark = version
        yield staged
        if staged.outcome.status == "failed":
            return  # a failed version blocks the ones after it


def _guard(source: RawSource, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    # A committed version does not change, but its files can be missing for a while (storage
    # being copied, a vacuum gone too far): the version fails and is read again by the next run,
    # holding back those after it, rather than being recorded as unreadable and skipped for good.
    try:
        yield from batches
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SourceFailed(source.src_path, f"cannot read the version: {detail}") from exc
