"""Readers: turn one raw source into a stream of Arrow record batches.

Every batch a reader yields has the same bookkeeping columns, whatever the format:

* ``_row``  int64   the record number in the source (first data record = 1);
* ``_raw``  string  the record as read (CSV text, JSON text; null when the row is built from typed
  values, in which case validation renders the row's values as JSON);
* ``_bad``  string  null, or why the record could not be parsed (it becomes a MALFORMED_RECORD);

plus the source's own columns: strings for CSV and XLSX, native types for Parquet, and none for
JSON (validation extracts the keys from ``_raw``).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import re
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from bronze_assets.discovery import Format, RawSource
from bronze_assets.errors import UnreadableFile

RawKind = Literal["text", "json", "row"]
_SURROGATE = re.compile("[\udc80-\udcff]")

CHUNK_BYTES = 16 << 20
MAX_RECORD_BYTES = 512 << 20
XLSX_BATCH_ROWS = 20_000
JSON_BATCH_RECORDS = 50_000
MAX_JSON_ELEMENT_CHARS = 64 << 20  # a JSON array element longer than this is malformed
BOM = b"\xef\xbb\xbf"
QUOTE, COMMA, LF, CR = 34, 44, 10, 13


@dataclass
class Reading:
    """An opened source: its header and the stream of batches (read lazily)."""

    columns: list[str]
    batches: Iterator[pa.RecordBatch]
    raw_kind: RawKind
    # Types of the source's columns when they are native (Parquet, Delta); text formats: None.
    schema: pa.Schema | None = None


Reader = Callable[[RawSource], Reading]


def open_source(source: RawSource) -> Reading:
    """Open ``source`` with the reader of its format; raise ``UnreadableFile`` when it cannot be."""
    try:
        reader = READERS[source.format]
    except KeyError:
        known = ", ".join(sorted(READERS))
        raise UnreadableFile(source.src_path, f"no reader for format {source.format!r} (known: {known})") from None
    return reader(source)


def guarded(source: RawSource, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Turn low-level read errors raised while streaming into ``UnreadableFile``."""
    try:
        yield from batches
    except UnreadableFile:
        raise
    except (OSError, EOFError, zlib.error, ValueError, pa.ArrowException, zipfile.BadZipFile, KeyError) as exc:
        raise UnreadableFile(source.src_path, _one_line(exc)) from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def _open_binary(source: RawSource) -> IO[bytes]:
    fh: IO[bytes] = open(source.path, "rb")  # noqa: SIM115 - closed by the generator that reads it
    if source.compression == "gzip":
        return gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[return-value]
    return fh


def _read_exactly(fh: IO[bytes], size: int) -> bytes:
    try:
        return fh.read(size)
    except (OSError, EOFError, zlib.error) as exc:
        raise UnreadableFile(getattr(fh, "name", "?"), _one_line(exc)) from exc


# --------------------------------------------------------------------------------------------
# Record splitting for text formats.
#
# pyarrow's CSV reader parses fields fast but does not give the raw text or the number of each
# record, stops a whole block at invalid UTF-8, and treats a stray quote inside a field as data.
# The contract needs all three per record, so record and field boundaries are found here with
# vectorised numpy scans (quote parity decides which newlines and commas are structural), and
# only the records that are well formed are handed to pyarrow to parse.
# --------------------------------------------------------------------------------------------


@dataclass
class _Chunk:
    buf: bytes
    starts: np.ndarray  # record start offsets in buf
    ends: np.ndarray  # record end offsets (terminator excluded)
    quotes: np.ndarray  # positions of '"' in buf
    final_unclosed: bool  # the last record runs to EOF inside an open quote
    stray: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # quotes inside unquoted fields


def _structural_quotes(a: np.ndarray, quotes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split quote positions into structural ones and strays (a quote inside an unquoted field,
    as in ``ab"c``), which are data to a CSV parser and must not flip the quote parity."""
    strays: list[int] = []
    while quotes.size:
        opening = (np.arange(quotes.size) & 1) == 0
        prev = np.where(quotes > 0, a[np.maximum(quotes - 1, 0)], LF)
        at_field_start = (prev == COMMA) | (prev == LF) | (prev == CR) | (prev == QUOTE)
        bad = np.flatnonzero(opening & ~at_field_start)
        if not bad.size:
            break
        # Only the first is certainly stray: dropping it flips the parity of every later quote.
        first = int(bad[0])
        strays.append(int(quotes[first]))
        quotes = np.delete(quotes, first)
    return quotes, np.array(strays, dtype=np.int64)


def _split_records(fh: IO[bytes], *, chunk_bytes: int, quoted: bool) -> Iterator[_Chunk]:
    """Yield chunks of whole records. Blank lines are not records."""
    carry = b""
    first = True
    eof = False
    want = chunk_bytes
    while not eof:
        data = _read_exactly(fh, want)
        eof = len(data) < want
        buf = carry + data if carry else data
        if first:
            if buf.startswith(BOM):
                buf = buf[3:]
            first = False
        if not buf:
            break
        a = np.frombuffer(buf, dtype=np.uint8)
        quotes = np.flatnonzero(a == QUOTE) if quoted else np.empty(0, dtype=np.int64)
        stray = np.empty(0, dtype=np.int64)
        if quotes.size:
            quotes, stray = _structural_quotes(a, quotes)
        nl = np.flatnonzero(a == LF)
        if quotes.size:
            nl = nl[(np.searchsorted(quotes, nl) & 1) == 0]
        if eof:
            cut = len(buf)
        elif nl.size:
            cut = int(nl[-1]) + 1
        else:
            if len(buf) > MAX_RECORD_BYTES:
                raise UnreadableFile(getattr(fh, "name", "?"), f"a record is longer than {MAX_RECORD_BYTES} bytes")
            carry = buf
            want = max(want, len(buf))  # grow: a record spans the whole chunk
            continue
        carry = buf[cut:]
        want = chunk_bytes
        starts = np.concatenate(([0], nl + 1))
        ends = np.concatenate((nl, [cut]))
        if starts[-1] >= cut:  # the buffer ends right after a terminator
            starts, ends = starts[:-1], ends[:-1]
        # Drop the CR of CRLF terminators.
        has_cr = ends > starts
        has_cr[has_cr] = a[ends[has_cr] - 1] == CR
        ends = ends - has_cr
        keep = ends > starts
        starts, ends = starts[keep], ends[keep]
        final_unclosed = bool(eof and quotes.size and (quotes.size & 1))
        yield _Chunk(buf, starts, ends, quotes[quotes < cut], final_unclosed, stray[stray < cut])


def _escape_invalid(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


def _valid_utf8(buf: bytes) -> bool:
    """Whether ``buf`` is valid UTF-8. ASCII is, and ``isascii`` tests it without decoding (a
    decode makes a copy of the whole chunk as a str: 4-7 ms for 16 MB here)."""
    if buf.isascii():
        return True
    try:
        buf.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _utf8_bad_records(chunk: _Chunk) -> np.ndarray:
    """Boolean mask of records holding bytes that are not valid UTF-8 (fast path: none)."""
    bad = np.zeros(chunk.starts.size, dtype=bool)
    if _valid_utf8(chunk.buf):
        return bad
    mv = memoryview(chunk.buf)
    for i, (s, e) in enumerate(zip(chunk.starts.tolist(), chunk.ends.tolist(), strict=True)):
        try:
            str(mv[s:e], "utf-8")
        except UnicodeDecodeError:
            bad[i] = True
    return bad


def _records_array(buf: bytes, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    """String array of the records' text. Built zero-copy with each element running to the next
    record's start, then cut back to its end (a numpy gather of the bytes is far slower)."""
    n = starts.size
    offsets = np.empty(n + 1, dtype=np.int32)
    offsets[:n] = starts
    offsets[n] = ends[-1] if n else 0
    spans = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf))
    return pc.utf8_rtrim(spans, characters="\r\n")


def _bookkeeping(rows: np.ndarray, raw: pa.Array, bad: pa.Array) -> dict[str, pa.Array]:
    return {"_row": pa.array(rows, pa.int64()), "_raw": raw, "_bad": bad}


# --------------------------------------------------------------------------------------------
# CSV
# --------------------------------------------------------------------------------------------


def _parse_header(raw: bytes) -> list[str]:
    text = raw.decode("utf-8", errors="replace")
    # The record splitter already found the header's end: a line break left inside it is text.
    names = next(csv.reader(io.StringIO(text.replace("\r", " ").replace("\n", " "), newline="")), [])
    out: list[str] = []
    seen: set[str] = set()
    for i, name in enumerate(names):
        name = name.strip() or f"_c{i}"
        base, n = name, 2
        while name in seen:  # a repeated header name keeps its values under a suffixed name
            name, n = f"{base}_{n}", n + 1
        seen.add(name)
        out.append(name)
    return out


def read_csv(source: RawSource, *, chunk_bytes: int | None = None) -> Reading:
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    fh = _open_binary(source)
    try:
        chunks = _split_records(fh, chunk_bytes=chunk_bytes, quoted=True)
        first = next(chunks, None)
    except UnicodeDecodeError as exc:
        fh.close()
        raise UnreadableFile(source.src_path, _one_line(exc)) from exc
    except UnreadableFile:
        fh.close()
        raise
    except (OSError, EOFError, zlib.error) as exc:
        fh.close()
        raise UnreadableFile(source.src_path, _one_line(exc)) from exc
    if first is None or first.starts.size == 0:
        fh.close()
        return Reading([], iter(()), "text")
    header_raw = first.buf[int(first.starts[0]) : int(first.ends[0])]
    columns = _parse_header(header_raw)
    first = _Chunk(first.buf, first.starts[1:], first.ends[1:], first.quotes, first.final_unclosed, first.stray)

    def batches() -> Iterator[pa.RecordBatch]:
        next_row = 1
        try:
            for chunk in _chain(first, chunks):
                batch = _csv_chunk_to_batch(chunk, columns, next_row)
                next_row += chunk.starts.size
                if batch.num_rows:
                    yield batch
        finally:
            fh.close()

    return Reading(columns, guarded(source, batches()), "text")


def _chain(first: _Chunk, rest: Iterator[_Chunk]) -> Iterator[_Chunk]:
    yield first
    yield from rest


def _csv_chunk_to_batch(chunk: _Chunk, columns: list[str], first_row: int) -> pa.RecordBatch:
    buf, starts, ends = chunk.buf, chunk.starts, chunk.ends
    n = starts.size
    ncols = len(columns)
    rows = np.arange(first_row, first_row + n, dtype=np.int64)
    reasons: list[str | None] = [None] * n
    bad = np.zeros(n, dtype=bool)

    def mark(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask & ~bad):
            reasons[i] = reason
        bad[:] |= mask

    if n and chunk.final_unclosed:
        last = np.zeros(n, dtype=bool)
        last[-1] = True
        mark(last, "unclosed quote: the record runs to the end of the file")
    utf8_bad = _utf8_bad_records(chunk)
    mark(utf8_bad, "bytes that are not valid UTF-8")

    a = np.frombuffer(buf, dtype=np.uint8)
    quotes = chunk.quotes
    if chunk.stray.size:
        mark(_records_holding(chunk.stray, starts, ends), "broken quoting: a quote inside an unquoted field")
    if quotes.size:
        mark(_broken_quoting(a, quotes, starts, ends), "broken quoting")
        commas = np.flatnonzero(a == COMMA)
        commas = commas[(np.searchsorted(quotes, commas) & 1) == 0]
    else:
        commas = np.flatnonzero(a == COMMA)
    nfields = np.searchsorted(commas, ends) - np.searchsorted(commas, starts) + 1
    wrong = nfields != ncols
    if wrong.any():
        for i in np.flatnonzero(wrong & ~bad):
            reasons[i] = f"expected {ncols} fields, found {int(nfields[i])}"
        bad |= wrong

    values = _parse_records(buf, starts, ends, ~bad, ncols)
    raw = _raw_text(buf, starts, ends, utf8_bad)
    arrays: dict[str, pa.Array] = _bookkeeping(rows, raw, pa.array(reasons, pa.string()))
    arrays.update(zip(columns, values, strict=True))
    return pa.RecordBatch.from_pydict(arrays)


def _broken_quoting(a: np.ndarray, quotes: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Records where a quote stands anywhere but at the start or end of a field (RFC 4180)."""
    opening = (np.arange(quotes.size) & 1) == 0  # parity within the chunk, which starts outside quotes
    prev = np.where(quotes > 0, a[np.maximum(quotes - 1, 0)], COMMA)
    ok_open = (prev == COMMA) | (prev == LF) | (prev == QUOTE) | (quotes == 0)
    nxt_idx = np.minimum(quotes + 1, a.size - 1)
    nxt = np.where(quotes + 1 < a.size, a[nxt_idx], LF)
    ok_close = (nxt == COMMA) | (nxt == LF) | (nxt == CR) | (nxt == QUOTE)
    # A record start (after a terminator) also allows an opening quote.
    at_start = np.isin(quotes, starts)
    wrong_q = np.where(opening, ~(ok_open | at_start), ~ok_close)
    return _records_holding(quotes[wrong_q], starts, ends)


def _records_holding(positions: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    mask = np.zeros(starts.size, dtype=bool)
    if positions.size:
        rec = np.searchsorted(starts, positions, side="right") - 1
        inside = (rec >= 0) & (positions < ends[np.maximum(rec, 0)])
        mask[rec[inside]] = True
    return mask


def _parse_records(buf: bytes, starts: np.ndarray, ends: np.ndarray, good: np.ndarray, ncols: int) -> list[pa.Array]:
    """The fields of every record, as text; a record that is not ``good`` gets nulls. The parser
    sees each bad record as an empty one, so its output has a row per record in place (putting
    nulls back in place after parsing only the good ones would copy every column)."""
    if starts.size == 0:
        return [pa.array([], pa.string()) for _ in range(ncols)]
    body = _join_records(buf, starts, ends, good, ncols)
    names = [f"c{i}" for i in range(ncols)]
    try:
        table = pacsv.read_csv(
            pa.BufferReader(body),
            read_options=pacsv.ReadOptions(column_names=names, block_size=max(len(body) + 1, 1 << 20)),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in names},
                strings_can_be_null=True,
                null_values=[""],
            ),
        )
        if table.num_rows == starts.size:
            return [c.chunk(0) if c.num_chunks == 1 else c.combine_chunks() for c in table.columns]
    except pa.ArrowInvalid:
        pass
    # Safety net (never expected after the checks above): the standard library's parser.
    rows = list(csv.reader(io.StringIO(body.decode("utf-8"), newline="")))
    return [pa.array([(r[i] if r[i] != "" else None) for r in rows], pa.string()) for i in range(ncols)]


def _join_records(buf: bytes, starts: np.ndarray, ends: np.ndarray, good: np.ndarray, ncols: int) -> bytes:
    """The records, each followed by LF, with a bad one replaced by an empty record of ``ncols``
    null fields; consecutive good records are copied as one run."""
    n = starts.size
    new_run = np.ones(n, dtype=bool)
    # A run ends at a change between good and bad, or at a gap other than a LF or CRLF terminator.
    new_run[1:] = (good[1:] != good[:-1]) | (starts[1:] > ends[:-1] + 2)
    firsts = np.flatnonzero(new_run)
    lasts = np.append(firsts[1:] - 1, n - 1)
    empty = b'""' + b"," * (ncols - 1) + b"\n"  # quoted, so that one column is not a blank line
    parts: list[bytes | memoryview] = []
    mv = memoryview(buf)
    for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
        if good[first]:
            parts.append(mv[int(starts[first]) : int(ends[last])])
            parts.append(b"\n")
        else:
            parts.append(empty * (last - first + 1))
    return b"".join(parts)


def _raw_text(buf: bytes, starts: np.ndarray, ends: np.ndarray, utf8_bad: np.ndarray) -> pa.Array:
    """Raw record text. Records with invalid UTF-8 (``utf8_bad``, from _utf8_bad_records) get
    \\xNN escapes (a slow path, rare)."""
    if not utf8_bad.any():
        return _records_array(buf, starts, ends)
    mv = memoryview(buf)
    return pa.array(
        [_escape_invalid(bytes(mv[s:e])) for s, e in zip(starts.tolist(), ends.tolist(), strict=True)], pa.string()
    )


# --------------------------------------------------------------------------------------------
# JSON lines and JSON arrays
# --------------------------------------------------------------------------------------------


def read_jsonl(source: RawSource, *, chunk_bytes: int | None = None) -> Reading:
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    fh = _open_binary(source)

    def batches() -> Iterator[pa.RecordBatch]:
        next_row = 1
        try:
            for chunk in _split_records(fh, chunk_bytes=chunk_bytes, quoted=False):
                # Blank lines (whitespace only) are not records.
                a = np.frombuffer(chunk.buf, dtype=np.uint8)
                blank = _blank_records(a, chunk.starts, chunk.ends)
                n = chunk.starts.size - int(np.count_nonzero(blank))
                if not n:
                    continue
                # The text is cut at every line, blank ones included, and the blank ones are
                # then left out: a record's text runs to the next line's start (see
                # _records_array), which must not be past a blank line's whitespace.
                bad = _utf8_bad_records(chunk)
                raw = _raw_text(chunk.buf, chunk.starts, chunk.ends, bad)
                if n < chunk.starts.size:
                    raw, bad = raw.filter(pa.array(~blank)), bad[~blank]
                reasons = (
                    pa.array(["bytes that are not valid UTF-8" if b else None for b in bad.tolist()], pa.string())
                    if bad.any()
                    else pa.nulls(n, pa.string())
                )
                rows = np.arange(next_row, next_row + n, dtype=np.int64)
                next_row += n
                yield pa.RecordBatch.from_pydict(_bookkeeping(rows, raw, reasons))
        finally:
            fh.close()

    return Reading([], guarded(source, batches()), "json")


def _blank_records(a: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Mask of the records that hold only whitespace. A record whose first byte is not
    whitespace is not blank (nearly every JSON line starts with ``{``); only the others, and
    only the bytes of those, are looked at."""
    blank = starts >= ends
    maybe = np.flatnonzero(~blank)
    if maybe.size:
        first = a[starts[maybe]]
        maybe = maybe[(first == 32) | (first == 9) | (first == 13) | (first == LF)]
    if maybe.size:
        lengths = ends[maybe] - starts[maybe]
        if int(lengths.sum()) > a.size // 4:  # mostly indented lines: one pass over every byte
            nonspace_at = np.flatnonzero((a != 32) & (a != 9) & (a != 13) & (a != LF))
            return np.searchsorted(nonspace_at, ends) == np.searchsorted(nonspace_at, starts)
        # The bytes of the candidate records, one after another, and which record each is from.
        owner = np.repeat(np.arange(maybe.size), lengths)
        within = np.arange(owner.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        b = a[starts[maybe][owner] + within]
        nonspace = np.zeros(maybe.size, dtype=bool)
        nonspace[owner[(b != 32) & (b != 9) & (b != 13) & (b != LF)]] = True
        blank[maybe[~nonspace]] = True
    return blank


def read_json_array(source: RawSource, *, chunk_chars: int = 1 << 20) -> Reading:
    """A JSON array of objects (or a single object). Elements are found with the standard
    library's incremental decoder, so memory holds one element, not the file."""
    fh = _open_binary(source)
    # Undecodable bytes become lone surrogates, which the JSON decoder carries through, so that
    # only the element holding them is rejected.
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="surrogateescape")
    decoder = json.JSONDecoder()

    def batches() -> Iterator[pa.RecordBatch]:
        buf = ""
        pos = 0
        eof = False
        row = 0
        raws: list[str] = []
        bads: list[str | None] = []

        def more(size: int | None = None) -> bool:
            nonlocal buf, pos, eof
            data = text.read(size or chunk_chars)
            if not data:
                eof = True
                return False
            buf = buf[pos:] + data
            pos = 0
            return True

        def skip_ws() -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buf) or eof or not more():
                    return

        def flush() -> pa.RecordBatch:
            nonlocal raws, bads
            rows = np.arange(row - len(raws) + 1, row + 1, dtype=np.int64)
            out = pa.RecordBatch.from_pydict(_bookkeeping(rows, pa.array(raws, pa.string()), pa.array(bads, pa.string())))
            raws, bads = [], []
            return out

        closed = False
        try:
            skip_ws()
            if pos >= len(buf):
                return
            if buf[pos] == "{":
                top_array = False
            elif buf[pos] == "[":
                top_array = True
                pos += 1
            else:
                raise UnreadableFile(source.src_path, "not a JSON array or object")
            while True:
                skip_ws()
                if top_array and pos < len(buf) and buf[pos] == "]":
                    pos += 1
                    closed = True
                    break
                if pos >= len(buf):
                    if top_array:
                        row += 1
                        raws.append("")
                        bads.append("the JSON array is not closed")
                    break
                start = pos
                while True:
                    try:
                        _, end = decoder.raw_decode(buf, pos)
                        # Every other value ends with a character of its own; a number read up
                        # to near the end of the buffer may go on past it ("-6." then "75e3").
                        number = buf[pos] in "-0123456789"
                        if not number or len(buf) - end > 64 or eof or not more():
                            break
                        start = pos
                        continue
                    except json.JSONDecodeError as exc:
                        # The element may only be cut by the end of what was read: read as much
                        # again (so that a long element is decoded a bounded number of times),
                        # up to MAX_JSON_ELEMENT_CHARS, past which it is malformed.
                        held = len(buf) - pos
                        room = MAX_JSON_ELEMENT_CHARS + 1 - held
                        if eof or room <= 0 or not more(min(max(chunk_chars, held), room)):
                            row += 1
                            raws.append(_escaped(buf[pos:][: 1 << 20]))
                            why = (
                                f"invalid JSON: {exc.msg}"
                                if held <= MAX_JSON_ELEMENT_CHARS
                                else f"invalid JSON, or an element longer than {MAX_JSON_ELEMENT_CHARS} characters"
                            )
                            bads.append(f"{why}; the rest of the file is this record (reading stops here)")
                            end = -1
                            break
                        start = pos
                if end < 0:
                    break
                row += 1
                element = buf[start:end]
                if _SURROGATE.search(element):
                    raws.append(_escaped(element))
                    bads.append("bytes that are not valid UTF-8")
                else:
                    raws.append(element)
                    bads.append(None)
                pos = end
                if len(raws) >= JSON_BATCH_RECORDS:
                    yield flush()
                if not top_array:
                    closed = True
                    break
                skip_ws()
                if pos < len(buf) and buf[pos] == ",":
                    pos += 1
            if closed:
                skip_ws()
                if pos < len(buf):  # more after the array (or object): one record, not dropped
                    while len(buf) - pos < 1 << 20 and more():
                        pass
                    row += 1
                    raws.append(_escaped(buf[pos:][: 1 << 20]))
                    what = "array" if top_array else "object"
                    bads.append(f"content after the end of the JSON {what} (the rest of the file is this record)")
            if raws:
                yield flush()
        finally:
            fh.close()

    return Reading([], guarded(source, batches()), "json")


def _escaped(text: str) -> str:
    """Text decoded with ``surrogateescape``, its undecodable bytes as \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------


def normalize_schema(schema: pa.Schema) -> pa.Schema:
    fields = []
    for f in schema:
        t = f.type
        if pa.types.is_timestamp(t) and t.unit == "ns":
            t = pa.timestamp("us", tz=t.tz)
        elif pa.types.is_string_view(t) or pa.types.is_large_string(t):
            t = pa.string()
        fields.append(f.with_type(t))
    return pa.schema(fields)


def normalize_native(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Typed columns as validation wants them: timestamps finer than microseconds truncated (a
    cast in DuckDB would round), string views and large strings as plain strings."""
    schema = normalize_schema(batch.schema)
    if schema.equals(batch.schema):
        return batch
    columns = [
        pc.cast(c, f.type, safe=False) if not c.type.equals(f.type) else c
        for c, f in zip(batch.columns, schema, strict=True)
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema)


PARQUET_BATCH_BYTES = 64 << 20
PARQUET_BATCH_ROWS = (1_024, 524_288)


def parquet_batch_rows(meta: pq.FileMetaData, sampled_row_bytes: float = 0.0) -> int:
    """Rows per batch: about PARQUET_BATCH_BYTES of data, by the larger of the footer's
    uncompressed size per row and the Arrow size per row of a sample of the first rows (a
    dictionary-encoded column is small in the footer and large once decoded). Each batch costs
    a validating statement and a slice per partition, so narrow rows come in large batches
    (sensors: 5M rows in 10 rather than 38 took a fifth less time); wide ones in smaller
    batches, so that memory stays bounded."""
    low, high = PARQUET_BATCH_ROWS
    rows = meta.num_rows
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    per_row = max(size / rows if rows > 0 else 0.0, sampled_row_bytes)
    if per_row <= 0:
        return high
    return max(low, min(high, int(PARQUET_BATCH_BYTES / per_row)))


def _sampled_row_bytes(pf: pq.ParquetFile) -> float:
    first = next(iter(pf.iter_batches(batch_size=PARQUET_BATCH_ROWS[0])), None)
    return first.nbytes / first.num_rows if first is not None and first.num_rows else 0.0


def read_parquet(source: RawSource, *, batch_rows: int | None = None) -> Reading:
    try:
        pf = pq.ParquetFile(source.path)
        schema = pf.schema_arrow
        if batch_rows is None:
            batch_rows = parquet_batch_rows(pf.metadata, _sampled_row_bytes(pf))
    except (OSError, pa.ArrowException) as exc:
        raise UnreadableFile(source.src_path, _one_line(exc)) from exc

    def batches() -> Iterator[pa.RecordBatch]:
        row = 1
        try:
            for batch in pf.iter_batches(batch_size=batch_rows):
                batch = normalize_native(batch)
                n = batch.num_rows
                arrays = _bookkeeping(
                    np.arange(row, row + n, dtype=np.int64), pa.nulls(n, pa.string()), pa.nulls(n, pa.string())
                )
                row += n
                for name, col in zip(batch.schema.names, batch.columns, strict=True):
                    arrays[name] = col
                yield pa.RecordBatch.from_pydict(arrays)
        finally:
            pf.close()

    return Reading(list(schema.names), guarded(source, batches()), "row", normalize_schema(schema))


# --------------------------------------------------------------------------------------------
# XLSX (openpyxl in read-only mode streams rows; values are rendered as text, as in CSV)
# --------------------------------------------------------------------------------------------

MAX_XLSX_UNCOMPRESSED = 2 << 30


def _cell_text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0) and value.tzinfo is None:
            return value.date().isoformat()
        return value.isoformat()
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _json_value(value: object) -> object:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, float | int | bool | str) or value is None:
        return value
    return str(value)


def read_xlsx(source: RawSource) -> Reading:
    import openpyxl  # heavy import, only when an XLSX source is read
    from openpyxl.utils.exceptions import InvalidFileException

    try:
        with zipfile.ZipFile(source.path) as zf:
            total = sum(i.file_size for i in zf.infolist())
        if total > MAX_XLSX_UNCOMPRESSED:
            raise UnreadableFile(source.src_path, f"uncompressed size {total} exceeds {MAX_XLSX_UNCOMPRESSED} bytes")
        wb = openpyxl.load_workbook(source.path, read_only=True, data_only=True)
        ws = wb.worksheets[0]
        rows_iter = ws.iter_rows(values_only=True)
        header_values = next(rows_iter, None)
    except UnreadableFile:
        raise
    except (OSError, zipfile.BadZipFile, InvalidFileException, KeyError, ValueError, IndexError) as exc:
        raise UnreadableFile(source.src_path, _one_line(exc)) from exc
    if header_values is None:
        wb.close()
        return Reading([], iter(()), "row")
    columns = _parse_header(
        ",".join('"' + (_cell_text(v) or "").replace('"', '""') + '"' for v in header_values).encode()
    )
    ncols = len(columns)

    def batches() -> Iterator[pa.RecordBatch]:
        row = 0
        cols: list[list[str | None]] = [[] for _ in range(ncols)]
        raws: list[str] = []
        try:
            for values in rows_iter:
                if values is None or all(v is None or (isinstance(v, str) and not v.strip()) for v in values):
                    continue
                row += 1
                values = tuple(values[:ncols]) + (None,) * (ncols - len(values))
                for i, v in enumerate(values):
                    cols[i].append(_cell_text(v))
                raws.append(
                    json.dumps(
                        {c: _json_value(v) for c, v in zip(columns, values, strict=True)},
                        ensure_ascii=False,
                        separators=(",", ":"),
                    )
                )
                if len(raws) >= XLSX_BATCH_ROWS:
                    yield _xlsx_batch(row, columns, cols, raws)
                    cols = [[] for _ in range(ncols)]
                    raws = []
            if raws:
                yield _xlsx_batch(row, columns, cols, raws)
        finally:
            wb.close()

    return Reading(columns, guarded(source, batches()), "text")


def _xlsx_batch(last_row: int, columns: list[str], cols: list[list[str | None]], raws: list[str]) -> pa.RecordBatch:
    n = len(raws)
    arrays = _bookkeeping(
        np.arange(last_row - n + 1, last_row + 1, dtype=np.int64), pa.array(raws, pa.string()), pa.nulls(n, pa.string())
    )
    for name, values in zip(columns, cols, strict=True):
        arrays[name] = pa.array(values, pa.string())
    return pa.RecordBatch.from_pydict(arrays)


READERS: Mapping[Format, Reader] = {
    "csv": read_csv,
    "jsonl": read_jsonl,
    "json": read_json_array,
    "parquet": read_parquet,
    "xlsx": read_xlsx,
}
