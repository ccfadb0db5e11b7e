"""A run is one record: the config frozen when it starts, one stage list, one rule for what a
stage depends on, and failures that stop the run loudly. Real processes throughout: `ffn
run` with its torchrun children, `ffn submit` with the local executor, a tmpfs for a full
disk."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ffn_dist.bench.cache import fake_stage1
from ffn_dist.config import DataConfig, load_config
from ffn_dist.run.history import read_history
from ffn_dist.run.stages import NOT_INPUTS, STAGES, stage_identity, stage_inputs
from tests.conftest import CONFIG, REPO, cache_overrides, run_ffn, tiny_overrides

STAGE_ORDER = [stage.name for stage in STAGES]


def own_data(tiny_root, tmp_path) -> Path:
    """A private copy of the tiny split files (the images linked) that a test may edit."""
    return Path(shutil.copytree(tiny_root, tmp_path / "data", symlinks=True))


def stages_in_history(out: Path) -> list[str]:
    cfg = load_config(out / "config.yaml")
    return [line["stage"].split()[0] for line in read_history(cfg) if line["event"] == "complete"]


def output(result) -> str:
    return result.stdout + result.stderr


# ----------------------------------------------------------------------------- frozen config
@pytest.mark.parametrize("command", [["run"], ["submit", "--executor", "local"]], ids=["run", "submit"])
def test_a_started_run_ignores_edits_to_the_users_yaml(tiny_root, tmp_path, command):
    config = tmp_path / "cfg.yaml"
    shutil.copy(CONFIG, config)
    out = tmp_path / "run"
    args = cache_overrides(tiny_root, out, "stage1.epochs=3", "stage2.epochs=1", "cache.train_views=1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    job = subprocess.Popen(
        [sys.executable, "-m", "ffn_dist.cli", command[0], config, *args, *command[1:]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    deadline = time.time() + 300
    while not (out / "stage1" / "ce").is_dir():  # stage 1 under way
        assert time.time() < deadline and job.poll() is None, job.stdout.read()[-3000:]
        time.sleep(0.2)
    edited = config.read_text().replace("fusion: {kps: 0.5, ce: 0.5}", "fusion: {kps: 0.8, ce: 0.2}")
    assert edited != config.read_text()
    config.write_text(edited)  # the user prepares the next experiment
    log, _ = job.communicate(timeout=900)
    assert job.returncode == 0, log[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert not (out / "classifier" / "ffn" / "kps0.80_ce0.20").exists()
    frozen = yaml.safe_load((out / "config.yaml").read_text())
    assert frozen["stage2"]["fusion"] == {"kps": 0.5, "ce": 0.5} and frozen["stage1"]["epochs"] == 3
    # the report names the config behind it, kept in the run directory
    assert yaml.safe_load((out / "configs" / f"{report['config']}.yaml").read_text()) == frozen
    history = read_history(load_config(out / "config.yaml"))
    assert {line["config"] for line in history} == {report["config"]}
    # the same stages, in the same order, on one machine and as a chain of jobs
    assert stages_in_history(out) == STAGE_ORDER
    if command[0] == "submit":
        assert re.findall(r"submitted (\S+)\s+job", log) == ["data", "stage1", "cache", "classifier+evaluate"]


def test_history_keeps_every_config_a_run_started_with(stage1_run, tiny_root, tmp_path):
    out = Path(shutil.copytree(stage1_run, tmp_path / "run"))
    args = cache_overrides(tiny_root, out, "stage2.epochs=1")
    first = run_ffn("run", CONFIG, *args)
    assert first.returncode == 0, output(first)[-3000:]
    # a later stage's setting: allowed
    second = run_ffn("run", CONFIG, *args, "stage2.fusion.kps=0.7", "stage2.fusion.ce=0.3")
    assert second.returncode == 0, output(second)[-3000:]
    # another classifier, beside the first
    assert "[classifier ffn at kps 0.7, ce 0.3] test top-1" in second.stdout
    assert (out / "classifier" / "ffn" / "kps0.50_ce0.50" / "classifier.pt").is_file()
    history = read_history(load_config(out / "config.yaml"))
    configs = [line["config"] for line in history if line["event"] == "config"]
    assert len(set(configs)) == len(configs) >= 3  # stage 1's (another output_dir), then the two runs'
    assert all((out / "configs" / f"{c}.yaml").is_file() for c in configs)
    ran = {(line["stage"], line["config"]) for line in history if line["event"] == "complete"}
    assert ("stage1", configs[0]) in ran
    assert ("classifier ffn/kps0.50_ce0.50", configs[-2]) in ran
    assert ("classifier ffn/kps0.70_ce0.30", configs[-1]) in ran
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["config"] == configs[-1] and "FFN (kps 0.7, ce 0.3)" in report["methods"]


# ----------------------------------------------------------------------------- loud failures
def test_a_diverged_stage1_stops_the_run_at_its_last_finite_checkpoint(tiny_root, tmp_path):
    out = tmp_path / "run"
    # epoch 1 at lr 0.1, then lr 1e11: the loss leaves the finite numbers in epoch 2
    args = tiny_overrides(tiny_root, out, "stage1.lr_milestones=[1]", "stage1.lr_factors=[1e12]")
    result = run_ffn("run", CONFIG, *args)
    text = output(result)
    assert result.returncode != 0, text[-3000:]
    found = re.search(
        r"error: \[(ce|kps)\] the (loss is \S+|weights are not finite) at epoch 2, step \d+: training "
        r"diverged .*Last checkpoint with finite weights: (\S+), which a rerun resumes from",
        text,
    )
    assert found, text[-3000:]
    branch, last = found.group(1), Path(found.group(3))
    assert last == out / "stage1" / branch / "epoch_0001.pt"
    assert not (out / "stage1" / branch / "epoch_0002.pt").exists()  # nothing non-finite was kept
    weights = torch.load(last, weights_only=True)["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert "Traceback" not in text
    assert not (out / "cache").exists() and not (out / "classifier").exists()  # no later stage
    status = run_ffn("status", CONFIG, *args)
    assert status.returncode == 1
    assert re.search(rf"stage1\s+failed: \[{branch}\] the (loss is|weights are)", status.stdout), (
        status.stdout
    )
    again = run_ffn("run", CONFIG, *args)
    assert again.returncode != 0
    assert f"[{branch}] resuming from {last} at epoch 2" in again.stdout


def test_a_diverged_classifier_fails_and_writes_nothing(cached_run, tiny_root, tmp_path):
    out = Path(shutil.copytree(cached_run, tmp_path / "run", symlinks=True))
    args = cache_overrides(tiny_root, out, "stage2.lr=1e30")
    result = run_ffn("train-classifier", CONFIG, *args)
    assert result.returncode == 1, output(result)[-3000:]
    assert re.search(
        r"error: \[classifier ffn at kps 0.5, ce 0.5\] the loss is \S+ at epoch \d+: training diverged",
        result.stderr,
    )
    assert not (out / "classifier" / "ffn" / "kps0.50_ce0.50" / "classifier.pt").exists()
    status = run_ffn("status", CONFIG, *args)
    failed = "classifier ffn/kps0.50_ce0.50 failed: [classifier ffn at kps 0.5, ce 0.5] the loss is"
    assert status.returncode == 1 and failed in status.stdout


def test_the_cache_refuses_non_finite_embeddings(stage1_run, tiny_root, tmp_path):
    out = Path(shutil.copytree(stage1_run, tmp_path / "run", symlinks=True))
    checkpoint = out / "stage1" / "ce" / "epoch_0002.pt"
    state = torch.load(checkpoint, weights_only=True)
    state["model"]["backbone.conv1.weight"].fill_(float("nan"))
    torch.save(state, checkpoint)
    result = run_ffn("cache-features", CONFIG, *cache_overrides(tiny_root, out))
    assert result.returncode == 1, output(result)[-3000:]
    assert re.search(
        r"error: cache train view 0 images \d+\.\.: the ce embeddings are not finite", result.stderr
    )
    assert not list((out / "cache").rglob("*.safetensors")) and not (out / "cache" / "manifest.json").exists()


# ----------------------------------------------------------------------------- what a stage depends on
def test_stage1_refuses_a_split_file_rewritten_in_place(tiny_root, tmp_path):
    data = own_data(tiny_root, tmp_path)
    out = tmp_path / "run"
    args = tiny_overrides(data, out)
    assert run_ffn("train-backbones", CONFIG, *args).returncode == 0
    lines = (data / "train.txt").read_text().splitlines(keepends=True)
    zeros = [line for line in lines if line.split()[1] == "0"]
    (data / "train.txt").write_text("".join(line for line in lines if line not in zeros[:5]))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".hold" not in p.name}
    for command in ("train-backbones", "run"):
        result = run_ffn(command, CONFIG, *args)
        assert result.returncode == 2, output(result)[-3000:]
        assert re.search(
            r"its stage-1 checkpoints come from another config: data.train_split \(train.txt\) sha256: "
            r"'[0-9a-f]{16}' in the run, '[0-9a-f]{16}' now",
            result.stderr,
        ), result.stderr
        assert "resuming" not in result.stdout
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and ".hold" not in p.name}
    assert after == before  # refused before anything was written


def test_one_rule_makes_every_stage_identity(demo_root, tmp_path):
    data = Path(shutil.copytree(demo_root, tmp_path / "data"))
    base = [f"output_dir={tmp_path / 'run'}", f"data.root={data}", "data.builtin=null"]
    cfg = load_config(CONFIG, base)
    fake_stage1(cfg)  # the cache's inputs include stage 1's recorded outputs
    data_keys = {f"data.{f.name}" for f in dataclasses.fields(DataConfig)} - set(NOT_INPUTS)
    for stage in ("stage1", "cache"):
        settings = {k for k in stage_inputs(cfg, stage) if k.startswith("data.") and not k.endswith("sha256")}
        assert settings == data_keys, stage  # every data setting, for both: one rule
    ids = {stage: stage_identity(cfg, stage) for stage in ("stage1", "cache")}

    def identities(*overrides):
        changed = load_config(CONFIG, [*base, *overrides])
        return {stage: stage_identity(changed, stage) for stage in ids}

    moved = identities("data.color_jitter=0.1")
    assert all(moved[stage] != ids[stage] for stage in ids)
    assert identities("data.num_threads=7", "stage1.log_every=3") == ids  # speed and logging only
    assert identities("stage2.epochs=3")["cache"] == ids["cache"]  # a later stage's setting
    (data / "test.txt").write_text((data / "test.txt").read_text())  # written again, the same bytes
    assert identities() == ids
    lines = (data / "test.txt").read_text().splitlines(keepends=True)
    (data / "test.txt").write_text("".join(lines[1:]))  # same path, other contents
    rewritten = identities()
    assert all(rewritten[stage] != ids[stage] for stage in ids)


# ----------------------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A 10 MB tmpfs (root can mount one; where it cannot, the test says so and skips)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", mount], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", mount], check=True)


def test_a_full_disk_ends_the_run_with_one_line_per_process_and_the_rerun_resumes(tiny_root, small_disk):
    out = small_disk / "run"
    args = tiny_overrides(tiny_root, out, "stage1.epochs=4", "stage2.epochs=1", "cache.train_views=1")
    result = run_ffn("run", CONFIG, *args)
    text = output(result)
    assert result.returncode != 0, text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text, text[-3000:]
    assert re.search(r"error: \S+/epoch_000\d\.pt\S*: cannot be written: No space left on device", text), text
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert errors and all(line.count("\n") == 0 for line in errors)
    assert not list(out.rglob("*.tmp"))  # temporary files removed
    for checkpoint in out.rglob("epoch_*.pt"):  # what was complete is intact
        assert torch.load(checkpoint, weights_only=True)["epoch"] >= 1
    subprocess.run(["mount", "-o", "remount,size=200m", small_disk], check=True)
    again = run_ffn("run", CONFIG, *args)
    assert again.returncode == 0, output(again)[-3000:]
    assert "resuming from" in again.stdout
    assert json.loads((out / "report" / "report.json").read_text())["methods"]
