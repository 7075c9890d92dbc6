"""Validation: convert a source's batches to the declared types and split valid rows from rejects.

The work is one SQL statement per source, generated from the table declaration and run by DuckDB
over each Arrow batch (vectorised and multi-threaded; no per-row Python). It yields, per record,
the typed columns, the derived and audit columns, and the first reason (section 5 order) that
rejects it. DuckDB's TRY_CAST rounds where the contract wants a reject (``3.5`` to an integer,
``12.345`` to decimal(10,2)), so every conversion here is checked to be lossless.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bronze_assets.readers import RawKind
from schemas.schemas import Column, OneOf, Range, Table

REASONS = (
    "UNREADABLE_FILE",
    "SCHEMA_MISMATCH",
    "MALFORMED_RECORD",
    "MISSING_REQUIRED",
    "TYPE_MISMATCH",
    "CONSTRAINT_VIOLATION",
)
BOOKKEEPING = ("_row", "_raw", "_bad", "_src", "_its")
REJECT_SCHEMA = pa.schema(
    [
        ("src_filename", pa.string()),
        ("src_row_number", pa.int64()),
        ("reason_code", pa.string()),
        ("reason_detail", pa.string()),
        ("raw_record", pa.string()),
        ("ingestion_ts", pa.timestamp("us", tz="UTC")),
    ]
)
TRUE_WORDS = ("true", "t", "yes", "y", "1")
FALSE_WORDS = ("false", "f", "no", "n", "0")
DETAIL_VALUE_CHARS = 200
SCAN_ROWS = 32_768
# The shape of an ISO-8601 timestamp (RFC 3339's space for the `T` allowed): a date, then
# optionally a time to the minute, the second or a fraction of it, then optionally an offset (`Z`,
# `+hh`, `+hhmm`, `+hh:mm`). DuckDB's cast alone also takes `2024/01/02 10:00`, `infinity`,
# `epoch`, unpadded fields, a three-digit year and zone names, none of them ISO-8601 (a date
# column rejects the same spellings). The cast then decides whether the fields are in range.
ISO_DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
ISO_TIMESTAMP = rf"\s*{ISO_DATE}([T ][0-9]{{2}}:[0-9]{{2}}(:[0-9]{{2}}(\.[0-9]+)?)?(Z|[+-][0-9]{{2}}(:?[0-9]{{2}})?)?)?\s*"
# A JSON source's lines, with _j: the line where it is valid JSON, null elsewhere. Only _j
# reaches DuckDB's JSON functions, in the projections above this one, so that one bad line
# cannot fail its batch.
JSON_SOURCE = "(SELECT *, CASE WHEN json_valid(_raw) THEN _raw END AS _j FROM src)"
WIDE_RESCUE = 64  # more undeclared columns than this are rescued by an unpivot


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def type_name(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_date32(t):
        return "date"
    return str(t)


def sql_type(t: pa.DataType) -> str:
    if pa.types.is_int64(t):
        return "BIGINT"
    if pa.types.is_int32(t):
        return "INTEGER"
    if pa.types.is_float64(t):
        return "DOUBLE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    if pa.types.is_date32(t):
        return "DATE"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_decimal(t):
        return f"DECIMAL({t.precision},{t.scale})"
    if pa.types.is_string(t):
        return "VARCHAR"
    raise ValueError(f"unsupported declared type {t}")


def _from_text(s: str, t: pa.DataType) -> str:
    """SQL converting text ``s`` to ``t``; NULL when it does not convert without loss.

    DuckDB's casts skip surrounding whitespace themselves, and the shape checks allow it, so no
    trim() is needed (trim with a character set is one of DuckDB's slower string functions).
    """
    if pa.types.is_integer(t):
        return _canonical_first(
            s,
            sql_type(t),
            f"CASE WHEN regexp_full_match({s}, '\\s*[+-]?[0-9]+(\\.0*)?\\s*') "
            f"THEN TRY_CAST(regexp_extract({s}, '[+-]?[0-9]+') AS {sql_type(t)}) END",
        )
    if pa.types.is_decimal(t):
        # Digits past the scale must be zeros, which the shape says (the cast then refuses too many
        # integer digits). Comparing with a cast to a wider scale did not: DECIMAL(38,18) rounds
        # too, so `12.3400000000000000001` passed as 12.34.
        if t.scale:
            number = f"([0-9]+(\\.[0-9]{{0,{t.scale}}}0*)?|\\.[0-9]{{1,{t.scale}}}0*)"
        else:
            number = "([0-9]+(\\.0*)?|\\.0+)"
        return _canonical_first(
            s,
            sql_type(t),
            f"CASE WHEN regexp_full_match({s}, '\\s*[+-]?{number}\\s*') THEN TRY_CAST({s} AS {sql_type(t)}) END",
        )
    if pa.types.is_floating(t):
        # A decimal number, with an exponent or not: DuckDB's cast also takes `1_000.5`, `nan` and
        # `inf`, and turns a number too large for a double (`1e400`) into infinity.
        return (
            f"CASE WHEN regexp_full_match({s}, '\\s*[+-]?([0-9]+\\.?[0-9]*|\\.[0-9]+)([eE][+-]?[0-9]+)?\\s*') "
            f"AND isfinite(TRY_CAST({s} AS DOUBLE)) THEN TRY_CAST({s} AS DOUBLE) END"
        )
    if pa.types.is_boolean(t):
        trues = "|".join(TRUE_WORDS)
        falses = "|".join(FALSE_WORDS)
        return (
            f"CASE WHEN regexp_full_match({s}, '(?i)\\s*({trues})\\s*') THEN true "
            f"WHEN regexp_full_match({s}, '(?i)\\s*({falses})\\s*') THEN false END"
        )
    if pa.types.is_date32(t):
        checked = f"CASE WHEN regexp_full_match({s}, '\\s*{ISO_DATE}\\s*') THEN TRY_CAST({s} AS DATE) END"
        # Ten characters that print back the same are YYYY-MM-DD (longer ones can be BC dates or
        # five-digit years, which the checked path rejects).
        return f"CASE WHEN length({s}) = 10 AND TRY_CAST({s} AS DATE)::VARCHAR = {s} THEN TRY_CAST({s} AS DATE) ELSE {checked} END"
    if pa.types.is_timestamp(t):
        return f"CASE WHEN regexp_full_match({s}, '{ISO_TIMESTAMP}') THEN TRY_CAST({s} AS TIMESTAMPTZ) END"
    raise ValueError(f"unsupported declared type {t}")


def _canonical_first(s: str, target: str, checked: str) -> str:
    """``checked`` (the conversion that proves itself lossless), preceded by a fast path for text
    that is already the value's canonical spelling (``123``, ``-4.50`` for decimal(10,2)): such
    text converts without loss by definition, and checking it by printing the value back costs a
    fraction of the regular expressions. Anything else takes the checked path."""
    return f"CASE WHEN TRY_CAST({s} AS {target})::VARCHAR = {s} THEN TRY_CAST({s} AS {target}) ELSE {checked} END"


def _from_native(x: str, src: pa.DataType, t: pa.DataType) -> str:
    """SQL converting a typed value to ``t``: a cast that must survive the round trip back."""
    target = sql_type(t)
    if pa.types.is_timestamp(t):
        return f"TRY_CAST({x} AS TIMESTAMPTZ)"
    if pa.types.is_boolean(t) and (pa.types.is_integer(src) or pa.types.is_floating(src)):
        return f"CASE WHEN {x} = 1 THEN true WHEN {x} = 0 THEN false END"
    back = f"TRY_CAST(TRY_CAST({x} AS {target}) AS {_duck_type_of(src)})"
    return f"CASE WHEN {back} = {x} THEN TRY_CAST({x} AS {target}) END"


def _duck_type_of(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "HUGEINT"
    if pa.types.is_floating(t):
        return "DOUBLE"
    if pa.types.is_decimal(t):
        return f"DECIMAL({min(t.precision, 38)},{t.scale})"
    if pa.types.is_timestamp(t):
        return "TIMESTAMP" if t.tz is None else "TIMESTAMPTZ"
    if pa.types.is_date(t):
        return "DATE"
    if pa.types.is_boolean(t):
        return "BOOLEAN"
    return "VARCHAR"


def _is_text(t: pa.DataType | None) -> bool:
    return t is None or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_nested(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) or pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t)


def _value_text(i: str, t: pa.DataType | None) -> str:
    """SQL for the offending value as it appears in reason_detail: quoted, and cut when long."""
    text = i if _is_text(t) else f"CAST({i} AS VARCHAR)"
    return f"(chr(39) || left({text}, {DETAIL_VALUE_CHARS}) || chr(39))"


def _constraint_sql(c: Range | OneOf, v: str) -> tuple[str, str]:
    """(SQL that is true when the constraint holds, its wording for reason_detail)."""
    if isinstance(c, OneOf):
        return f"({v} IS NULL OR {v} IN ({', '.join(lit(x) for x in c.values)}))", f"{c.column} in {{{', '.join(c.values)}}}"
    parts, words = [], []
    if c.low is not None:
        op = ">=" if c.low_inclusive else ">"
        parts.append(f"{v} {op} {c.low!r}")
        words.append(f"{c.column} {op} {c.low:g}")
    if c.high is not None:
        op = "<=" if c.high_inclusive else "<"
        parts.append(f"{v} {op} {c.high!r}")
        words.append(f"{c.column} {op} {c.high:g}")
    return f"({v} IS NULL OR ({' AND '.join(parts) or 'true'}))", " and ".join(words)


def _json_value(x: str, t: pa.DataType | None) -> str:
    """SQL for ``x`` as a value of a JSON object (``_rescued_data``, raw_record). A float's NaN or
    infinity (Parquet and Delta hold them) becomes the string ``"NaN"``, ``"Infinity"`` or
    ``"-Infinity"``: DuckDB's to_json() writes them bare, which is not JSON (a standard parser,
    Spark's or DuckDB's own ``json_valid`` aside, refuses the object). Other values are as they are."""
    if t is None or not pa.types.is_floating(t):
        return x
    special = f"(CASE WHEN isnan({x}) THEN '\"NaN\"' WHEN {x} > 0 THEN '\"Infinity\"' ELSE '\"-Infinity\"' END)::JSON"
    return f"CASE WHEN NOT isfinite({x}) THEN {special} ELSE to_json({x}) END"


@dataclass
class BatchResult:
    valid: pa.Table
    rejects: pa.Table
    reasons: Counter[str] = field(default_factory=Counter)
    keys_present: set[str] = field(default_factory=set)


class Validator:
    """The validating statement of one source, built once and run on each of its batches."""

    def __init__(
        self,
        table: Table,
        *,
        source_schema: pa.Schema,
        raw_kind: RawKind,
        output_schema: pa.Schema,
        threads: int = 2,
    ) -> None:
        self.table = table
        self.raw_kind = raw_kind
        self.output_schema = output_schema
        names = [n for n in source_schema.names if n not in BOOKKEEPING]
        declared = set(table.column_names)
        self.extras = [n for n in names if n not in declared]
        self._json_rescue = ""
        self._wide = False
        self._digest_names: list[str] = []
        self.sql = self._build(source_schema, names)
        self._input_schema = _with_source_schema(pa.schema([f for f in source_schema if f.name not in ("_src", "_its")]))
        self._empty: pa.Table | None = None
        self._con = duckdb.connect(config={"threads": threads})
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None  # gathers columns side by side (see _in_write_order)
        self._con.execute("SET TimeZone = 'UTC'")
        if self._wide:
            self._con.register("_extra_order", pa.table({"name": self.extras, "_pos": list(range(len(self.extras)))}))

    def close(self) -> None:
        self._con.close()
        if self._pool is not None:
            self._pool.shutdown()

    # The statement is built in layers so that each expression is written once:
    # l0 reads the raw record, l1 picks each declared column's input, l2 converts it,
    # l3 decides the first reason that applies, and the outer SELECT shapes the output.
    def _build(self, schema: pa.Schema, names: list[str]) -> str:
        table = self.table
        json_mode = self.raw_kind == "json"
        present = {n: schema.field(n).type for n in names}
        l0 = ["_row", "_bad", "_src", "_its"]
        hashed = "_t"
        if self.raw_kind == "row":
            # The row's values: rendered as JSON text only for rejects (raw_record), hashed from a
            # binary layout of them when its types allow (see row_digest_input).
            fields = ", ".join(f"{lit(n)}: {ident(n)}" for n in names)
            l0.append(f"{{{fields}}} AS _t")
            if names and all(_digestible(present[n]) for n in names):
                self._digest_names = names
                l0.append("_h")
                hashed = "_h"
            else:
                hashed = "to_json(_t)::VARCHAR"
        else:
            l0.append("_raw AS _t")
        if json_mode:
            l0 += [
                "_j",
                # _j is valid JSON: text that starts with "{" is an object, and text that starts with
                # another printable character is not; only the rest (leading whitespace) is parsed.
                # The first byte is tested by comparing strings (see _missing), not with ascii().
                "coalesce(CASE WHEN _j >= '{' AND _j < '|' THEN true WHEN _j >= '!' THEN false "
                "ELSE json_type(_j) = 'OBJECT' END, false) AS _ok",
            ]
            # _j is valid JSON or null, so extraction needs no guard: what is not an object gives
            # nulls (and is rejected by _ok first). The declared keys are read into a struct of
            # text in one pass (json_transform takes a nested value as its JSON text, as
            # json_extract_string does, and matches keys exactly); a struct's fields are read in
            # place where a list's elements are copied (7% of the events statement).
            spec = json.dumps({c.name: "VARCHAR" for c in table.columns}, separators=(",", ":"))
            l0_vals = f"json_transform(_j, {lit(spec)}) AS _vals"
        else:
            l0 += [ident(n) for n in names]
            l0_vals = ""

        l1 = ["_row", "_bad", "_src", "_its", "_t", *(["_h"] if self._digest_names else []), *(["_j"] if json_mode else [])]
        if json_mode:
            l1 += ["_ok"]
        # The record as raw_record shows it (compact JSON for JSON): computed in the outer SELECT,
        # where it is needed only for rejects.
        raw_out = "coalesce(json(_j)::VARCHAR, _t)" if json_mode else self._row_json(present, names) if self.raw_kind == "row" else "_t"
        input_types: dict[str, pa.DataType | None] = {}
        for col in table.columns:
            if json_mode:
                value = f"_vals.{ident(col.name)}"
                l1.append(f"{value} AS {ident('i__' + col.name)}")
                # A key whose value was extracted exists; only the others are looked up.
                exists = f"json_exists(_j, {lit('$.' + chr(34) + col.name + chr(34))})"
                l1.append(f"CASE WHEN {value} IS NOT NULL THEN true WHEN _ok THEN {exists} END AS {ident('h__' + col.name)}")
                input_types[col.name] = None
            elif col.name in present:
                l1.append(f"{ident(col.name)} AS {ident('i__' + col.name)}")
                input_types[col.name] = present[col.name]
            else:
                l1.append(f"NULL::VARCHAR AS {ident('i__' + col.name)}")
                input_types[col.name] = None
        l1.append(f"{self._rescued_sql(present, json_mode)} AS _rescued")
        if table.new_columns == "add":
            for n in self.extras:
                x = ident(n)
                l1.append(f"to_json({x})::VARCHAR AS {x}" if _is_nested(present[n]) else x)

        l2 = ["*"]
        for col in table.columns:
            i = ident("i__" + col.name)
            src = input_types[col.name]
            l2.append(f"{self._convert(i, src, col)} AS {ident('v__' + col.name)}")
            l2.append(f"{self._missing(i, src)} AS {ident('m__' + col.name)}")

        # Each (reason, column) pair gets a number; the first true one wins.
        whens: list[str] = ["WHEN _bad IS NOT NULL THEN 0"]
        reasons = ["MALFORMED_RECORD"]
        details = ["_bad"]
        if json_mode:
            whens.append("WHEN NOT _ok THEN 1")
            reasons.append("MALFORMED_RECORD")
            details.append("CASE WHEN _j IS NULL THEN 'invalid JSON' ELSE 'a JSON ' || lower(json_type(_j)) || ', not an object' END")
        for col in table.columns:
            if col.required:
                whens.append(f"WHEN {ident('m__' + col.name)} THEN {len(reasons)}")
                reasons.append("MISSING_REQUIRED")
                details.append(lit(f"{col.name} is missing"))
        for col in table.columns:
            i, v, m = ident("i__" + col.name), ident("v__" + col.name), ident("m__" + col.name)
            whens.append(f"WHEN NOT {m} AND {v} IS NULL THEN {len(reasons)}")
            reasons.append("TYPE_MISMATCH")
            details.append(
                f"{lit(col.name + '=')} || {_value_text(i, input_types[col.name])} || {lit(' is not a valid ' + type_name(col.type))}"
            )
        for con in table.constraints:
            cv = ident("v__" + con.column)
            holds, words = _constraint_sql(con, cv)
            whens.append(f"WHEN NOT {holds} THEN {len(reasons)}")
            reasons.append("CONSTRAINT_VIOLATION")
            src_t = input_types[con.column]
            details.append(
                f"{lit(con.column + '=')} || {_value_text(ident('i__' + con.column), src_t)} || {lit(' violates ' + words)}"
            )
        self.reason_by_code = reasons
        l3 = ["*", f"CASE {' '.join(whens)} END AS _why"]
        detail_case = " ".join(f"WHEN {k} THEN {d}" for k, d in enumerate(details))

        out = self._output_sql(hashed)
        # The raw text goes back out only for rejects: the rows keep just its hash.
        raw_for_rejects = f"CASE WHEN _why IS NOT NULL THEN {raw_out} END AS _raw_out"
        outer = [
            "_why",
            f"CASE _why {detail_case} END AS _detail",
            raw_for_rejects,
            *out,
        ]
        if json_mode:
            outer += [ident("h__" + c.name) for c in table.columns if c.required]
        self._outer_all_raw = ", ".join(f"{raw_out} AS _raw_out" if o == raw_for_rejects else o for o in outer)
        sql = f"SELECT {', '.join(l0)} FROM {JSON_SOURCE if json_mode else 'src'}"
        if self._wide:
            # json_object() over thousands of columns, or an expression per column, costs DuckDB
            # time quadratic in their number: many undeclared text columns are unpivoted to
            # (record, name, value) rows instead, filtered, and grouped back into one object.
            cols = ", ".join(ident(n) for n in self.extras)
            rescued = (
                "SELECT _src AS _w_src, _row AS _w_row, "
                "to_json(map(list(name ORDER BY _pos), list(to_json(value) ORDER BY _pos)))::VARCHAR AS _wide_rescued "
                f"FROM (UNPIVOT (SELECT _src, _row, {cols} FROM src) ON {cols} INTO NAME name VALUE value) "
                "JOIN _extra_order USING (name) WHERE NOT regexp_full_match(value, '\\s*') GROUP BY _src, _row"
            )
            wide = {ident(n) for n in self.extras}
            l0 = [c for c in l0 if c not in wide] + ["_wide_rescued"]
            sql = (
                f"SELECT {', '.join(l0)} FROM src LEFT JOIN ({rescued}) w "
                "ON src._src::VARCHAR = w._w_src::VARCHAR AND src._row = w._w_row"
            )
        if l0_vals:
            rk = f", {self._json_rescue}" if self._json_rescue else ""
            sql = f"SELECT *, {l0_vals}{rk} FROM ({sql})"
        sql = f"SELECT {', '.join(l1)} FROM ({sql})"
        sql = f"SELECT {', '.join(l2)} FROM ({sql})"
        sql = f"SELECT {', '.join(l3)} FROM ({sql})"
        self.sql_all_raw = f"SELECT {self._outer_all_raw} FROM ({sql})"
        # The writer wants valid rows before rejects, then, for valid rows, each partition's rows
        # together, in record order (it does not sort), and rejects in record order. Partitions
        # need to come together, not in order: a key of several columns or of text is grouped by
        # one 64-bit hash of it; should two hashes collide, the writer sorts that batch itself.
        part_key = [ident(c) for c in table.partition_by]
        self._hashed_key = len(part_key) > 1 or any(not _fixed_width(self.output_schema.field(c).type) for c in table.partition_by)
        if self._hashed_key:
            part_key = [f"hash({', '.join(part_key)})"]
        # Several sources validated together are ordered so by DuckDB, by source first: each
        # source's valid rows and rejects are then contiguous slices of the result.
        order = ["_why IS NOT NULL", *(f"CASE WHEN _why IS NULL THEN {k} END" for k in part_key), "src_row_number"]
        self.sql_many = f"SELECT {', '.join(outer)} FROM ({sql}) ORDER BY src_filename, {', '.join(order)}"
        # One source's batch comes out in record order (DuckDB keeps the order of its input) and
        # is put in that order afterwards (see _in_write_order): the sort in the statement cost
        # a fifth of it (sensors), and more than the stable counting sort of a partition code
        # and one gather of the rows. The hashed key is computed last, from the output columns.
        pk = f", {part_key[0]} AS _pk" if self._hashed_key else ""
        return f"SELECT {', '.join(outer)}{pk} FROM ({sql})"

    def _convert(self, i: str, src: pa.DataType | None, col: Column) -> str:
        t = col.type
        if pa.types.is_string(t):
            if src is not None and _is_nested(src):
                return f"to_json({i})::VARCHAR"
            return i if _is_text(src) else f"CAST({i} AS VARCHAR)"
        if _is_text(src):
            return _from_text(i, t)
        assert src is not None
        if _is_nested(src) or pa.types.is_binary(src):
            return "NULL"
        return _from_native(i, src, t)

    @staticmethod
    def _missing(i: str, src: pa.DataType | None) -> str:
        if _is_text(src):
            # A value whose first byte is above the space (not ASCII whitespace or a control
            # character) is not blank: the regular expression runs only on the few that might be.
            # Text compares by its bytes, so ``>= '!'`` tests the first byte alone; DuckDB's
            # ascii() would scan the whole value for non-ASCII characters first (3% of the
            # orders statement).
            return f"(CASE WHEN {i} IS NULL THEN true WHEN {i} >= '!' THEN false ELSE regexp_full_match({i}, '\\s*') END)"
        return f"({i} IS NULL)"

    def _rescued_sql(self, present: dict[str, pa.DataType], json_mode: bool) -> str:
        if self.table.new_columns != "rescue":
            return "NULL::VARCHAR"
        if json_mode:
            declared = ", ".join(lit(c) for c in self.table.column_names)
            kept = (
                "list_filter(map_entries(json_transform(_j, '\"MAP(VARCHAR, JSON)\"')), "
                f"lambda e: e.key NOT IN ({declared}) AND e.value::VARCHAR NOT IN ('null', '\"\"'))"
            )
            # Most records carry only declared keys: listing the keys is much cheaper than
            # building the map of values, which is done only for records that have another key.
            others = f"len(list_filter(json_keys(_j), lambda k: k NOT IN ({declared}))) > 0"
            self._json_rescue = f"CASE WHEN _ok AND {others} THEN {kept} END AS _rk"
            return "CASE WHEN len(_rk) > 0 THEN to_json(map_from_entries(_rk))::VARCHAR END"
        if not self.extras:
            return "NULL::VARCHAR"
        if len(self.extras) > WIDE_RESCUE and all(_is_text(present[n]) for n in self.extras):
            self._wide = True
            return "_wide_rescued"
        pairs = []
        for n in self.extras:
            x = ident(n)
            if _is_text(present[n]):
                x = f"CASE WHEN NOT regexp_full_match({x}, '\\s*') THEN {x} END"
            pairs.append(f"{lit(n)}, {_json_value(x, present[n])}")
        return f"NULLIF(json_merge_patch('{{}}', json_object({', '.join(pairs)}))::VARCHAR, '{{}}')"

    @staticmethod
    def _row_json(present: dict[str, pa.DataType], names: Sequence[str]) -> str:
        """A row's values (``_t``) as the JSON text of raw_record, its float fields made JSON."""
        floats = [n for n in names if pa.types.is_floating(present[n])]
        if not floats:
            return "to_json(_t)::VARCHAR"
        fields = ", ".join(f"{ident(n)} := {_json_value('_t.' + ident(n), present[n])}" for n in floats)
        return f"to_json(struct_update(_t, {fields}))::VARCHAR"

    def _output_sql(self, hashed: str) -> list[str]:
        table = self.table
        cols = [f"{ident('v__' + c.name)} AS {ident(c.name)}" for c in table.columns]
        if table.new_columns == "add":
            cols += [ident(n) for n in self.extras]
        for d in table.derived:
            src = ident("v__" + d.source)
            expr = f"CAST({src} AS DATE)" if d.kind == "utc_date" else f"strftime({src}, '%Y-%m')"
            cols.append(f"{expr} AS {ident(d.name)}")
        if table.new_columns == "rescue":
            cols.append("_rescued AS _rescued_data")
        cols += [
            "_its AS ingestion_ts",
            "_src::VARCHAR AS src_filename",
            "_row AS src_row_number",
            f"md5({hashed}) AS src_row_hash",
        ]
        if table.op_column:
            op, ts = ident("v__" + table.op_column), ident("v__" + (table.order_by or ""))
            cols += [
                f"coalesce({op} = 'D', false) AS is_deleted",
                f"CASE WHEN {op} = 'D' THEN {ts} END AS deleted_at",
            ]
        return cols

    def run(
        self,
        batch: pa.RecordBatch,
        *,
        src_filename: str,
        ingestion_ts: dt.datetime,
        force: tuple[str, str] | None = None,
    ) -> BatchResult:
        """Validate one batch: typed valid rows (``output_schema``) and reject rows (``REJECT_SCHEMA``).

        ``force`` = (reason, detail) rejects every record with that reason (a file-level outcome).
        """
        data = pa.Table.from_batches([with_source(batch, src_filename, ingestion_ts)])
        return self._split(self._execute(data, all_raw=force is not None), force)

    def run_many(self, parts: Sequence[tuple[Sequence[pa.RecordBatch], str, dt.datetime]]) -> list[BatchResult]:
        """Validate the batches of several sources (``(batches, src_filename, ingestion_ts)``, each
        source once) in one statement: a statement costs milliseconds to plan whatever its input,
        which would be most of the work for small sources one by one. One result per part."""
        tables = [
            pa.Table.from_batches([with_source(b, src, its) for b in batches], schema=_with_source_schema(batches[0].schema))
            for batches, src, its in parts
            if batches
        ]
        results: dict[str, BatchResult] = {}
        if tables:
            result = self._execute(pa.concat_tables(tables), many=True)
            if result.num_rows:  # ordered by src_filename: each source's rows are one slice
                src = result.column("src_filename").combine_chunks()
                n = result.num_rows
                change = np.zeros(n, dtype=bool)
                change[0] = True
                if n > 1:
                    change[1:] = pc.not_equal(src.slice(1), src.slice(0, n - 1)).to_numpy(zero_copy_only=False)
                bounds = np.append(np.flatnonzero(change), n)
                for start, stop in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                    part = result.slice(start, stop - start)
                    results[part.column("src_filename")[0].as_py()] = self._split(part, None)
        if all(src in results for _, src, _ in parts):
            return [results[src] for _, src, _ in parts]
        empty = self._split(self._empty_result(), None)
        return [results.get(src, empty) for _, src, _ in parts]

    def _execute(self, data: pa.Table, *, all_raw: bool = False, many: bool = False) -> pa.Table:
        con = self._con
        if self._digest_names:
            digests = [row_digest_input(b, self._digest_names) for b in data.to_batches()]
            data = data.append_column("_h", pa.chunked_array(digests, pa.binary()))
        # Several smaller batches let DuckDB spread the statement over its threads.
        con.register("src", pa.Table.from_batches(data.to_batches(max_chunksize=SCAN_ROWS), schema=data.schema))
        try:
            if all_raw or many:
                return con.sql(self.sql_all_raw if all_raw else self.sql_many).to_arrow_table()
            result = con.sql(self.sql).to_arrow_table()
        finally:
            con.unregister("src")
        return self._in_write_order(result)

    def _in_write_order(self, result: pa.Table) -> pa.Table:
        """``result`` (one source's batch, in record order) with its valid rows first, each
        partition's together, then its rejects, each in record order: a stable sort on a small
        code per row (the partition's number in order of first appearance; the rejects after
        the last), which numpy does as a radix sort, then one gather of the rows. Nothing moves
        when the rows are in that order already (an unpartitioned table without rejects)."""
        n = result.num_rows
        key: pa.ChunkedArray | None = None
        if self._hashed_key:
            key = result.column("_pk")
            result = result.drop_columns(["_pk"])
        elif self.table.partition_by:
            key = result.column(self.table.partition_by[0])
        if n == 0:
            return result
        if key is None:
            codes, k = np.zeros(n, dtype=np.int32), 1
        else:
            encoded = pc.dictionary_encode(key.combine_chunks(), null_encoding="encode")
            codes, k = encoded.indices.to_numpy(zero_copy_only=False), len(encoded.dictionary)
        why = result.column("_why")
        if why.null_count < n:
            codes = np.where(why.is_valid().to_numpy(zero_copy_only=False), k, codes)
        if n < 2 or bool(np.all(codes[1:] >= codes[:-1])):
            return result
        order = pa.array(np.argsort(codes.astype(np.int16 if k < 2**15 - 1 else np.int32), kind="stable"))

        def gather(name: str) -> pa.ChunkedArray | pa.Array:
            column = result.column(name)
            return column if name in _ONE_VALUE else _gathered(column, order)

        if self._threads < 2:
            columns = [gather(name) for name in result.column_names]
        else:
            # A statement of several threads leaves them idle while its rows are gathered: the
            # columns are gathered on as many threads instead (pyarrow releases the GIL).
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="bronze-gather")
            columns = list(self._pool.map(gather, result.column_names))
        return pa.Table.from_arrays(columns, schema=result.schema)

    def _empty_result(self) -> pa.Table:
        if self._empty is None:
            self._empty = self._execute(self._input_schema.empty_table()).slice(0, 0)
        return self._empty

    def _split(self, result: pa.Table, force: tuple[str, str] | None) -> BatchResult:
        why = result.column("_why")
        keys: set[str] = set()
        if self.raw_kind == "json":
            for c in self.table.columns:
                if c.required and pc.any(result.column("h__" + c.name)).as_py():
                    keys.add(c.name)
        if force is not None:
            n = result.num_rows
            rejects = pa.table(
                [
                    result.column("src_filename"),
                    result.column("src_row_number"),
                    pa.array([force[0]] * n, pa.string()),
                    pa.array([force[1]] * n, pa.string()),
                    result.column("_raw_out"),
                    result.column("ingestion_ts"),
                ],
                schema=REJECT_SCHEMA,
            )
            return BatchResult(self.output_schema.empty_table(), rejects, Counter({force[0]: n}), keys)
        n_valid = why.null_count
        if why.slice(0, n_valid).null_count == n_valid:
            valid, bad = result.slice(0, n_valid), result.slice(n_valid)  # valid rows come first
        else:
            is_valid = pc.is_null(why)
            valid, bad = result.filter(is_valid), result.filter(pc.invert(is_valid))
        valid = valid.select(self.output_schema.names).cast(self.output_schema)
        reasons: Counter[str] = Counter()
        if bad.num_rows:
            codes = pa.array(self.reason_by_code, pa.string())
            reason_col = pc.take(codes, bad.column("_why"))
            for item in pc.value_counts(reason_col).to_pylist():
                reasons[item["values"]] += item["counts"]
            rejects = pa.table(
                [
                    bad.column("src_filename"),
                    bad.column("src_row_number"),
                    reason_col,
                    bad.column("_detail"),
                    bad.column("_raw_out"),
                    bad.column("ingestion_ts"),
                ],
                schema=REJECT_SCHEMA,
            )
        else:
            rejects = REJECT_SCHEMA.empty_table()
        return BatchResult(valid, rejects, reasons, keys)


_ITS = pa.timestamp("us", tz="UTC")
# The columns that hold one value over a source's batch: any order of their rows is the same column.
_ONE_VALUE = frozenset(("src_filename", "ingestion_ts"))


def _gathered(column: pa.ChunkedArray, order: pa.Array) -> pa.ChunkedArray | pa.Array:
    """``column.take(order)``. Arrow takes text value by value (about 0.1 s per million rows and
    column here, whatever the values' length); text whose values all have one byte length (a
    digest, an identifier or a code of fixed width) is taken as fixed-size binary instead, a
    copy of that many bytes a row (a tenth of the time), and read back as text."""
    n = len(column)
    if not (pa.types.is_string(column.type) and n and column.null_count == 0):
        return column.take(order)
    text = column.combine_chunks()
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int32, count=n + 1, offset=text.offset * 4)
    first, total = int(offsets[0]), int(offsets[-1] - offsets[0])
    width = total // n
    if width == 0 or width * n != total or not bool(np.all(np.diff(offsets) == width)):
        return text.take(order)
    fixed = pa.Array.from_buffers(pa.binary(width), n, [None, text.buffers()[2].slice(first, total)])
    taken = fixed.take(order)
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(np.arange(0, (n + 1) * width, width, dtype=np.int32)), taken.buffers()[1].slice(taken.offset * width)
    )


def _fixed_width(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_date(t) or pa.types.is_timestamp(t) or pa.types.is_boolean(t)


def _digestible(t: pa.DataType) -> bool:
    return _fixed_bytes(t) is not None or pa.types.is_string(t) or pa.types.is_binary(t)


def _fixed_bytes(t: pa.DataType) -> int | None:
    """Bytes per value of a fixed-width type as row_digest_input lays it out (booleans: one)."""
    if pa.types.is_boolean(t):
        return 1
    if pa.types.is_fixed_size_binary(t) or pa.types.is_decimal(t):
        return int(t.byte_width)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or (pa.types.is_temporal(t) and not pa.types.is_interval(t)):
        return int(t.bit_width) // 8
    return None


def row_digest_input(batch: pa.RecordBatch, names: Sequence[str]) -> pa.Array:
    """Each row's values in ``names`` as one binary value, the text src_row_hash digests for a
    Parquet or Delta row. Rendering the values as JSON text and hashing that (as raw_record shows
    them) cost 0.74 CPU-s per million sensors rows, 45% of the validating statement, nearly all of
    it printing numbers and timestamps as text; this layout costs about 0.12, and its MD5 0.18.
    DuckDB and pyarrow have no kernel that lays a row's values out as bytes, so it is built here
    with numpy, a column at a time.

    Layout, per row: for each column in order, one validity byte (1 or 0) then the value's bytes
    in little-endian order (zeros when null; booleans as one byte), with a text or binary column
    as its length in bytes (int32, -1 when null); then the bytes of each text or binary column,
    in order. Equal values give equal bytes, and the lengths make the layout unambiguous."""
    n = batch.num_rows
    if n == 0:
        return pa.array([], pa.binary())
    widths = []
    for name in names:
        t = batch.schema.field(name).type
        w = _fixed_bytes(t)
        widths.append(4 if w is None else 1 + w)
    row_bytes = sum(widths)
    fixed = np.zeros((n, row_bytes), dtype=np.uint8)
    texts: list[pa.Array] = []
    at = 0
    for name, width in zip(names, widths, strict=True):
        a = batch.column(name)
        t = a.type
        valid = None if a.null_count == 0 else a.is_valid().to_numpy(zero_copy_only=False)
        if pa.types.is_string(t) or pa.types.is_binary(t):
            lengths = pc.binary_length(a).fill_null(-1).to_numpy(zero_copy_only=False).astype("<i4")
            _field_of(fixed, at, 4)[:] = lengths.view(_item(4))
            texts.append(a.cast(pa.binary()))
        else:
            w = width - 1
            fixed[:, at] = 1 if valid is None else valid
            if pa.types.is_boolean(t):
                values = a.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8)
            else:
                raw = np.frombuffer(a.buffers()[1], dtype=np.uint8, count=(a.offset + n) * w)
                values = raw[a.offset * w :].view(_item(w))
            field = _field_of(fixed, at + 1, w)
            field[:] = values
            if valid is not None:
                field[~valid] = np.zeros(1, dtype=field.dtype)
        at += width
    # The rows of the matrix as binary values, without a copy (a cast from fixed_size_binary
    # would make one).
    big = n * row_bytes >= 2**31
    offsets = np.arange(n + 1, dtype=np.int64 if big else np.int32) * row_bytes
    out = pa.Array.from_buffers(pa.large_binary() if big else pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(fixed)])
    if texts:
        out = pc.binary_join_element_wise(out, *texts, b"", null_handling="replace", null_replacement=b"")
    return out


def _item(width: int) -> np.dtype:
    """A numpy type of ``width`` bytes whose values are copied as they are (bytes, not numbers)."""
    return np.dtype(f"<u{width}") if width in (1, 2, 4, 8) else np.dtype((np.void, width))


def _field_of(matrix: np.ndarray, at: int, width: int) -> np.ndarray:
    """Bytes ``at`` to ``at + width`` of every row of ``matrix``, as one value per row: a copy
    into it is one strided loop over the rows (a slice of the matrix's columns copies row by
    row, several times slower). The values need not be aligned."""
    return np.ndarray((matrix.shape[0],), dtype=_item(width), buffer=matrix, offset=at, strides=(matrix.shape[1],))


def _with_source_schema(schema: pa.Schema) -> pa.Schema:
    return schema.append(pa.field("_src", pa.dictionary(pa.int32(), pa.string()))).append(pa.field("_its", _ITS))


def with_source(batch: pa.RecordBatch, src_filename: str, ingestion_ts: dt.datetime) -> pa.RecordBatch:
    """``batch`` with the source's name and ingestion time as columns (the validating statement
    reads them per row, so that one statement can validate several sources)."""
    n = batch.num_rows
    src = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([src_filename], pa.string()))
    micros = (ingestion_ts - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
    its = pa.array(np.full(n, micros, dtype=np.int64), pa.int64()).cast(_ITS)
    return pa.RecordBatch.from_arrays([*batch.columns, src, its], schema=_with_source_schema(batch.schema))


def added_columns(table: Table, columns: Sequence[str], schema: pa.Schema | None) -> list[pa.Field]:
    """The undeclared columns a source adds to a table whose policy is ``add``, typed as in the
    source (text formats: string; nested values: their JSON text)."""
    if table.new_columns != "add":
        return []
    out = []
    for name in columns:
        if name in table.column_names or name in BOOKKEEPING:
            continue
        t = schema.field(name).type if schema is not None and name in schema.names else pa.string()
        if _is_nested(t) or pa.types.is_string_view(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
            t = pa.string()
        out.append(pa.field(name, t))
    return out


def output_schema(table: Table, *, extra_columns: Sequence[pa.Field] = ()) -> pa.Schema:
    """The full bronze row: declared, derived, rescued and audit columns (partition columns included)."""
    fields = [pa.field(c.name, c.type) for c in table.columns]
    fields += list(extra_columns)
    for d in table.derived:
        fields.append(pa.field(d.name, pa.date32() if d.kind == "utc_date" else pa.string()))
    if table.new_columns == "rescue":
        fields.append(pa.field("_rescued_data", pa.string()))
    fields += [
        pa.field("ingestion_ts", pa.timestamp("us", tz="UTC")),
        pa.field("src_filename", pa.string()),
        pa.field("src_row_number", pa.int64()),
        pa.field("src_row_hash", pa.string()),
    ]
    if table.op_column:
        fields += [pa.field("is_deleted", pa.bool_()), pa.field("deleted_at", pa.timestamp("us", tz="UTC"))]
    # Partition columns last: that is where every hive reader puts them, so both outputs agree.
    by_name = {f.name: f for f in fields}
    parts = [by_name[c] for c in table.partition_by]
    return pa.schema([f for f in fields if f.name not in table.partition_by] + parts)


def rejects_for_file(
    *,
    src_filename: str,
    reason: str,
    detail: str,
    raw_records: Sequence[tuple[int | None, str]],
    ingestion_ts: dt.datetime,
) -> pa.Table:
    """Reject rows for a whole-file outcome (UNREADABLE_FILE, SCHEMA_MISMATCH)."""
    n = len(raw_records)
    return pa.table(
        [
            pa.array([src_filename] * n, pa.string()),
            pa.array([r for r, _ in raw_records], pa.int64()),
            pa.array([reason] * n, pa.string()),
            pa.array([detail] * n, pa.string()),
            pa.array([t for _, t in raw_records], pa.string()),
            pa.array([ingestion_ts] * n, pa.timestamp("us", tz="UTC")),
        ],
        schema=REJECT_SCHEMA,
    )
