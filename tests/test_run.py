"""`ffn run` on the demo config from a clean directory: the README's main job, shortened."""

import json
import shutil
from pathlib import Path

import yaml

from tests.conftest import REPO, run_ffn

SHORT = ["stage1.epochs=1", "stage1.eval_every=1", "stage1.checkpoint_every=1", "data.batch_size=32"]


def test_run_demo_writes_dataset_trains_stage1_and_skips_it_when_complete(tmp_path):
    shutil.copy(REPO / "configs" / "demo.yaml", tmp_path / "demo.yaml")
    result = run_ffn("run", "demo.yaml", *SHORT, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "demo"
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["data"]["batch_size"] == 32 and resolved["stage1"]["epochs"] == 1
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["splits"]["train"]["samples"] == 585 and report["splits"]["test"]["samples"] == 300
    assert (tmp_path / "data" / "demo" / "train.txt").is_file()  # the built-in data was written
    assert "| train | 585 | 10 |" in result.stdout
    for branch in ("ce", "kps"):
        stage1 = json.loads((run_dir / "stage1" / branch / "report.json").read_text())
        assert stage1["test"]["samples"] == 300
        assert f"| {branch.upper()} | " in result.stdout
    again = run_ffn("run", "demo.yaml", *SHORT, cwd=tmp_path)
    assert again.returncode == 0 and "stage 1: complete" in again.stdout and "skipped" in again.stdout


def test_run_refuses_bad_config_with_one_line_and_writes_nothing(tmp_path):
    config = Path(tmp_path / "bad.yaml")
    config.write_text("data:\n  batch_sise: 8\n")
    result = run_ffn("run", config, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {config}: data.batch_sise: unknown key (did you mean 'data.batch_size'?); "
        "valid keys here: root, builtin, train_split, val_split, test_split, num_classes, backend, "
        "train_crop, image_size, resize_size, color_jitter, mean, std, batch_size, num_threads, "
        "on_bad_image"
    )
    assert not (tmp_path / "runs").exists()
