"""The readers on their own: record boundaries, numbers and raw text, whatever the chunking."""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from bronze_assets.discovery import RawSource, discover, file_format
from bronze_assets.errors import UnreadableFile
from bronze_assets.readers import read_csv, read_json_array, read_jsonl
from schemas.schemas import TABLES


def _source(path: Path, fmt: str = "csv", compression: str | None = None) -> RawSource:
    st = path.stat()
    return RawSource(path.name, "orders", fmt, path, st.st_size, st.st_mtime_ns, compression)  # type: ignore[arg-type]


def _rows(batches: list[pa.RecordBatch]) -> list[dict[str, object]]:
    return pa.Table.from_batches(batches).to_pylist() if batches else []


@pytest.mark.parametrize("chunk_bytes", [7, 16, 64, 1 << 20])
def test_csv_records_survive_any_chunking(tmp_path: Path, chunk_bytes: int) -> None:
    text = 'a,b\r\n1,"x\ny"\r\n\r\n2,"he said ""hi"""\n3,plain\n"4","q,c"\n'
    path = tmp_path / "f.csv"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    reading = read_csv(_source(path), chunk_bytes=chunk_bytes)
    assert reading.columns == ["a", "b"]
    rows = _rows(list(reading.batches))
    assert [r["_row"] for r in rows] == [1, 2, 3, 4]
    assert [r["a"] for r in rows] == ["1", "2", "3", "4"]
    assert [r["b"] for r in rows] == ["x\ny", 'he said "hi"', "plain", "q,c"]
    assert [r["_raw"] for r in rows] == ['1,"x\ny"', '2,"he said ""hi"""', "3,plain", '"4","q,c"']
    assert all(r["_bad"] is None for r in rows)


def test_csv_matches_the_standard_library_on_random_records(tmp_path: Path) -> None:
    rng = random.Random(3)
    alphabet = ['a', 'b', ',', '"', '\n', ' ', 'é', '1']
    records = [[''.join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(3)] for _ in range(400)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["a", "b", "c"])
    writer.writerows(records)
    path = tmp_path / "r.csv"
    path.write_text(out.getvalue(), encoding="utf-8")
    rows = _rows(list(read_csv(_source(path), chunk_bytes=97).batches))
    # csv.writer quotes every field that needs it, so every record is well formed; an empty field
    # reads back as null.
    got = [[r["a"] or "", r["b"] or "", r["c"] or ""] for r in rows]
    assert [r["_bad"] for r in rows] == [None] * len(rows)
    assert got == records


def test_csv_malformed_records_keep_numbers_and_text(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(b'a,b\n1,2\n3\n4,5,6\n5,ab"c\n6,\xff\n7,"ok"\n8,"open\n9,9\n')
    rows = _rows(list(read_csv(_source(path), chunk_bytes=5).batches))
    by_row = {r["_row"]: r for r in rows}
    assert sorted(by_row) == [1, 2, 3, 4, 5, 6, 7]
    assert by_row[1]["_bad"] is None and by_row[1]["b"] == "2"
    assert "expected 2 fields, found 1" in str(by_row[2]["_bad"])
    assert "found 3" in str(by_row[3]["_bad"])
    assert "quote" in str(by_row[4]["_bad"])
    assert "UTF-8" in str(by_row[5]["_bad"]) and by_row[5]["_raw"] == "6,\\xff"
    assert by_row[6]["_bad"] is None and by_row[6]["b"] == "ok"
    assert "unclosed quote" in str(by_row[7]["_bad"])
    assert by_row[7]["_raw"] == '8,"open\n9,9'



@pytest.mark.parametrize("ncols", [1, 3])
def test_csv_good_records_keep_their_values_between_bad_ones(tmp_path: Path, ncols: int) -> None:
    """Runs of bad records (too many fields) between good ones, CRLF and LF terminators and blank
    lines: every good record keeps its own values in its own row, every bad one has nulls."""
    rng = random.Random(ncols)
    header = ",".join(f"c{i}" for i in range(ncols))
    lines, expected = [], []
    for k in range(1, 3001):
        if rng.random() < 0.3:
            lines.append(",".join(f"b{k}" for _ in range(ncols + 1)))
            expected.append(None)
        else:
            values = [f"v{k}_{i}" if rng.random() < 0.8 else "" for i in range(ncols)]
            # (A lone empty field would be a blank line, which is no record: it is quoted.)
            lines.append(",".join(f'"{v}"' if (v and rng.random() < 0.2) or ncols == 1 else v for v in values))
            expected.append(values)
    text = header + "\n" + "".join(line + rng.choice(["\n", "\r\n", "\n\n"]) for line in lines)
    path = tmp_path / "mixed.csv"
    path.write_text(text, encoding="utf-8")
    for chunk_bytes in (4096, 1 << 20):
        rows = _rows(list(read_csv(_source(path), chunk_bytes=chunk_bytes).batches))
        assert [r["_row"] for r in rows] == list(range(1, 3001))
        for r, want in zip(rows, expected, strict=True):
            got = [r[f"c{i}"] for i in range(ncols)]
            if want is None:
                assert r["_bad"] == f"expected {ncols} fields, found {ncols + 1}" and got == [None] * ncols
            else:
                assert r["_bad"] is None and got == [v or None for v in want]

def test_csv_header_only_and_empty_file(tmp_path: Path) -> None:
    header_only = tmp_path / "h.csv"
    header_only.write_text("a,b\n")
    reading = read_csv(_source(header_only))
    assert reading.columns == ["a", "b"] and list(reading.batches) == []
    empty = tmp_path / "e.csv"
    empty.write_bytes(b"")
    assert read_csv(_source(empty)).columns == []


def test_csv_gzip_and_truncated_gzip(tmp_path: Path) -> None:
    data = gzip.compress(b"a,b\n" + b"".join(b"%d,x\n" % i for i in range(5000)))
    good = tmp_path / "g.csv.gz"
    good.write_bytes(data)
    rows = _rows(list(read_csv(_source(good, compression="gzip"), chunk_bytes=1000).batches))
    assert len(rows) == 5000 and rows[-1]["_row"] == 5000 and rows[-1]["a"] == "4999"
    bad = tmp_path / "t.csv.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFile):
        list(read_csv(_source(bad, compression="gzip"), chunk_bytes=1000).batches)


@pytest.mark.parametrize("chunk_bytes", [4, 1 << 20], ids=["line-by-line", "one-chunk"])
def test_jsonl_blank_lines_are_not_records(tmp_path: Path, chunk_bytes: int) -> None:
    """A blank line is no record, and no part of the record before it (whose text, and so its
    row hash, is the same with or without a blank line after it)."""
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a":1}\n\n   \n{"a":2}\r\n \t\r\n[1]\n{bad\n')
    rows = _rows(list(read_jsonl(_source(path, "jsonl"), chunk_bytes=chunk_bytes).batches))
    assert [r["_row"] for r in rows] == [1, 2, 3, 4]
    assert [r["_raw"] for r in rows] == ['{"a":1}', '{"a":2}', "[1]", "{bad"]


@pytest.mark.parametrize("indented", [3, 400], ids=["few-indented", "mostly-indented"])
def test_jsonl_indented_and_blank_lines(tmp_path: Path, indented: int) -> None:
    """Lines that start with whitespace are records unless they hold nothing else, whether a
    few lines of a file are indented or nearly all of them."""
    lines = [(" \t" if i < indented else "") + f'{{"a":{i}}}' for i in range(500)]
    for at in (10, 250, 499):
        lines.insert(at, " \t \r")
    path = tmp_path / "e.jsonl"
    path.write_text("\n".join(lines) + "\n\n")
    rows = _rows(list(read_jsonl(_source(path, "jsonl"), chunk_bytes=1 << 12).batches))
    assert [r["_row"] for r in rows] == list(range(1, 501))
    assert [r["_raw"] for r in rows] == [(" \t" if i < indented else "") + f'{{"a":{i}}}' for i in range(500)]


def test_json_array_elements_streamed(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('[ {"a": 1},\n {"a": [1, 2]}, 7, {"b": "x"} ]')
    rows = _rows(list(read_json_array(_source(path, "json"), chunk_chars=3).batches))
    assert [r["_raw"] for r in rows] == ['{"a": 1}', '{"a": [1, 2]}', "7", '{"b": "x"}']
    assert [r["_row"] for r in rows] == [1, 2, 3, 4]


def test_json_array_broken_midway_is_one_malformed_tail(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('[{"a": 1}, {"a": 2, ]')
    rows = _rows(list(read_json_array(_source(path, "json")).batches))
    assert rows[0]["_bad"] is None
    assert rows[1]["_bad"] is not None and rows[1]["_row"] == 2
    assert len(rows) == 2


@pytest.mark.parametrize(
    ("text", "after"),
    [
        ('[{"a": 1}] [{"a": 2}]', '[{"a": 2}]'),
        ('{"a": 1}\n{"a": 2}\n', '{"a": 2}\n'),
        ('[{"a": 1}]\n\t \n', None),
    ],
    ids=["two-arrays", "two-objects", "trailing-whitespace"],
)
def test_json_content_after_the_top_level_value_is_a_malformed_record(
    tmp_path: Path, text: str, after: str | None
) -> None:
    path = tmp_path / "s.json"
    path.write_text(text)
    rows = _rows(list(read_json_array(_source(path, "json"), chunk_chars=4).batches))
    assert (rows[0]["_raw"], rows[0]["_bad"]) == ('{"a": 1}', None)
    if after is None:
        assert len(rows) == 1
    else:
        assert len(rows) == 2 and rows[1]["_row"] == 2
        assert rows[1]["_raw"] == after
        assert rows[1]["_bad"].startswith("content after the end of the JSON")


@pytest.mark.parametrize("chunk_chars", [1, 2, 3, 5, 1 << 20])
def test_json_array_number_elements_are_whole_whatever_the_chunks(tmp_path: Path, chunk_chars: int) -> None:
    path = tmp_path / "s.json"
    path.write_text('[12345, -6.75e3, {"a": 1}, true, 789]')
    rows = _rows(list(read_json_array(_source(path, "json"), chunk_chars=chunk_chars).batches))
    assert [r["_raw"] for r in rows] == ["12345", "-6.75e3", '{"a": 1}', "true", "789"]


def test_json_array_long_elements_are_read_whole_up_to_a_bound(tmp_path: Path, monkeypatch) -> None:
    import bronze_assets.readers as readers

    monkeypatch.setattr(readers, "MAX_JSON_ELEMENT_CHARS", 50_000)
    long_ok = {"a": "x" * 30_000}
    too_long = {"a": "y" * 80_000}
    path = tmp_path / "s.json"
    path.write_text(json.dumps([long_ok, {"b": 1}, too_long, {"c": 2}]))
    rows = _rows(list(read_json_array(_source(path, "json"), chunk_chars=3).batches))
    assert [json.loads(r["_raw"]) for r in rows[:2]] == [long_ok, {"b": 1}]
    assert rows[0]["_bad"] is None and rows[1]["_bad"] is None
    # past the bound: one malformed record holding the rest of the file, and reading stops
    assert len(rows) == 3 and rows[2]["_row"] == 3
    assert "longer than 50000 characters" in rows[2]["_bad"]
    assert rows[2]["_raw"].startswith('{"a": "yyy')


def test_json_array_broken_element_early_in_a_long_file_is_read_in_linear_time(tmp_path: Path) -> None:
    """The decoder is retried on a buffer that doubles, not one that grows by a chunk: 20,000
    elements after a broken one, read in chunks of 64 characters, are decoded a few dozen
    times, not thousands of times."""
    path = tmp_path / "s.json"
    path.write_text('[{"a": 1}, {"a": tru}, ' + ", ".join(json.dumps({"i": i}) for i in range(20_000)) + "]")
    calls = 0
    real = json.JSONDecoder.raw_decode

    def counting(self, s, idx=0):
        nonlocal calls
        calls += 1
        return real(self, s, idx)

    json.JSONDecoder.raw_decode = counting  # type: ignore[method-assign]
    try:
        rows = _rows(list(read_json_array(_source(path, "json"), chunk_chars=64).batches))
    finally:
        json.JSONDecoder.raw_decode = real  # type: ignore[method-assign]
    assert [r["_row"] for r in rows] == [1, 2]
    assert rows[1]["_bad"].startswith("invalid JSON")
    assert rows[1]["_raw"].startswith('{"a": tru}, {"i": 0}')
    assert calls < 40


def test_discovery_rules(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    for rel in [
        "orders/a.csv",
        "orders/sub/b.csv.gz",
        "orders/.hidden.csv",
        "orders/_notes.csv",
        "orders/~$lock.xlsx",
        "orders/c.csv.tmp",
        "orders/_skip/d.csv",
        "orders/.git/e.csv",
        "customers.xlsx",
        "customers-2024.csv",
        "inventory.csv",
        "stores_x.json",
    ]:
        p = raw / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    d = discover(raw, TABLES)
    assert [s.src_path for s in d.sources] == [
        "customers-2024.csv",
        "customers.xlsx",
        "orders/a.csv",
        "orders/sub/b.csv.gz",
        "stores_x.json",
    ]
    assert d.unmatched == ("inventory.csv",)
    assert file_format("x.NDJSON.gz") == ("jsonl", "gzip")


def test_parquet_batches_are_sized_by_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Narrow rows come in large batches, wide rows in small ones; every row is read once, in
    order, numbered from 1."""
    import pyarrow.parquet as pq

    from bronze_assets import readers

    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 1 << 20)
    narrow, wide = tmp_path / "narrow.parquet", tmp_path / "wide.parquet"
    n = 20_000
    pq.write_table(pa.table({"k": list(range(n))}), narrow, row_group_size=5_000)
    pq.write_table(pa.table({"k": list(range(n)), "text": [f"{i:08d}" * 200 for i in range(n)]}), wide, row_group_size=5_000)
    sizes = {}
    for path in (narrow, wide):
        batches = list(readers.read_parquet(_source(path, "parquet")).batches)
        assert [r["_row"] for r in _rows(batches)] == list(range(1, n + 1))
        assert [r["k"] for r in _rows(batches)] == list(range(n))
        sizes[path.stem] = max(b.num_rows for b in batches)
    assert sizes["narrow"] == n  # 160 KB of values: one batch
    # 1,600 bytes a row: under a thousand rows would make 1 MB; the floor is 1,024.
    assert sizes["wide"] == readers.PARQUET_BATCH_ROWS[0]


def test_parquet_batches_account_for_decoded_dictionaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column of one long value repeated is a few bytes in the footer (dictionary encoded)
    and its full length per row once read: batches are sized by the decoded rows."""
    import pyarrow.parquet as pq

    from bronze_assets import readers

    monkeypatch.setattr(readers, "PARQUET_BATCH_BYTES", 4 << 20)
    path = tmp_path / "repeated.parquet"
    n = 50_000
    pq.write_table(pa.table({"k": list(range(n)), "text": ["x" * 2_000] * n}), path)
    meta = pq.ParquetFile(path).metadata
    assert readers.parquet_batch_rows(meta) > 10_000  # the footer alone says narrow rows
    batches = list(readers.read_parquet(_source(path, "parquet")).batches)
    assert max(b.num_rows for b in batches) <= 2_100  # 4 MB of 2 KB rows
    assert sum(b.num_rows for b in batches) == n
