"""`ffn submit` against a real single-node SLURM, started by launchers/local_slurm.sh.

The cluster is started once for this module (Debian's slurmctld, slurmd and munge,
installed by the script when missing) and stopped by the pids it wrote. Where SLURM cannot
be installed (no root, no apt-get) the SLURM tests skip and say why; the dry-run and the
local-executor tests need no SLURM.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from ffn_dist.config import load_config
from ffn_dist.plan import time_limits
from tests.conftest import CONFIG, REPO, cache_overrides, run_ffn

SCRIPT = REPO / "launchers" / "local_slurm.sh"


@pytest.fixture(scope="module")
def slurm_env():
    # munged (user munge) must reach its socket: a directory others can traverse.
    directory = Path(tempfile.mkdtemp(prefix="ffn-slurm-"))
    directory.chmod(0o711)
    started = subprocess.run(
        ["bash", SCRIPT, "start", directory], capture_output=True, text=True, timeout=600
    )
    if started.returncode == 3:
        pytest.skip(f"SLURM is not available on this machine: {started.stderr.strip()}")
    assert started.returncode == 0, started.stdout + started.stderr
    env = dict(os.environ)
    env.update(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    pids = [int(path.read_text()) for path in directory.glob("slurm*.pid")]  # slurmctld, slurmd
    yield env
    subprocess.run(["bash", SCRIPT, "stop", directory], timeout=120, check=True)
    for pid in pids:  # stopped by pid: the daemons it started are gone
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    shutil.rmtree(directory, ignore_errors=True)


def ffn(env, *args, timeout=900):
    cmd = [sys.executable, "-m", "ffn_dist.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def submit(env, *args):
    return ffn(env, "submit", *args)


def ffn_status(env, *args):
    return ffn(env, "status", *args)


def test_submit_runs_the_demo_pipeline_with_two_tasks(slurm_env, tiny_root, tmp_path):
    args = cache_overrides(tiny_root, tmp_path / "run", "stage2.epochs=2", "cache.train_views=2")
    planned = ffn(slurm_env, "plan", CONFIG, *args, "--steps", "4")
    assert planned.returncode == 0, planned.stdout[-3000:] + planned.stderr[-3000:]
    warning = load_config(CONFIG, args).launch.signal_delay_s  # USR2 that long before each limit
    limits = time_limits(json.loads((tmp_path / "run" / "plan.json").read_text()), 1.5, warning)
    result = submit(slurm_env, CONFIG, *args, "--plan", "--wait")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ids = re.findall(r"submitted (\S+)\s+job (\d+)", result.stdout)
    assert [stage for stage, _ in ids] == ["data", "stage1", "cache", "classifier+evaluate"]
    for (_, job_id), limit in zip(ids, limits, strict=True):  # SLURM's own time limit of each job
        minutes = int(limit.split("=")[1])
        job = subprocess.run(
            ["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm_env
        )
        assert f"TimeLimit={minutes // 60:02d}:{minutes % 60:02d}:00" in job.stdout, (limit, job.stdout)
    report = json.loads((tmp_path / "run" / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert all(m["samples"] == 61 for m in report["methods"].values())
    assert "| FFN (kps 0.5, ce 0.5) |" in result.stdout  # the final table
    stage1_log = (tmp_path / "run" / "slurm" / "stage1" / f"{ids[1][1]}_0_log.out").read_text()
    assert "stage1: job" in stage1_log and "2 task(s)" in stage1_log
    status = ffn_status(slurm_env, CONFIG, *args)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 4, status.stdout + status.stderr
    assert re.search(r"data\s+complete \(took .*\n.*evaluate\s+complete", status.stdout, re.S), status.stdout
    assert re.search(r"stage1\s+complete \(took .+, planned .+\)", status.stdout), status.stdout
    assert (tmp_path / "run" / "data_report.json").is_file()  # the data stage ran on SLURM too


def test_preempted_stage1_checkpoints_requeues_and_resumes(slurm_env, tiny_root, tmp_path):
    out = tmp_path / "run"
    config = Path(shutil.copy(CONFIG, tmp_path / "cfg.yaml"))
    args = cache_overrides(tiny_root, out, "stage1.epochs=10", "stage1.log_every=1", "stage2.epochs=1")
    chain = subprocess.Popen(
        [sys.executable, "-m", "ffn_dist.cli", "submit", config, *args, "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=slurm_env,
        cwd=REPO,
    )
    deadline = time.time() + 300
    # Both branches past epoch 1 (they run side by side, either may be ahead).
    while not all((out / "stage1" / b / "epoch_0001.pt").exists() for b in ("ce", "kps")):
        assert time.time() < deadline and chain.poll() is None, "stage 1 never checkpointed"
        time.sleep(0.2)
    job_ids = [r["job_id"] for r in json.loads((out / "slurm" / "submission.json").read_text())["jobs"]]
    job_id = job_ids[1]  # stage 1's (after the data check's)
    # the chain holds the run directory while any of its jobs is queued or running
    assert json.loads((out / ".hold.json").read_text())["slurm_jobs"] == job_ids
    second = submit(slurm_env, CONFIG, *args)
    assert second.returncode == 1 and f"{out}: in use by `ffn submit" in second.stderr, second.stderr
    # How SLURM pre-empts: SIGTERM, then the USR2 warning (submitit's own test helper does this).
    for sig in ("SIGTERM", "USR2"):
        subprocess.run(["scancel", job_id, "--signal", sig], check=True, env=slurm_env)
    # The user edits the YAML for the next experiment: the requeued and queued jobs read the
    # run's frozen config, not this file.
    edited = config.read_text().replace("fusion: {kps: 0.5, ce: 0.5}", "fusion: {kps: 0.8, ce: 0.2}")
    config.write_text(edited)
    stdout, stderr = chain.communicate(timeout=900)
    assert chain.returncode == 0, stdout[-3000:] + stderr[-3000:]
    logs = "".join(p.read_text() for p in sorted((out / "slurm" / "stage1").glob(f"{job_id}_*_log.out")))
    stopped = re.findall(r"\[(ce|kps)\] stop requested: checkpointed at epoch (\d+), step (\d+)", logs)
    assert {branch for branch, _, _ in stopped} == {"ce", "kps"}, logs[-3000:]
    for branch, epoch, step in stopped:
        assert int(epoch) >= 2  # after epoch 1's checkpoint: not from the start
        assert (
            f"[{branch}] resuming from {out}/stage1/{branch}/interrupted.pt at epoch {epoch}, "
            f"step {int(step) + 1}" in logs
        )
    assert "stage1: requeue 1/5" in logs
    every_log = "".join(p.read_text() for p in (out / "slurm").rglob("*_log.*"))
    assert "taking over" not in every_log  # the requeued job took back its own hold
    assert not (out / ".hold.json").exists()  # the chain's last job ended it
    for branch in ("ce", "kps"):
        assert (out / "stage1" / branch / "epoch_0010.pt").is_file()
        assert not (out / "stage1" / branch / "interrupted.pt").exists()  # superseded
    report = json.loads((out / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["CE", "KPS", "FFN (kps 0.5, ce 0.5)"]
    assert not (out / "classifier" / "ffn" / "kps0.80_ce0.20").exists()


def test_a_failing_stage1_stops_the_chain_and_is_reported(slurm_env, tiny_root, tmp_path):
    data = Path(shutil.copytree(tiny_root, tmp_path / "data", symlinks=True))
    first = (data / "train.txt").read_text().splitlines()[0].split()[0]
    (data / "broken").mkdir()
    (data / "broken" / "0.jpg").write_bytes(b"not a jpeg")
    lines = (data / "train.txt").read_text().replace(first, "broken/0.jpg", 1)
    (data / "train.txt").write_text(lines)
    args = cache_overrides(data, tmp_path / "run")
    result = submit(slurm_env, CONFIG, *args, "--wait")
    assert result.returncode == 2
    assert re.search(r"error: stage1 failed \(job \d+, FAILED\): .*train.txt:1 .*broken/0.jpg", result.stderr)
    assert "the stages after it did not run" in result.stderr
    time.sleep(12)  # SLURM cancels the dependent jobs at its next scheduling pass
    for job in ("cache", "classifier+evaluate"):
        assert list((tmp_path / "run" / "slurm" / job).glob("*_log.out")) == []  # never started
    status = ffn_status(slurm_env, CONFIG, *args)
    assert status.returncode == 1
    assert re.search(r"stage1\s+failed: .*train.txt:1 .*broken/0.jpg", status.stdout), status.stdout
    assert re.search(r"stage1\s+job \d+\s+FAILED\s+log .*/slurm/stage1/\d+_0_log.out", status.stdout)
    assert re.search(r"cache\s+job \d+\s+CANCELLED", status.stdout), status.stdout
    assert not (tmp_path / "run" / "cache").exists()


def test_dry_run_of_a_4_node_8_gpu_imagenet_submission(tmp_path):
    result = run_ffn(
        "submit",
        REPO / "configs" / "imagenet_lt_r50.yaml",
        f"output_dir={tmp_path / 'run'}",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--partition",
        "gpu",
        "--account",
        "lt",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("4 node(s) x 8 task(s) = 32 task(s), 8 GPU(s)/node") == 2  # stage 1, cache
    assert out.count("1 node(s) x 1 task(s) = 1 task(s), 1 GPU(s)/node") == 2  # data; classifier + report
    jobs = re.findall(r"== job \d/4: (\S+)", out)
    assert jobs == ["data", "stage1", "cache", "classifier+evaluate"]  # run.STAGES, one job per shape
    assert f"every job reads the run's frozen config: {tmp_path / 'run' / 'config.yaml'}" in out
    share = "global batch 64 = 16 x 4"  # the recipe's batch, whatever the node count
    assert f"CE ranks 0-15 (16, nccl; {share}), KPS ranks 16-31 (16, nccl; {share})" in out
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lt",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=2880",
        "#SBATCH --kill-on-invalid-dep=yes",
    ):
        assert line in out
    assert out.count("#SBATCH --dependency=") == 3 and out.rstrip().endswith(
        "(dry run: nothing was submitted)"
    )
    assert not (tmp_path / "run").exists()


def test_unsafe_launch_values_are_refused(tmp_path):
    result = run_ffn("submit", CONFIG, f"output_dir={tmp_path}", "launch.partition=gpu;reboot", "--dry-run")
    assert result.returncode == 2
    assert (
        "launch.partition: 'gpu;reboot' contains characters not allowed in an sbatch option" in result.stderr
    )


def test_local_executor_runs_the_same_chain_without_slurm(tiny_root, tmp_path):
    args = cache_overrides(tiny_root, tmp_path / "run", "stage2.epochs=1", "cache.train_views=1")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    result = submit(env, CONFIG, *args, "--executor", "local")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [
        line.split(":")[0]
        for line in result.stdout.splitlines()
        if line.endswith(")") and "completed (job" in line
    ] == ["data", "stage1", "cache", "classifier+evaluate"]
    assert (tmp_path / "run" / "report" / "report.json").is_file()
