"""``load-to-bronze``: the command-line front door (CONTRACT section 10)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, TextIO

from bronze_assets.errors import BadArgument, BronzeError
from bronze_assets.ingest import RunResult, Settings, print_progress, run
from bronze_assets.lake import writer_buffer_bytes
from bronze_assets.validation import REASONS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"load-to-bronze: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="load-to-bronze",
        description="Validate raw files and land them in the bronze layer (Parquet + Delta), idempotently.",
    )
    p.add_argument("--raw", default="data_raw", help="raw folder (default: data_raw)")
    p.add_argument("--lake", default="lake", help="lake folder (default: lake)")
    p.add_argument("--manifest", default="duckdb/warehouse.duckdb", help="DuckDB manifest (default: duckdb/warehouse.duckdb)")
    p.add_argument("--dry-run", action="store_true", help="validate and report; write nothing anywhere")
    p.add_argument("--tables", help="comma-separated tables to ingest (default: all)")
    p.add_argument("--validation-mode", choices=("quarantine", "strict"), help="override every table's mode")
    p.add_argument("--reprocess", nargs="+", default=[], metavar="SRC_PATH", help="ingest these sources again")
    p.add_argument("--min-file-age", type=float, default=0.0, metavar="SECONDS", help="skip files modified more recently")
    p.add_argument("--target-file-mb", type=int, default=128, help="target Parquet file size in MB (100-250)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if not 1 <= args.target_file_mb <= 1024:
        raise BadArgument("--target-file-mb must be between 1 and 1024", argument="--target-file-mb")
    if args.min_file_age < 0:
        raise BadArgument("--min-file-age must not be negative", argument="--min-file-age")
    try:
        writer_buffer_bytes()
    except ValueError as exc:
        raise BadArgument(str(exc), argument="BRONZE_WRITER_BUFFER_MB") from None
    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip()) if args.tables else None
    lake = str(args.lake)
    if "://" in lake and not lake.startswith("file://"):
        raise BadArgument(f"--lake: only local paths are supported so far: {lake}", argument="--lake")
    return Settings(
        raw=Path(args.raw),
        lake=Path(lake.removeprefix("file://")),
        manifest=Path(args.manifest),
        dry_run=args.dry_run,
        tables=tables,
        validation_mode=args.validation_mode,
        reprocess=tuple(p.strip("/") for p in args.reprocess),
        min_file_age=args.min_file_age,
        target_file_bytes=args.target_file_mb << 20,
    )


def format_summary(result: RunResult) -> str:
    """The per-table summary: files, rows written, rows rejected by reason."""
    per_table: dict[str, dict[str, int]] = defaultdict(Counter)
    reasons: dict[str, Counter[str]] = defaultdict(Counter)
    for o in result.outcomes:
        t = per_table[o.table]
        t["files_" + o.status] += 1
        t["rows"] += o.rows
        t["rejected"] += o.reject_count
        reasons[o.table].update(o.rejects)
    for table, n in result.unchanged.items():
        per_table[table]["unchanged"] += n
    verb = "would write" if result.dry_run else "written"
    lines = [f"{'DRY RUN: ' if result.dry_run else ''}bronze run {result.run_id[:12]}"]
    header = f"{'table':<10} {'ingested':>8} {'dup':>4} {'unchanged':>9} {'failed':>6} {'rows ' + verb:>19} {'rejected':>9}  by reason"
    lines.append(header)
    total_rows = total_rej = 0
    for table in sorted(per_table):
        t = per_table[table]
        ingested = t["files_success"] + t["files_rejected"]
        by = ", ".join(f"{r}={reasons[table][r]}" for r in REASONS if reasons[table][r])
        lines.append(
            f"{table:<10} {ingested:>8} {t['files_duplicate']:>4} {t['unchanged']:>9} {t['files_failed']:>6} "
            f"{t['rows']:>19,} {t['rejected']:>9,}  {by}"
        )
        total_rows += t["rows"]
        total_rej += t["rejected"]
    lines.append(f"{'total':<10} {'':>8} {'':>4} {'':>9} {'':>6} {total_rows:>19,} {total_rej:>9,}")
    lines.append("")
    lines.append(f"lake totals{' (after this dry run)' if result.dry_run else ''}: every source ingested so far")
    lines.append(f"{'table':<10} {'sources':>8} {'rows':>12} {'rejected':>9}  by reason")
    for table in sorted(result.totals):
        sources, rows, reasons_t = result.totals[table]
        by = ", ".join(f"{r}={reasons_t[r]}" for r in REASONS if reasons_t[r])
        lines.append(f"{table:<10} {sources:>8} {rows:>12,} {sum(reasons_t.values()):>9,}  {by}")
    lines.append("")
    for o in result.outcomes:
        if o.status == "failed" or (o.status == "rejected" and o.error):
            lines.append(f"{o.status}: {o.src_path}: {o.error}")
    for path in result.unmatched:
        lines.append(f"unmatched (no table): {path}")
    for path in result.too_new:
        lines.append(f"waiting (modified too recently): {path}")
    lines.append(f"exit code {result.exit_code}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        args = build_parser().parse_args(argv)
        settings = settings_from_args(args)
        result = run(settings, progress=None if args.quiet else print_progress)
    except SystemExit as exc:
        return int(exc.code or 0)
    except BronzeError as exc:
        print(f"load-to-bronze: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("load-to-bronze: interrupted", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"load-to-bronze: error: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    print(format_summary(result), file=out)
    return result.exit_code
