"""`ffn run` on the demo config from a clean directory: the README's main job, shortened."""

import json
import shutil
from pathlib import Path

import yaml

from tests.conftest import REPO, run_ffn

SHORT = [
    "stage1.epochs=1",
    "stage1.eval_every=1",
    "stage1.checkpoint_every=1",
    "data.batch_size=32",
    "cache.train_views=2",
    "stage2.epochs=2",
]


def test_run_demo_end_to_end_then_skips_every_complete_stage(tmp_path):
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
    manifest = json.loads((run_dir / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 2 * 585 and manifest["splits"]["test"]["rows"] == 300
    final = json.loads((run_dir / "report" / "report.json").read_text())
    assert list(final["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert all(m["samples"] == 300 for m in final["methods"].values())
    assert (run_dir / "report" / "per_class.png").stat().st_size > 1000
    for method in final["methods"]:  # the final table ends the output
        assert f"| {method} | " in result.stdout.split("test accuracy (%), demo:")[-1]
    again = run_ffn("run", "demo.yaml", *SHORT, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for skipped in (
        "stage1: complete, skipped",
        "cache: complete, skipped",
        "classifier ffn/kps0.50_ce0.50: complete, skipped",
    ):
        assert skipped in again.stdout
    assert json.loads((run_dir / "report" / "report.json").read_text())["methods"] == final["methods"]
    # a cache setting changed: the cache and every stage after it run again, saying why
    views = run_ffn("run", "demo.yaml", *SHORT, "cache.train_views=1", cwd=tmp_path)
    assert views.returncode == 0, views.stderr[-3000:]
    assert "stage1: complete, skipped" in views.stdout
    assert "cache: runs again (stale: cache.train_views: 2 when it ran, 1 now)" in views.stdout
    stale = "classifier ffn/kps0.50_ce0.50: runs again (stale: cache output cache/manifest.json: "
    assert stale in views.stdout
    assert json.loads((run_dir / "cache" / "manifest.json").read_text())["splits"]["train"]["rows"] == 585


def test_run_refuses_bad_config_with_one_line_and_writes_nothing(tmp_path):
    config = Path(tmp_path / "bad.yaml")
    config.write_text("data:\n  batch_sise: 8\n")
    result = run_ffn("run", config, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: {config}: data.batch_sise: unknown key (did you mean 'data.batch_size'?); "
        "valid keys here: root, builtin, train_split, val_split, test_split, num_classes, backend, "
        "train_crop, image_size, resize_size, color_jitter, mean, std, batch_size, num_threads, "
        "on_bad_image, memory_limit_gb"
    )
    assert not (tmp_path / "runs").exists()


def test_a_stage_alone_in_an_empty_directory_records_the_splits_it_read(tmp_path):
    """The README's "one stage alone" row: the built-in data is written before the record is
    begun, so the record holds the splits' contents and the same command continues from it."""
    args = ["train-backbones", "demo", *SHORT]
    first = run_ffn(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = json.loads((tmp_path / "runs" / "demo" / "stages" / "stage1.json").read_text())
    hashes = {k: v for k, v in record["inputs"].items() if k.endswith("sha256")}
    assert set(hashes) == {"data.train_split (train.txt) sha256", "data.test_split (test.txt) sha256"}
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in hashes.values())  # real digests, no "missing"
    assert record["status"] == "complete"
    again = run_ffn(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout and "another config" not in again.stderr
    (tmp_path / "data" / "demo" / "test.txt").unlink()
    missing = run_ffn("status", "demo", *SHORT, cwd=tmp_path)
    assert (
        "stage1      stale: " in missing.stdout
        and "test.txt: split file not found (data.test_split)" in missing.stdout
    )
