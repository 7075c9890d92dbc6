"""The command line (CONTRACT sections 10 and 11): exit codes, one-line errors, the summary, defaults."""

from __future__ import annotations

import io

import pytest

from bronze_assets.cli import main
from bronze_assets_tests.runhelpers import (
    Env,
    cli,
    orders_csv,
    products_csv,
    summary_line,
    summary_total_rows,
    write,
)


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.raw.mkdir()
    return e


def run_main(env: Env, *extra: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(env.cli_args("--quiet", *extra), out=out)
    return code, out.getvalue()


def test_exit_0_for_a_clean_source_and_for_a_run_with_nothing_new(env):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 4)))
    code, out = run_main(env)
    assert code == 0
    assert env.parquet("orders").num_rows == 3
    assert summary_total_rows(out) == 3

    code, out = run_main(env)
    assert code == 0
    assert summary_total_rows(out) == 0
    assert env.parquet("orders").num_rows == 3


def test_exit_0_for_an_empty_raw_folder(env):
    code, _ = run_main(env)
    assert code == 0


def test_exit_1_when_records_are_rejected(env):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 5), bad={2: {"quantity": "x"}}))
    code, _ = run_main(env)
    assert code == 1
    assert env.parquet("orders").num_rows == 3
    assert [r["reason_code"] for r in env.rejects("orders")] == ["TYPE_MISMATCH"]


def test_exit_1_when_a_file_is_rejected(env):
    write(env.raw / "sensors/broken.parquet", b"not parquet")
    code, _ = run_main(env)
    assert code == 1
    assert env.manifest_rows()["sensors/broken.parquet"]["status"] == "rejected"


def test_exit_2_in_strict_mode_with_rejects(env):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 5), bad={2: {"quantity": "x"}}))
    code, out = run_main(env, "--validation-mode", "strict")
    assert code == 2
    assert "orders/orders_a.csv" in out
    assert env.manifest_rows()["orders/orders_a.csv"]["status"] == "failed"


@pytest.mark.parametrize(
    ("case", "args"),
    [
        ("unknown table", ["--tables", "orders,nonsense"]),
        ("missing raw folder", ["--raw", "{root}/no_such_folder"]),
        ("unknown reprocess path", ["--reprocess", "orders/no_such_file.csv"]),
        ("bad validation mode", ["--validation-mode", "lenient"]),
        ("unknown option", ["--no-such-option"]),
    ],
)
def test_bad_arguments_exit_2_with_one_line_on_stderr(env, case, args):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 3)))
    base = ["--raw", str(env.raw), "--lake", str(env.lake), "--manifest", str(env.manifest), "--quiet"]
    proc = cli(base + [a.format(root=env.root) for a in args], cwd=env.root)
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].strip()
    # nothing was ingested
    assert not (env.lake / "bronze").exists()


@pytest.mark.parametrize("value", ["lots", "0", "-5"])
def test_a_bad_writer_buffer_setting_is_a_bad_argument(env, value):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 3)))
    base = ["--raw", str(env.raw), "--lake", str(env.lake), "--manifest", str(env.manifest), "--quiet"]
    proc = cli(base, cwd=env.root, extra_env={"BRONZE_WRITER_BUFFER_MB": value})
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "BRONZE_WRITER_BUFFER_MB" in line and repr(value) in line
    assert not env.lake.exists() and not env.manifest.exists()


def test_bad_argument_messages_name_the_offender(env, capsys):
    cases = {
        "nonsense": ["--tables", "nonsense"],
        "no_such_folder": ["--raw", str(env.root / "no_such_folder")],
        "orders/nope.csv": ["--reprocess", "orders/nope.csv"],
        "lenient": ["--validation-mode", "lenient"],
    }
    for word, args in cases.items():
        argv = env.cli_args("--quiet")
        argv += args
        capsys.readouterr()
        assert main(argv, out=io.StringIO()) == 2
        err = capsys.readouterr().err
        assert word in err, (word, err)
        assert len(err.strip().splitlines()) == 1


def test_summary_names_each_table_with_rows_and_rejects_by_reason(env):
    write(
        env.raw / "orders/orders_a.csv",
        orders_csv(range(1, 8), bad={2: {"quantity": "x"}, 3: {"quantity": "0"}, 4: {"quantity": "-1"}}),
    )
    write(env.raw / "orders_2024-01-02.csv", orders_csv(range(20, 22), day="2024-01-02", bad={21: {"customer_id": ""}}))
    write(env.raw / "products/products.csv", products_csv(range(1, 6)))
    write(env.raw / "inventory.csv", b"a,b\n1,2\n")
    code, out = run_main(env)
    assert code == 1

    orders = summary_line(out, "orders")
    assert "5" in orders[1:]  # rows written: 4 + 1
    assert "4" in orders[1:]  # rows rejected
    joined = " ".join(orders)
    assert "TYPE_MISMATCH=1" in joined
    assert "CONSTRAINT_VIOLATION=2" in joined
    assert "MISSING_REQUIRED=1" in joined

    products = summary_line(out, "products")
    assert "5" in products[1:]
    assert "=" not in " ".join(products)  # no rejects, no reasons
    assert "inventory.csv" in out  # unmatched files are listed
    assert summary_total_rows(out) == 10


def test_progress_goes_to_stderr_unless_quiet(env, capsys):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 3)))
    out = io.StringIO()
    assert main(env.cli_args(), out=out) == 0
    captured = capsys.readouterr()
    assert "orders/orders_a.csv" in captured.err
    assert captured.out == ""
    assert "orders" in out.getvalue()


def test_help_works(tmp_path):
    proc = cli(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    for option in (
        "--raw",
        "--lake",
        "--manifest",
        "--dry-run",
        "--tables",
        "--validation-mode",
        "--reprocess",
        "--min-file-age",
    ):
        assert option in proc.stdout
    assert proc.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_defaults_are_data_raw_lake_and_duckdb_warehouse(tmp_path):
    write(tmp_path / "data_raw" / "orders" / "orders_a.csv", orders_csv(range(1, 4), bad={1: {"quantity": "x"}}))
    proc = cli(["--quiet"], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_raw", "duckdb", "lake"]
    env = Env(tmp_path)  # data_raw, lake, duckdb/warehouse.duckdb: the same defaults
    assert env.manifest.is_file()
    assert set(env.manifest_rows()) == {"orders/orders_a.csv"}
    assert env.parquet("orders").num_rows == 2
    assert env.delta("orders").num_rows == 2
    assert [r["reason_code"] for r in env.rejects("orders")] == ["TYPE_MISMATCH"]


def test_dry_run_prints_what_would_be_written_and_returns_the_real_code(env):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 5), bad={2: {"quantity": "x"}}))
    code, out = run_main(env, "--dry-run")
    assert code == 1
    assert summary_total_rows(out) == 3
    assert "TYPE_MISMATCH=1" in " ".join(summary_line(out, "orders"))
    assert sorted(p.name for p in env.root.iterdir()) == ["data_raw"]
    assert run_main(env)[0] == 1


def test_lake_as_a_file_uri(env):
    write(env.raw / "orders/orders_a.csv", orders_csv(range(1, 3)))
    argv = ["--raw", str(env.raw), "--lake", env.lake.as_uri(), "--manifest", str(env.manifest), "--quiet"]
    assert main(argv, out=io.StringIO()) == 0
    assert env.parquet("orders").num_rows == 2
