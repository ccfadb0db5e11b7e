"""One run directory, one job; a stopped job leaves nothing running. Real processes throughout."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml

from ffn_dist import rundir
from ffn_dist.checkpoint import list_checkpoints
from ffn_dist.config import load_config
from ffn_dist.run.stages import stage_identity
from ffn_dist.rundir import RunDirHeld, hold_path, take_hold
from ffn_dist.stopping import GRACE_S
from tests.conftest import CONFIG, REPO, run_ffn, tiny_overrides

ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop(rundir.TOKEN_ENV, None)


@pytest.fixture(autouse=True)
def no_inherited_hold(monkeypatch):
    monkeypatch.delenv(rundir.TOKEN_ENV, raising=False)


def ffn_process(*args, log):
    cmd = [sys.executable, "-m", "ffn_dist.cli", *map(str, args)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)


def wait_for(condition, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def checkpoint_hashes(out):
    return {
        torch.load(path, weights_only=True)["config_hash"]
        for branch in ("ce", "kps")
        for _, path in list_checkpoints(out / "stage1" / branch)
    }


# ----------------------------------------------------------------------------- the hold itself
def test_a_held_directory_is_refused_naming_the_holder(tmp_path):
    hold = take_hold(tmp_path, "ffn train-backbones demo")
    try:
        os.environ.pop(rundir.TOKEN_ENV)  # as another job would be
        with pytest.raises(RunDirHeld) as info:
            take_hold(tmp_path, "ffn run demo")
        message = str(info.value)
        assert f"in use by `ffn train-backbones demo` (pid {os.getpid()} on host" in message
        assert "since 20" in message and "give this job another output_dir" in message
        assert info.value.exit_status == 1
        joined = take_hold(tmp_path, "ffn cache-features demo", token=hold.token)  # part of the job
        assert not joined.owner
    finally:
        hold.release()
    assert not hold_path(tmp_path).exists()


def test_a_dead_holder_is_taken_over_saying_why(tmp_path, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"host": os.uname().nodename, "pid": gone.pid, "command": "ffn run demo", "token": "old"}
    now = time.time()
    hold_path(tmp_path).write_text(json.dumps({**record, "since": now, "heartbeat": now}))
    take_hold(tmp_path, "ffn run demo").release()
    out = capsys.readouterr().out
    assert f"taking over from `ffn run demo` (pid {gone.pid}" in out and f"process {gone.pid} is gone" in out


def test_across_hosts_the_heartbeat_decides(tmp_path, capsys):
    now = time.time()
    record = {"host": "another-node", "pid": 1, "command": "ffn run demo", "token": "x", "since": now - 999}
    hold_path(tmp_path).write_text(json.dumps({**record, "heartbeat": now - 10}))
    with pytest.raises(RunDirHeld, match="pid 1 on host another-node"):
        take_hold(tmp_path, "ffn run demo")
    hold_path(tmp_path).write_text(json.dumps({**record, "heartbeat": now - rundir.STALE_AFTER_S - 5}))
    take_hold(tmp_path, "ffn run demo").release()
    out = capsys.readouterr().out
    assert (
        f"no heartbeat for {rundir.STALE_AFTER_S + 5:.0f} s (the limit is {rundir.STALE_AFTER_S:.0f} s)"
        in out
    )


def test_read_only_commands_need_no_hold(tmp_path, demo_root):
    hold = take_hold(tmp_path / "run", "ffn run demo")
    try:
        shown = run_ffn("show-config", "demo", f"output_dir={tmp_path / 'run'}")
        assert shown.returncode == 0 and f"output_dir: {tmp_path / 'run'}" in shown.stdout
        stats = run_ffn("splits", "stats", demo_root / "train.txt", "--json")
        assert stats.returncode == 0 and json.loads(stats.stdout)["samples"] == 585
    finally:
        hold.release()


# ----------------------------------------------------------------------------- jobs on one directory
def test_two_jobs_started_together_one_runs_and_the_directory_is_its_alone(tiny_root, tmp_path):
    out = tmp_path / "run"
    logs = [open(tmp_path / f"job{i}.log", "w+") for i in range(2)]
    lrs = ("0.1", "0.01")  # a second job with another config
    jobs = [
        ffn_process("train-backbones", CONFIG, *tiny_overrides(tiny_root, out), f"stage1.lr={lr}", log=log)
        for lr, log in zip(lrs, logs, strict=True)
    ]
    codes = [job.wait(timeout=600) for job in jobs]
    assert sorted(codes) == [0, 1], codes
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    logs[loser].seek(0)
    refusal = logs[loser].read()
    assert refusal.count("error:") == 1 and f"error: {out}: in use by `ffn train-backbones" in refusal
    assert f"pid {jobs[winner].pid} on host" in refusal
    # what the lone holder writes: its config, every checkpoint from it
    cfg = load_config(CONFIG, [*tiny_overrides(tiny_root, out), f"stage1.lr={lrs[winner]}"])
    assert yaml.safe_load((out / "config.yaml").read_text())["stage1"]["lr"] == float(lrs[winner])
    assert checkpoint_hashes(out) == {stage_identity(cfg, "stage1")}
    assert not hold_path(out).exists()


def test_a_holder_killed_with_sigkill_is_taken_over_and_the_run_resumes(tiny_root, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_root, out, "stage1.epochs=3")
    with open(tmp_path / "first.log", "w") as log:
        first = ffn_process("train-backbones", CONFIG, *args, log=log)
        wait_for(lambda: list_checkpoints(out / "stage1" / "kps"), "a checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads(hold_path(out).read_text())["pid"] == first.pid  # left behind
    again = run_ffn("train-backbones", CONFIG, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (
        "taking over from `ffn train-backbones" in again.stdout
        and f"process {first.pid} is gone" in again.stdout
    )
    assert "resuming from" in again.stdout
    assert list_checkpoints(out / "stage1" / "kps")[-1][0] == 3 and not hold_path(out).exists()


def test_two_torchrun_jobs_of_two_processes(tiny_root, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "ffn_dist.cli", "train-backbones", str(CONFIG), *tiny_overrides(tiny_root, out)]
    logs = [open(tmp_path / f"job{i}.log", "w+") for i in range(2)]
    jobs = [subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO) for log in logs]
    codes = [job.wait(timeout=600) for job in jobs]
    assert sorted(c == 0 for c in codes) == [False, True], codes
    loser = codes.index(next(c for c in codes if c != 0))
    logs[loser].seek(0)
    text = logs[loser].read()
    assert text.count(f"error: {out}: in use by `ffn train-backbones") == 2  # both of its ranks refused
    assert "[ce] epoch" not in text and "[kps] epoch" not in text  # and neither trained
    cfg = load_config(CONFIG, tiny_overrides(tiny_root, out))
    assert checkpoint_hashes(out) == {stage_identity(cfg, "stage1")} and not hold_path(out).exists()


# ----------------------------------------------------------------------------- stopping
def job_processes(root: psutil.Process) -> list[psutil.Process]:
    return [root, *root.children(recursive=True)]


@pytest.mark.parametrize("stage", ["stage1", "cache"])
def test_sigterm_to_ffn_run_stops_the_whole_job_and_a_rerun_completes(tiny_root, tmp_path, stage):
    out = tmp_path / "run"
    views = 64 if stage == "cache" else 2  # enough work to be caught in the middle of it
    args = tiny_overrides(
        tiny_root, out, "stage1.epochs=3", "stage1.log_every=1", f"cache.train_views={views}"
    )
    args += ["stage2.epochs=1", "cache.batch_size=8"]
    with open(tmp_path / "run.log", "w+") as log:
        job = ffn_process("run", CONFIG, *args, "dist.nproc=2", log=log)
        if stage == "stage1":
            wait_for(lambda: list_checkpoints(out / "stage1" / "kps"), "stage 1 under way")
        else:
            wait_for(lambda: (out / "stages" / "cache.json").is_file(), "the cache under way")
        processes = job_processes(psutil.Process(job.pid))
        assert len(processes) >= 4  # ffn run, torchrun, its two workers
        job.send_signal(signal.SIGTERM)  # to the parent only, as timeout or docker stop do
        assert job.wait(timeout=GRACE_S + 30) == 128 + signal.SIGTERM
        log.seek(0)
        text = log.read()
    assert "stopped by SIGTERM; rerun the same command to resume" in text
    if stage == "stage1":  # its workers got the SIGTERM too: they checkpointed mid-epoch, as for USR2
        assert "stop requested: checkpointed at epoch" in text, text[-3000:]
    else:
        assert "cache: complete" not in text, text[-3000:]
    time.sleep(1)
    alive = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], text[-3000:]
    assert not hold_path(out).exists()
    again = run_ffn("run", CONFIG, *args, "dist.nproc=2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    if stage == "stage1":
        assert "resuming from" in again.stdout
    else:
        assert "stage1: complete, skipped" in again.stdout and "shards already complete" in again.stdout
    assert (out / "report" / "report.json").is_file()


def test_ffn_run_killed_with_sigkill_takes_its_processes_along(tiny_root, tmp_path):
    """SIGKILL cannot be passed on: the torchrun group asked Linux for SIGTERM when its parent
    dies, so it stops (stage 1 checkpoints) and nothing keeps writing into the run."""
    out = tmp_path / "run"
    args = [*tiny_overrides(tiny_root, out, "stage1.epochs=3", "stage1.log_every=1"), "stage2.epochs=1"]
    with open(tmp_path / "run.log", "w+") as log:
        job = ffn_process("run", CONFIG, *args, "dist.nproc=2", log=log)
        wait_for(lambda: list_checkpoints(out / "stage1" / "kps"), "stage 1 under way")
        processes = job_processes(psutil.Process(job.pid))
        job.send_signal(signal.SIGKILL)
        job.wait()
    gone, alive = psutil.wait_procs(processes[1:], timeout=GRACE_S + 30)
    assert alive == [], [p.cmdline() for p in alive]
    again = run_ffn("run", CONFIG, *args, "dist.nproc=2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "taking over from `ffn run" in again.stdout and f"process {job.pid} is gone" in again.stdout
    assert "resuming from" in again.stdout and (out / "report" / "report.json").is_file()
