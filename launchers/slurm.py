"""`ffn submit`: the pipeline as three SLURM jobs chained with `afterok`, through submitit.

    stage 1  (nodes x tasks: both process groups in one allocation)
      -> feature cache  (its own allocation, same shape)
        -> classifier + evaluation  (one task)

Each job runs the stage function `torchrun` runs; ranks and the rendezvous come from SLURM
(submitit's TorchDistributedEnvironment exports MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK). Pre-emption and time limits: SLURM sends USR2 `launch.signal_delay_s` early.
Stage 1 then checkpoints mid-epoch on every rank and requeues itself; the cache job requeues
at once (its finished shards are final); both resume where they stopped, at most
`launch.max_requeues` times. A failed job cancels the jobs after it (kill-on-invalid-dep).
`--executor local` runs the same jobs one after the other on this machine.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ffn_dist.config import Config, load_config, resolve_config_path
from ffn_dist.errors import FFNError
from ffn_dist.layout import describe_groups, plan_groups, planned_placements
from ffn_dist.rundir import TOKEN_ENV, command_line, end_hold, take_hold

STAGES = ("stage1", "cache", "classifier")
COMMANDS = {
    "stage1": "train-backbones",
    "cache": "cache-features",
    "classifier": "train-classifier + evaluate",
}
DONE_STATES = {"COMPLETED"}
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
# What may appear in an #SBATCH line: no newlines or shell syntax (submitit also quotes it).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%+/\-\[\]]*$")


def slurm_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir).resolve() / "slurm"


def _log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[ffn-slurm {stamp}] {message}", flush=True)


# ----------------------------------------------------------------------------- the jobs
@dataclass
class StageJob:
    """One stage as a submitit job. Pickled to the cluster: holds only the config path and
    overrides, and loads the config there."""

    stage: str
    config_path: str
    overrides: list[str]
    hold_token: str  # the chain's hold on the run directory (rundir.py), shared by its jobs

    def __call__(self):
        import submitit

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ[TOKEN_ENV] = self.hold_token  # a requeued job keeps it too
        cfg = load_config(self.config_path, self.overrides)
        job = submitit.JobEnvironment()
        if dist_env.rank == 0:
            _log(
                f"{self.stage}: job {job.job_id}, {dist_env.world_size} task(s), "
                f"master {dist_env.master_addr}:{dist_env.master_port}"
            )
        if self.stage == "stage1":
            return self._stage1(cfg, dist_env.rank)
        if self.stage == "cache":
            from ffn_dist.stages.cache import cache_features

            cache_features(cfg, rebuild=True)
            return None
        from ffn_dist.stages.classifier import train_classifier
        from ffn_dist.stages.evaluate import evaluate_run

        train_classifier(cfg)
        methods = evaluate_run(cfg)["methods"]
        end_hold(cfg.output_dir, self.hold_token)  # the chain's last job: the run directory is free
        return methods

    def _stage1(self, cfg: Config, rank: int):
        from ffn_dist.stages.backbones import train_backbones
        from ffn_dist.stopping import StopRequested

        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue, on rank 0
        try:
            train_backbones(cfg)
        except StopRequested:
            # Every rank has checkpointed (train_backbones waits for all before raising).
            if rank == 0:
                requeue(signal.SIGUSR2, None)  # requeues the job and exits
            time.sleep(cfg.launch.signal_delay_s + 60)  # the requeue ends this task first
            raise
        return None

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at pre-emption / time-out: requeue, up to the cap."""
        import submitit

        cfg = load_config(self.config_path, self.overrides)
        counts_path = slurm_dir(cfg) / "requeues.json"
        counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {}
        counts[self.stage] = counts.get(self.stage, 0) + 1
        counts_path.write_text(json.dumps(counts))
        if counts[self.stage] > cfg.launch.max_requeues:
            _log(f"{self.stage}: not requeued, launch.max_requeues={cfg.launch.max_requeues} reached")
            return None
        _log(
            f"{self.stage}: requeue {counts[self.stage]}/{cfg.launch.max_requeues}; "
            "it resumes from its checkpoint"
        )
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ----------------------------------------------------------------------------- resources
def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; on CPU nodes `dist.nproc` tasks per node."""
    return cfg.launch.gpus_per_node or cfg.dist.nproc


def stage1_groups(cfg: Config) -> dict:
    """Stage 1's process groups in this allocation; refuses a layout that cannot work."""
    launch = cfg.launch
    placements = planned_placements(launch.nodes, tasks_per_node(cfg), launch.gpus_per_node)
    return plan_groups(placements, cfg.dist.kps_ranks, cfg.dist.engine)


def stage_resources(cfg: Config, stage: str) -> dict:
    launch = cfg.launch
    single = stage == "classifier"
    gpus = launch.gpus_per_node if not single else min(launch.gpus_per_node, 1)
    return {
        "nodes": 1 if single else launch.nodes,
        "tasks_per_node": 1 if single else tasks_per_node(cfg),
        "gpus_per_node": gpus,
        "cpus_per_task": launch.cpus_per_task,
        "timeout_min": {
            "stage1": launch.stage1_minutes,
            "cache": launch.cache_minutes,
            "classifier": launch.classifier_minutes,
        }[stage],
    }


def _checked(key: str, value) -> str:
    text = str(value)
    if not SAFE_VALUE.match(text):
        raise FFNError(f"{key}: {text!r} contains characters not allowed in an sbatch option")
    return text


def slurm_parameters(cfg: Config, stage: str, dependency: str | None) -> dict:
    """Parameters of submitit's SlurmExecutor for one stage."""
    launch, res = cfg.launch, stage_resources(cfg, stage)
    params = {
        "job_name": _checked("name", f"ffn-{cfg.name}-{stage}"),
        "nodes": res["nodes"],
        "ntasks_per_node": res["tasks_per_node"],
        "cpus_per_task": res["cpus_per_task"],
        "time": res["timeout_min"],
        "signal_delay_s": launch.signal_delay_s,
        "setup": list(launch.setup),
    }
    if res["gpus_per_node"]:
        params["gpus_per_node"] = res["gpus_per_node"]
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(launch, key) is not None:
            params[key] = _checked(f"launch.{key}", getattr(launch, key))
    if launch.mem_gb is not None:
        params["mem"] = f"{launch.mem_gb}G"
    extra = {}
    for i, item in enumerate(launch.sbatch):
        key, _, value = item.partition("=")
        extra[_checked(f"launch.sbatch[{i}]", key)] = (
            _checked(f"launch.sbatch[{i}]", value) if value else True
        )
    if dependency:
        params["dependency"] = f"afterok:{dependency}"
        extra["kill-on-invalid-dep"] = "yes"  # a failed stage cancels the ones after it
    if extra:
        params["additional_parameters"] = extra
    return params


def _executor(cfg: Config, stage: str, kind: str, dependency: str | None = None):
    import submitit

    folder = slurm_dir(cfg) / stage
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.launch.max_requeues)
        res = stage_resources(cfg, stage)
        executor.update_parameters(
            timeout_min=res["timeout_min"],
            tasks_per_node=res["tasks_per_node"],
            gpus_per_node=res["gpus_per_node"],
            signal_delay_s=cfg.launch.signal_delay_s,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.launch.max_requeues)
    executor.update_parameters(**slurm_parameters(cfg, stage, dependency))
    return executor


def sbatch_script(cfg: Config, stage: str, dependency: str | None) -> str:
    """The sbatch file submitit writes for a stage (built without needing SLURM here)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = slurm_dir(cfg) / stage
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg, stage, dependency))


def describe(cfg: Config, config_path: str, overrides: list[str]) -> str:
    """What `ffn submit` would submit: resources, environment, commands, sbatch scripts."""
    groups = stage1_groups(cfg)
    lines = []
    for number, stage in enumerate(STAGES):
        res = stage_resources(cfg, stage)
        tasks = res["nodes"] * res["tasks_per_node"]
        dependency = f"afterok:<job id of {STAGES[number - 1]}>" if number else "none"
        lines += [
            f"== job {number + 1}/3: {stage} ({COMMANDS[stage]})",
            f"   resources: {res['nodes']} node(s) x {res['tasks_per_node']} task(s) = {tasks} task(s), "
            f"{res['gpus_per_node']} GPU(s)/node, {res['cpus_per_task']} CPU(s)/task, "
            f"time limit {res['timeout_min']} min, depends on {dependency}",
            f"   command: ffn {COMMANDS[stage]} {' '.join([config_path, *overrides])}",
            f"   environment per task: MASTER_ADDR=<first node>, MASTER_PORT=<from job id>, "
            f"RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE={tasks}",
        ]
        if stage == "stage1":
            lines.append(
                f"   process groups: {describe_groups(groups)}; each data-parallel ({cfg.dist.engine}), "
                "loader shards per group"
            )
        script = sbatch_script(cfg, stage, "<id>" if number else None)
        lines += ["   sbatch script:", *("     " + line for line in script.splitlines()), ""]
    lines.append("(dry run: nothing was submitted)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- submission
def _record_path(cfg: Config) -> Path:
    return slurm_dir(cfg) / "submission.json"


def _job_record(stage: str, job) -> dict:
    return {
        "stage": stage,
        "job_id": str(job.job_id),
        "folder": str(job.paths.folder),
        "log": str(job.paths.stdout),
    }


def _save_record(cfg: Config, kind: str, records: list[dict]) -> None:
    path = _record_path(cfg)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"executor": kind, "jobs": records}, indent=1))
    tmp.replace(path)


def submit(config_path: str, overrides: list[str], kind: str = "slurm", wait: bool = False) -> list[dict]:
    """Submit the chain; the run directory is held from before the first job is queued until
    the last one ends (by this process while it waits, else by the chain's jobs)."""
    cfg = load_config(config_path, overrides)
    stage1_groups(cfg)  # refuse a layout that cannot work before anything is queued
    hold = take_hold(cfg.output_dir, command_line())
    try:
        records = _submit_chain(cfg, config_path, overrides, kind, wait, hold)
    except BaseException:
        hold.release()
        raise
    if kind == "slurm" and not wait:
        hold.hand_over()  # the queued chain holds it now; its last job ends the hold
    else:
        hold.release()
    return records


def _submit_chain(cfg: Config, config_path, overrides, kind: str, wait: bool, hold) -> list[dict]:
    slurm_dir(cfg).mkdir(parents=True, exist_ok=True)
    (slurm_dir(cfg) / "requeues.json").unlink(missing_ok=True)
    # the jobs may start in another directory; a shipped config's name becomes its file
    config_path = str(resolve_config_path(config_path).resolve())
    records, previous = [], None
    for stage in STAGES:
        executor = _executor(cfg, stage, kind, previous.job_id if previous else None)
        job = executor.submit(StageJob(stage, config_path, list(overrides), hold.token))
        records.append(_job_record(stage, job))
        _save_record(cfg, kind, records)
        print(f"submitted {stage:<10} job {job.job_id:<8} log {job.paths.stdout}", flush=True)
        if kind == "local":  # no dependencies without SLURM: run the chain in order
            if not _wait_for(job, stage, records[-1]):
                _save_record(cfg, kind, records)
                raise FFNError(_failure_message(records[-1]))
            _save_record(cfg, kind, records)
        previous = job
    report = Path(cfg.output_dir).resolve() / "report" / "report.md"
    print(f"results: {report.parent} (report.md, report.json, plots)", flush=True)
    if kind == "slurm":
        # the hold lives while any job of the chain is queued or running, wherever it runs
        hold.update(slurm_jobs=[r["job_id"] for r in records])
        ids = ",".join(r["job_id"] for r in records)
        print(
            f"follow:  ffn status {shlex.join([config_path, *overrides])}   or   squeue -j {ids}", flush=True
        )
    if wait and kind == "slurm":
        for record, stage in zip(records, STAGES, strict=True):
            if not _wait_for(_slurm_job(record), stage, record):
                _save_record(cfg, kind, records)
                raise FFNError(_failure_message(record))
        _save_record(cfg, kind, records)
    if kind == "local" or wait:
        print(report.read_text(), flush=True)
    return records


def _slurm_job(record: dict):
    import submitit

    return submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])


def _wait_for(job, stage: str, record: dict, poll_s: float = 2.0) -> bool:
    """Block until the job ends; record its final state; True if it completed."""
    while not job.done():
        time.sleep(poll_s)
    try:
        job.results()  # one result per task
        record["state"] = "COMPLETED"
    except Exception as exc:  # submitit re-raises the job's own error, or UncompletedJobError
        record["state"] = job.state if job.state not in ("RUNNING", "UNKNOWN") else "FAILED"
        record["error"] = _job_error(exc)
        return False
    print(f"{stage}: completed (job {record['job_id']})", flush=True)
    return True


def _job_error(exc: Exception) -> str:
    """The job's own error line out of submitit's report (which wraps the task's traceback)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    if any(line.startswith("Traceback") for line in lines):
        start = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        end = next((i for i in range(start, len(lines)) if re.fullmatch(r"-{5,}", lines[i])), len(lines))
        trace = [line for line in lines[start:end] if line]
        return trace[-1]
    lines = [line for line in lines if line]
    return lines[0] if lines else type(exc).__name__


def _failure_message(record: dict) -> str:
    return (
        f"{record['stage']} failed (job {record['job_id']}, {record.get('state', 'FAILED')}): "
        f"{record.get('error', '')}; log: {record['log']}; the stages after it did not run"
    )


def status(config_path: str, overrides: list[str]) -> int:
    """Print each stage's state; 1 if one failed (naming it and its log), else 0."""
    cfg = load_config(config_path, overrides)
    path = _record_path(cfg)
    if not path.is_file():
        raise FFNError(f"{path}: no submission for this config; run `ffn submit` first")
    body = json.loads(path.read_text())
    failed = None
    for record in body["jobs"]:
        state = record.get("state") or (
            _slurm_job(record).state if body["executor"] == "slurm" else "UNKNOWN"
        )
        state = state.split()[0]
        print(f"{record['stage']:<10} job {record['job_id']:<8} {state:<12} log {record['log']}")
        if failed is None and state in FAILED_STATES:
            failed = {**record, "state": state}
    if failed:
        print(f"\n{failed['stage']} failed; its log: {failed['log']}", file=sys.stderr)
        return 1
    return 0
