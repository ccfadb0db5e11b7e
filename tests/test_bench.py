"""The benchmarks run and print their tables (their figures are for the README, not asserted)."""

import json
import subprocess
import sys

import pytest

from ffn_dist.bench.timing import median_ratio
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
        "--large-images",
        "64",
        "--json-out",
        tmp_path / "loader.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| built-in digits, 32x32 JPEGs |" in result.stdout
    import json

    figures = json.loads((tmp_path / "loader.json").read_text())
    assert len(figures["results"]) == 2
    assert all(r["dali_img_s"] > 0 and r["torch_img_s"] > 0 for r in figures["results"])


def test_bench_train_compares_stage1_step_with_bare_loop(tmp_path):
    import json

    result = run_ffn(
        "bench",
        "train",
        "configs/demo.yaml",
        f"data.root={tmp_path / 'demo'}",
        "data.batch_size=16",
        "--steps",
        "2",
        "--rounds",
        "1",
        "--json-out",
        tmp_path / "t.json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "t.json").read_text())
    assert set(figures["images_per_s"]) == {
        "bare PyTorch loop",
        "stage-1 step (mixup, KPS, engine)",
        "end to end (dali loader)",
        "dali loader alone",
    }
    assert all(v > 0 for v in figures["images_per_s"].values())
    assert "| bare PyTorch loop |" in result.stdout


def test_bench_stage2_times_cache_epochs_against_matmuls_and_backbones(tmp_path):
    import json

    result = run_ffn(
        "bench",
        "stage2",
        "configs/demo.yaml",
        f"data.root={tmp_path / 'demo'}",
        *("--rows", "3000", "--dims", "128", "--classes", "20", "--rounds", "1", "--backbone-steps", "2"),
        *("--work-dir", tmp_path, "--json-out", tmp_path / "s.json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["large"]["rows"] == 3000 and figures["data"]["images"] == 585
    assert all(v > 0 for v in figures["large"]["seconds_per_epoch"].values())
    rounds = figures["large"]["rounds"]
    assert figures["large_epoch_vs_matmul_bound"] == pytest.approx(
        rounds["cache epoch"][0] / rounds["matrix products"][0]
    )
    # even on 585 digits, two ResNet-32 forwards per batch cost far more than a cached epoch
    assert figures["backbones_vs_cache"] > 10
    assert list(tmp_path.glob("ffn-bench-stage2-*")) == []  # the synthetic caches are removed


def test_bench_cache_compares_extraction_with_a_plain_forward(tmp_path):
    import json

    result = run_ffn(
        "bench",
        "cache",
        "configs/demo.yaml",
        f"data.root={tmp_path / 'demo'}",
        "cache.train_views=1",
        *("--rounds", "1", "--work-dir", tmp_path, "--json-out", tmp_path / "c.json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads((tmp_path / "c.json").read_text())
    assert figures["images"] == 585 + 300
    assert all(v > 0 for v in figures["images_per_s"].values())
    # fp16 payload of both branches plus labels, indices and headers
    assert figures["rows_x_dims_x_bytes"] == 885 * 64 * 2 * 2
    assert 1.0 < figures["size_vs_payload"] < 1.2


def test_median_ratio_pairs_the_rounds():
    # per-round ratios 2, 3, 4: the median pairs each round with its own, not medians with medians
    assert median_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])


GPU_BENCH_ON_CPU = """
import json, sys
sys.modules["nvidia.dali.plugin.pytorch"] = None  # a CUDA image without DALI
from ffn_dist.bench.gpu import bench_gpu
print("FIGURES", json.dumps(bench_gpu(images=10, batch_size=2, steps=1, rounds=1, allow_cpu=True)))
"""


def test_the_gpu_bench_code_runs_through_on_the_cpu_without_dali():
    """`ffn bench gpu` only means something on a GPU, which CI has not; its code still runs
    here, so the GPU check cannot fail on a slip when a device is lent."""
    command = [sys.executable, "-c", GPU_BENCH_ON_CPU]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.split("FIGURES ", 1)[1])
    assert figures["dali_mixed_img_s"] is None and "nvidia.dali" in figures["dali_missing"]
    assert figures["stage1"]["loader"] == "torch" and figures["stage1"]["loader_fed_img_s"] > 0
    assert figures["cache"]["cache_vs_plain"] > 0 and figures["cache"]["size_vs_payload"] >= 1.0
