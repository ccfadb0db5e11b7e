"""The benchmarks run and print their tables (their figures are for the README, not asserted)."""

import json
import os
import subprocess
import sys

import pytest

from ffn_dist.bench.accuracy import summarise_runs
from ffn_dist.bench.timing import interleaved_runs, median_ratio
from ffn_dist.tables import over_seeds, spread
from tests.conftest import REPO, run_ffn
from tests.test_run import SHORT


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
    cifar_like, large = figures["results"]
    assert cifar_like["memory_img_s"] > 0 and cifar_like["memory_vs_dali"] > 0
    assert large["memory_img_s"] is None  # random-resized crops are not the memory backend's


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
        "end to end (memory loader)",
        "memory loader alone",
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
    assert figures["torch_vs_written_out"] == pytest.approx(
        rounds["torch step"][0] / rounds["cache epoch"][0]
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
    # the payload of both branches (train fp16, test fp32) plus labels, indices and headers
    assert figures["rows_x_dims_x_bytes"] == 585 * 64 * 2 * 2 + 300 * 64 * 2 * 4
    assert 1.0 < figures["size_vs_payload"] < 1.2


def test_bench_freshness_times_status_and_a_rerun_of_a_complete_run(tmp_path):
    result = run_ffn(
        "bench", "freshness", "--cache-gb", "0.02", "--dims", "64", "--rounds", "1",
        "--work-dir", tmp_path / "work", "--json-out", tmp_path / "f.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "f.json").read_text())
    assert 0.015e9 < figures["cache_bytes"] < 0.03e9
    assert set(figures["seconds"]) == {"ffn status", "ffn status --verify", "ffn run (complete run)"}
    assert all(v > 0 for v in figures["seconds"].values())
    status = run_ffn("status", tmp_path / "work" / "config.yaml")  # the run it built is complete
    assert status.returncode == 0 and status.stdout.count(" complete") == 5, status.stdout


def test_bench_scale_converts_the_split_and_times_stage2_on_the_shape(tmp_path):
    result = run_ffn(
        "bench", "scale", "--rows", "20000", "--dims", "32", "--classes", "300", "--split-images", "20000",
        "--work-dir", tmp_path, "--json-out", tmp_path / "s.json",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((tmp_path / "s.json").read_text())
    assert figures["splits"]["train_images"] == 20_000 and figures["splits"]["classes"] == 300
    assert figures["splits"]["per_class"] == [2, 1000]
    assert figures["stage2"]["cache_bytes_per_view"] > 20000 * 32 * 2 * 2
    assert figures["stage2"]["epoch_seconds"] > 0 and figures["stage2"]["peak_rss_gb"] > 0


def test_warm_up_rounds_are_run_and_left_out():
    calls = {"a": 0, "b": 0}

    def counter(name):
        def run():
            calls[name] += 1
            return float(calls[name])

        return run

    runs = interleaved_runs({"a": counter("a"), "b": counter("b")}, rounds=2, warmup=1)
    assert runs == {"a": [2.0, 3.0], "b": [2.0, 3.0]} and calls == {"a": 3, "b": 3}


def test_median_ratio_pairs_the_rounds():
    # per-round ratios 2, 3, 4: the median pairs each round with its own, not medians with medians
    assert median_ratio([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])


def test_the_gpu_check_runs_through_on_the_cpu_without_dali(tmp_path):
    """scripts/gpu_check.sh only means something on a GPU, which CI has not; its code still
    runs here, with DALI hidden as on a stock CUDA image, so it cannot fail on a slip the day
    a device is lent. This includes the demo with 2 processes on fewer GPUs than processes'
    layout logic (tests/test_layout.py) and every part's JSON."""
    hide_dali = tmp_path / "nodali"  # every Python the check starts imports this first
    hide_dali.mkdir()
    (hide_dali / "sitecustomize.py").write_text("import sys\nsys.modules['nvidia.dali'] = None\n")
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        PYTHONPATH=str(hide_dali),
        OUT=str(tmp_path / "out"),
        GPU_CHECK_WORK=str(tmp_path / "work"),
        GPU_CHECK_ALLOW_CPU="1",
        GPU_CHECK_IMAGES="10",
        GPU_CHECK_BATCH="2",
        GPU_CHECK_STEPS="1",
        GPU_CHECK_ROUNDS="1",
        GPU_CHECK_STAGE2_ROWS="2000",
        GPU_CHECK_DEMO_ARGS=" ".join(SHORT),
        CIFAR_ARCHIVE=str(tmp_path / "absent.tar.gz"),
        OMP_NUM_THREADS="1",
    )

    def gpu_check(call: str, timeout: int):
        script = ["bash", REPO / "scripts" / "gpu_check.sh", call]
        return subprocess.run(script, capture_output=True, text=True, timeout=timeout, env=env)

    result = gpu_check("acceptance", 900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = {p.name for p in (tmp_path / "out").iterdir()}  # what a device call brings back: few files
    logs = {f"{part}.log" for part in ("jpegs", "stage1", "cache", "stage2", "demo")}
    assert out == {*logs, "gpu_check_acceptance.json", "nvidia-smi.txt"}
    check = json.loads((tmp_path / "out" / "gpu_check_acceptance.json").read_text())
    assert {name: part["status"] for name, part in check["parts"].items()} == {
        part: "completed" for part in ("jpegs", "stage1", "cache", "stage2", "demo")
    }
    assert check["jpegs"]["images"] == 10 and len(list((tmp_path / "work" / "jpegs").glob("*.jpg"))) == 10
    machine = check["machine"]
    assert 1 <= machine["cores_usable"] <= machine["cores"] and machine["dev_shm_bytes"] > 0
    assert "nvidia.dali" in check["dali_missing"]
    stage1 = check["stage1"]
    assert stage1["loader"] == "torch" and stage1["dali_mixed_img_s"] is None
    assert stage1["bare_img_s"] > 0 and stage1["synthetic_img_s"] > 0 and stage1["loader_fed_img_s"] > 0
    assert stage1["stage1_vs_bare"] > 0 and stage1["step_profile"]["ms_per_step"]
    assert check["cache"]["cache_vs_plain"] > 0 and check["cache"]["size_vs_payload"] >= 1.0
    assert check["stage2"]["large"]["rows"] == 2000 and check["stage2"]["large_epoch_vs_matmul_bound"] > 0
    assert set(check["demo"]["top1"]) == {"CE", "KPS", "FFN (kps 0.5, ce 0.5)"}
    assert check["demo"]["wall_s"] >= 0
    assert "| FFN (kps 0.5, ce 0.5) |" in check["demo"]["table"]
    # the second call, the paper schedule alone: without the archive it fails saying where it
    # looked, and an older run's figures left in the work directory are not reported as its own
    stale = tmp_path / "work" / "accuracy" / "paper" / "accuracy.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"figures": "from an older run"}))
    paper = gpu_check("paper", 300)
    assert paper.returncode == 1 and "no CIFAR-10 archive at" in paper.stderr and ".data/" in paper.stderr
    check = json.loads((tmp_path / "out" / "gpu_check_paper.json").read_text())
    assert check["parts"] == {"paper": {"status": "no_archive", "exit_status": None, "seconds": 0}}
    assert "paper" not in {k for k in check if k != "parts"} and not stale.exists()


def _accuracies(top1):
    return {
        "top1": top1,
        "top5": 90.0,
        "many": top1 + 5,
        "medium": top1 - 5,
        "few": None,
        "head": 1.0,
        "tail": 2.0,
    }


def _seed_run(seed, ffn, crt):
    """One seed's figures as `run_seed` records them (no training)."""
    rows = [
        {"method": m, "features": "fused", "fusion": {"kps": 0.9, "ce": 0.1},
         "chosen": {"selected_on": "val"}, "val": {"top1": v}, "test": _accuracies(t)}
        for m, t, v in (("ffn", ffn, 60.0), ("crt", crt, 61.0 + seed))
    ]  # fmt: skip
    return {
        "seed": seed,
        "train_counts": [3, 2, 1],
        "figures": {"CE": _accuracies(30.0 + seed), "KPS": _accuracies(20.0), "FFN": _accuracies(ffn)},
        "fusion": {"kps": 0.5, "ce": 0.5},
        "sweep": [
            {"fusion": {"kps": w, "ce": 1 - w}, **_accuracies(50.0 + 10 * w + seed)} for w in (0.0, 0.5, 1.0)
        ],
        "methods": {
            "selected_on": "val",
            "best_on_val": {"method": "crt", "features": "fused"},
            "rows": rows,
        },
        "seconds": {"stage1": 10.0, "total": 12.0},
    }


def test_bench_accuracy_over_seeds_reports_mean_std_per_seed_and_the_verdict():
    runs = [_seed_run(0, 57.0, 59.0), _seed_run(1, 58.0, 59.5), _seed_run(2, 59.0, 60.0)]
    body, markdown = summarise_runs("cpu", runs)
    ce = body["figures"]["CE"]["top1"]
    assert ce["values"] == [30.0, 31.0, 32.0] and ce["mean"] == 31.0 and ce["std"] == pytest.approx(1.0)
    assert body["figures"]["FFN"]["few"] is None  # CIFAR-10-LT has no few-shot class
    assert body["sweep_peak"] == {"kps": 1.0, "ce": 0.0} and not body["sweep_peaks_inside"]
    assert "| FFN (kps 0.5, ce 0.5) |" in markdown and "| kps | ce | test top-1 | per seed |" in markdown
    crt = next(r for r in body["methods"] if r["method"] == "crt")
    assert crt["vs_ffn"]["values"] == [2.0, 1.5, 1.0] and crt["vs_ffn"]["mean"] == pytest.approx(1.5)
    assert body["selected_on_val"]["per_seed"][0]["method"] == "crt"
    assert body["seconds"] == {"stage1": 30.0, "total": 36.0}
    assert "| CE | 31.00 ± 1.00 |" in markdown and "30.00, 31.00, 32.00" in markdown
    assert "crt, +1.50 ± 0.50 points" in markdown and "at least one point better" in markdown
    assert body["calibration"]["FFN"]["measured"] == pytest.approx(58.0)
    _, one = summarise_runs("cpu", runs[:1])
    assert "±" not in one.split("## The fusion sweep")[0]  # one seed: no spread to show


def test_spread_formats_mean_and_standard_deviation():
    assert spread(over_seeds([1.0, 2.0, 3.0])) == "2.00 ± 1.00"
    assert spread(over_seeds([0.5, 1.5]), signed=True) == "+1.00 ± 0.71"
    assert spread(over_seeds([2.0])) == "2.00" and spread(over_seeds([1.0, None])) == "-"
