"""Stage 1 with real torchrun processes over gloo, on a tiny long-tailed subset."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from ffn_dist.checkpoint import list_checkpoints
from tests.conftest import REPO, run_ffn, run_torchrun, tiny_overrides

WORKER = Path(__file__).parent / "workers" / "stage1_replicas.py"
STATE_WORKER = Path(__file__).parent / "workers" / "resumed_state.py"
RELEASED_WORKER = Path(__file__).parent / "workers" / "engines_released.py"


def report(out, branch):
    return json.loads((out / "stage1" / branch / "report.json").read_text())


def final_weights(out, branch, epoch):
    state = torch.load(out / "stage1" / branch / f"epoch_{epoch:04d}.pt", weights_only=True)
    return state["model"]


@pytest.mark.parametrize("backend", ["torch", "memory"])  # augmentations: functions of (seed, epoch, sample)
def test_one_process_trains_both_branches_and_resume_equals_uninterrupted(tiny_root, tmp_path, backend):
    out = tmp_path / "run"
    args = tiny_overrides(
        tiny_root, out, f"data.backend={backend}", "stage1.epochs=3", "stage1.keep_checkpoints=5"
    )
    result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[ce] epoch 3 test:" in result.stdout and "[kps] epoch 3 test:" in result.stdout
    for branch in ("ce", "kps"):
        assert [e for e, _ in list_checkpoints(out / "stage1" / branch)] == [1, 2, 3]
        assert report(out, branch)["test"]["samples"] == 61
    uninterrupted = {b: final_weights(out, b, 3) for b in ("ce", "kps")}
    # interrupt after epoch 2: drop the last checkpoint, rerun, and it retrains only epoch 3
    for branch in ("ce", "kps"):
        (out / "stage1" / branch / "epoch_0003.pt").unlink()
    result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[ce] resuming from" in result.stdout and "epoch 1/3" not in result.stdout
    for branch in ("ce", "kps"):
        resumed = final_weights(out, branch, 3)
        for key, value in uninterrupted[branch].items():
            assert torch.equal(resumed[key], value), f"{branch}: {key} differs after resume"


def test_one_branch_alone_trains_exactly_as_beside_the_other(tiny_root, tmp_path):
    """`--branch kps` (for ablations): the same weights as the KPS branch of a full run."""
    runs = {}
    for name, extra in (("both", []), ("kps", ["--branch", "kps"])):
        out = tmp_path / name
        args = tiny_overrides(tiny_root, out, "stage1.epochs=1")
        result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = out
    assert not (runs["kps"] / "stage1" / "ce").exists()
    alone, beside = final_weights(runs["kps"], "kps", 1), final_weights(runs["both"], "kps", 1)
    assert all(torch.equal(alone[key], beside[key]) for key in beside)
    assert report(runs["kps"], "kps")["test"] == report(runs["both"], "kps")["test"]


def run_files(out):
    """Every file of a run and when it was written (the hold's own files aside)."""
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".hold")}


def test_a_run_of_another_config_is_refused_before_anything_trains(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_root, out, "stage1.epochs=1")
    assert run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args).returncode == 0
    before = run_files(out)
    result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args, "stage1.lr=0.05")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (
        "its stage-1 checkpoints come from another config: stage1.lr: 0.1 in the run, 0.05 now"
        in result.stderr
    )
    assert run_files(out) == before  # nothing written, for either branch: not even config.yaml
    # a run without its stage record: each branch's checkpoint still refuses another config
    (out / "stages" / "stage1.json").unlink()
    result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args, "stage1.lr=0.05")
    assert result.returncode == 2
    assert "written by a different config" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "nproc, kps_ranks, backend, batch",
    [(1, "null", "memory", 16), (2, "null", "dali", 16), (4, "null", "memory", 16), (4, "3", "torch", 48)],
)
def test_groups_are_data_parallel_only_inside_themselves(
    tiny_root, tmp_path, nproc, kps_ranks, backend, batch
):
    out = tmp_path / "run"
    run_torchrun(
        nproc,
        WORKER,
        tmp_path,
        *tiny_overrides(
            tiny_root,
            out,
            "stage1.epochs=1",
            f"branches.kps.processes={kps_ranks}",
            f"data.backend={backend}",
            f"data.batch_size={batch}",  # a global batch each group splits evenly
        ),
        timeout=600,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    kps_count = nproc // 2 if kps_ranks == "null" else int(kps_ranks)
    # one process trains both branches, one after the other
    expected_sizes = (1, 1) if nproc == 1 else (nproc - kps_count, kps_count)
    ce = [r["ce"] for r in ranks if "ce" in r]
    kps = [r["kps"] for r in ranks if "kps" in r]
    assert (len(ce), len(kps)) == expected_sizes
    assert len({r["all"] for r in ce}) == 1 and len({r["all"] for r in kps}) == 1  # replicas equal
    assert ce[0]["trunk"] != kps[0]["trunk"]  # the groups train apart
    # every group evaluated the whole test split once, padding dropped
    assert report(out, "ce")["test"]["samples"] == report(out, "kps")["test"]["samples"] == 61
    for branch in ("ce", "kps"):  # each image's confidence gathered with it, once
        assert sum(report(out, branch)["test"]["calibration"]["reliability"]["count"]) == 61


def test_killed_worker_restarts_and_resumes_under_max_restarts(tiny_root, tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=2",
        "-m",
        "ffn_dist.cli",
        "train-backbones",
        str(REPO / "configs" / "demo.yaml"),
        *tiny_overrides(tiny_root, out, "stage1.epochs=5"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(tmp_path / "log.txt", "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while not list_checkpoints(out / "stage1" / "kps") and time.time() < deadline:
            time.sleep(0.2)
        assert list_checkpoints(out / "stage1" / "kps"), "no checkpoint appeared"
        workers = [
            p
            for p in psutil.Process(job.pid).children(recursive=True)
            if "ffn_dist.cli" in " ".join(p.cmdline())
        ]
        assert workers
        workers[-1].send_signal(signal.SIGKILL)
        assert job.wait(timeout=600) == 0
    text = (tmp_path / "log.txt").read_text()
    assert "resuming from" in text, text[-3000:]
    for branch in ("ce", "kps"):
        assert list_checkpoints(out / "stage1" / branch)[-1][0] == 5
        assert report(out, branch)["epochs"] == 5


def run_replicas(tiny_root, out, *extra):
    out.mkdir(exist_ok=True)
    result = run_torchrun(4, WORKER, out, *tiny_overrides(tiny_root, out / "run", *extra), timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    for branch in ("ce", "kps"):
        assert len({r[branch]["all"] for r in ranks if branch in r}) == 1  # replicas equal
    weights = {b: torch.load(out / f"{b}.pt", weights_only=True) for b in ("ce", "kps")}
    return weights, result.stdout


def assert_same_weights(expected, actual, rtol=1e-4, atol=1e-5):
    for branch in ("ce", "kps"):
        for key, value in expected[branch].items():
            other = actual[branch][key]
            assert torch.allclose(value.double(), other.double(), rtol=rtol, atol=atol), f"{branch}.{key}"


def test_ddp_and_deepspeed_zero_0_1_2_give_the_same_weights(tiny_root, tmp_path):
    ddp, _ = run_replicas(tiny_root, tmp_path / "ddp", "stage1.epochs=1")
    for stage in (0, 1, 2):
        deepspeed, _ = run_replicas(
            tiny_root,
            tmp_path / f"zero{stage}",
            "stage1.epochs=1",
            "dist.engine=deepspeed",
            f"dist.zero_stage={stage}",
        )
        assert_same_weights(ddp, deepspeed)


def test_deepspeed_zero2_resumes_exactly_from_its_checkpoint(tiny_root, tmp_path):
    # the torch backend: its augmentations are a function of (seed, epoch, sample), as DALI's are not
    args = ("stage1.epochs=2", "dist.engine=deepspeed", "dist.zero_stage=2", "data.backend=torch")
    full, _ = run_replicas(tiny_root, tmp_path / "a", *args)
    kps_dir = tmp_path / "a" / "run" / "stage1" / "kps"
    assert sorted(p.name for p in kps_dir.glob("epoch_0002*")) == ["epoch_0002.pt"]  # one file, whole
    for branch in ("ce", "kps"):
        (tmp_path / "a" / "run" / "stage1" / branch / "epoch_0002.pt").unlink()  # "killed" before it
    resumed, log = run_replicas(tiny_root, tmp_path / "a", *args)
    assert "[kps] resuming from" in log and "epoch_0001.pt" in log
    assert_same_weights(full, resumed, rtol=0, atol=1e-6)


def test_deepspeed_engines_and_their_groups_are_released_when_stage1_returns(tiny_root, tmp_path):
    """ZeRO's gradient hooks (held from autograd's C++ side) and DeepSpeed's global mpu kept
    every engine and its process groups alive until interpreter teardown, where gloo's threads
    were destroyed in arbitrary order and now and then aborted a finished worker (SIGABRT)."""
    args = tiny_overrides(tiny_root, tmp_path / "run", "stage1.epochs=1", "dist.engine=deepspeed")
    result = subprocess.run(
        [sys.executable, str(RELEASED_WORKER), *args, "dist.zero_stage=2"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def assert_state_is_the_checkpoints(resumed_file, checkpoint_file):
    resumed = torch.load(resumed_file, weights_only=True)
    saved = torch.load(checkpoint_file, weights_only=True)
    assert tuple(resumed["position"]) == (saved["epoch"], 0)
    for key, value in saved["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    momentum = saved["optimizer"]["state"]
    assert momentum and momentum.keys() == resumed["optimizer"]["state"].keys()
    for index, entry in momentum.items():
        assert torch.equal(resumed["optimizer"]["state"][index]["momentum_buffer"], entry["momentum_buffer"])


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_deepspeed_zero_checkpoints_load_on_another_process_count(tiny_root, tmp_path, zero_stage):
    """A ZeRO checkpoint holds whole tensors: written by groups of 2 ranks it loads into groups
    of 1, and written by those, into groups of 2, each time exactly the state that was saved."""
    out = tmp_path / "run"
    args = tiny_overrides(tiny_root, out, "dist.engine=deepspeed", f"dist.zero_stage={zero_stage}")
    run_torchrun(4, STATE_WORKER, tmp_path, *args, timeout=600)  # 2 ranks a branch: partitioned
    for branch in ("ce", "kps"):
        (out / "stage1" / branch / "epoch_0002.pt").unlink()  # stopped after epoch 1
    for nproc, resumed_from in ((2, 1), (4, 2)):  # epoch 2 is then trained by groups of 1
        log = run_torchrun(nproc, STATE_WORKER, tmp_path, *args, timeout=600).stdout
        assert f"on {nproc // 2} process(es)" in log
        for branch in ("ce", "kps"):
            checkpoint = out / "stage1" / branch / f"epoch_{resumed_from:04d}.pt"
            assert_state_is_the_checkpoints(tmp_path / f"{branch}_resumed.pt", checkpoint)
            assert list_checkpoints(out / "stage1" / branch)[-1][0] == 2


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_root, out, "stage1.epochs=2")
    assert run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args).returncode == 0
    newest = out / "stage1" / "ce" / "epoch_0002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # as if the disk had lost its end
    result = run_ffn("train-backbones", REPO / "configs" / "demo.yaml", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning: skipping" in result.stdout and "epoch_0002.pt: cannot be loaded safely" in result.stdout
    assert f"[ce] resuming from {out / 'stage1' / 'ce' / 'epoch_0001.pt'}" in result.stdout
    assert torch.load(newest, weights_only=True)["epoch"] == 2  # retrained and rewritten
