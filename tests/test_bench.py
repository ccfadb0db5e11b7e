"""The benchmarks run and print their tables (their figures are for the README, not asserted)."""

from tests.conftest import run_ffn


def test_bench_loader_prints_both_backends(tmp_path):
    result = run_ffn(
        "bench",
        "loader",
        "--images",
        "256",
        "--rounds",
        "1",
        "--batch-size",
        "32",
        "--json-out",
        tmp_path / "loader.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| built-in digits, 32x32 JPEGs |" in result.stdout
    import json

    figures = json.loads((tmp_path / "loader.json").read_text())
    assert len(figures["results"]) == 2
    assert all(r["dali_img_s"] > 0 and r["torch_img_s"] > 0 for r in figures["results"])
