"""`ffn submit`: the run's stages (`run.STAGES`) as SLURM jobs chained with `afterok`, via submitit.

    data -> stage 1 (nodes x tasks: both process groups in one allocation)
         -> feature cache (its own allocation, same shape) -> classifier + evaluate (one task)

A stage of all processes is a job of its own (its own allocation, time limit and requeues);
consecutive one-process stages share one. Every job reads the run's frozen config
(`output_dir/config.yaml`, written by `ffn submit` before the first job is queued), never
the user's YAML: editing it changes nothing in a queued or requeued chain.

Each job runs the stage functions `ffn run` runs; ranks and the rendezvous come from SLURM
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

from ffn_dist.config import Config
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json
from ffn_dist.layout import branch_shares, describe_groups, plan_groups, planned_placements, split_batches
from ffn_dist.run.history import load_run_config
from ffn_dist.run.paths import run_dir, run_report_tables, slurm_dir
from ffn_dist.run.stages import STAGES, Stage, run_stage, start_run
from ffn_dist.rundir import TOKEN_ENV, command_line, end_hold, take_hold

FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL"}
# What may appear in an #SBATCH line: no newlines or shell syntax (submitit also quotes it).
SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:=@%+/\-\[\]]*$")


def chain(stages: tuple[Stage, ...] = STAGES) -> list[tuple[Stage, ...]]:
    """The jobs of a run, in order: consecutive one-process stages share a job."""
    jobs: list[tuple[Stage, ...]] = []
    for stage in stages:
        if jobs and stage.processes == "one" and jobs[-1][-1].processes == "one":
            jobs[-1] = (*jobs[-1], stage)
        else:
            jobs.append((stage,))
    return jobs


def job_name(stages: tuple[Stage, ...]) -> str:
    return "+".join(stage.name for stage in stages)


def _log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[ffn-slurm {stamp}] {message}", flush=True)


# ----------------------------------------------------------------------------- the jobs
@dataclass
class ChainJob:
    """Some stages of a run as one submitit job. Pickled to the cluster: holds the run
    directory, whose frozen config it reads there (a requeued job too)."""

    stages: tuple[str, ...]
    run_dir: str
    hold_token: str  # the chain's hold on the run directory (rundir.py), shared by its jobs

    def __call__(self):
        import submitit

        from ffn_dist.stopping import StopRequested

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ[TOKEN_ENV] = self.hold_token  # a requeued job keeps it too
        cfg = load_run_config(self.run_dir)
        if dist_env.rank == 0:
            _log(
                f"{'+'.join(self.stages)}: job {submitit.JobEnvironment().job_id}, "
                f"{dist_env.world_size} task(s), master {dist_env.master_addr}:{dist_env.master_port}"
            )
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue, on rank 0
        for name in self.stages:
            try:
                run_stage(cfg, name)
            except StopRequested:
                # Every rank has checkpointed (the stage waits for all before raising).
                if dist_env.rank == 0:
                    requeue(signal.SIGUSR2, None)  # requeues the job and exits
                time.sleep(cfg.launch.signal_delay_s + 60)  # the requeue ends this task first
                raise
        if self.stages[-1] == STAGES[-1].name:
            end_hold(cfg.output_dir, self.hold_token)  # the chain's last job: the run directory is free

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at pre-emption / time-out: requeue, up to the cap."""
        import submitit

        cfg = load_run_config(self.run_dir)
        name = "+".join(self.stages)
        counts_path = slurm_dir(cfg) / "requeues.json"
        counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {}
        counts[name] = counts.get(name, 0) + 1
        write_json(counts_path, counts)
        if counts[name] > cfg.launch.max_requeues:
            _log(f"{name}: not requeued, launch.max_requeues={cfg.launch.max_requeues} reached")
            return None
        _log(f"{name}: requeue {counts[name]}/{cfg.launch.max_requeues}; it resumes from its checkpoint")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ----------------------------------------------------------------------------- resources
def tasks_per_node(cfg: Config) -> int:
    """One task per GPU; on CPU nodes `dist.nproc` tasks per node."""
    return cfg.launch.gpus_per_node or cfg.dist.nproc


def stage1_groups(cfg: Config) -> tuple[dict, dict]:
    """Stage 1's process groups in this allocation and each one's share of the recipe's batch;
    refuses a layout that cannot work or would change the recipe."""
    launch = cfg.launch
    placements = planned_placements(launch.nodes, tasks_per_node(cfg), launch.gpus_per_node)
    return plan_groups(placements, branch_shares(cfg), cfg.dist.engine), split_batches(cfg, len(placements))


def node_range(cfg: Config) -> tuple[int, int]:
    """The fewest and the most nodes of stage 1's and the cache's jobs."""
    return cfg.launch.min_nodes or cfg.launch.nodes, cfg.launch.nodes


def job_resources(cfg: Config, stages: tuple[Stage, ...]) -> dict:
    """One task for a job of one-process stages; else the whole allocation."""
    launch = cfg.launch
    single = all(stage.processes == "one" for stage in stages)
    return {
        "nodes": 1 if single else launch.nodes,
        "tasks_per_node": 1 if single else tasks_per_node(cfg),
        "gpus_per_node": min(launch.gpus_per_node, 1) if single else launch.gpus_per_node,
        "cpus_per_task": launch.cpus_per_task,
        "timeout_min": sum(getattr(launch, key) for key in dict.fromkeys(s.minutes for s in stages)),
    }


def _checked(key: str, value) -> str:
    text = str(value)
    if not SAFE_VALUE.match(text):
        raise FFNError(f"{key}: {text!r} contains characters not allowed in an sbatch option")
    return text


def slurm_parameters(cfg: Config, stages: tuple[Stage, ...], dependency: str | None) -> dict:
    """Parameters of submitit's SlurmExecutor for one job."""
    launch, res = cfg.launch, job_resources(cfg, stages)
    params = {
        "job_name": _checked("name", f"ffn-{cfg.name}-{job_name(stages)}"),
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
    low, high = node_range(cfg)
    if res["nodes"] > 1 and low < high:
        # A range: SLURM starts the job on as many as it has, and a job requeued after losing a
        # node runs on those left (stage 1 resumes at that process count).
        extra["nodes"] = f"{low}-{high}"
    if dependency:
        params["dependency"] = f"afterok:{dependency}"
        extra["kill-on-invalid-dep"] = "yes"  # a failed stage cancels the ones after it
    if extra:
        params["additional_parameters"] = extra
    return params


def _executor(cfg: Config, stages: tuple[Stage, ...], kind: str, dependency: str | None = None):
    import submitit

    folder = slurm_dir(cfg) / job_name(stages)
    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.launch.max_requeues)
        res = job_resources(cfg, stages)
        executor.update_parameters(
            timeout_min=res["timeout_min"],
            tasks_per_node=res["tasks_per_node"],
            gpus_per_node=res["gpus_per_node"],
            signal_delay_s=cfg.launch.signal_delay_s,
        )
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.launch.max_requeues)
    executor.update_parameters(**slurm_parameters(cfg, stages, dependency))
    return executor


def sbatch_script(cfg: Config, stages: tuple[Stage, ...], dependency: str | None) -> str:
    """The sbatch file submitit writes for a job (built without needing SLURM here)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = slurm_dir(cfg) / job_name(stages)
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    return _make_sbatch_string(command=command, folder=folder, **slurm_parameters(cfg, stages, dependency))


def describe(cfg: Config) -> str:
    """What `ffn submit` would submit: resources, environment, commands, sbatch scripts."""
    groups, splits = stage1_groups(cfg)
    jobs = chain()
    lines = [f"every job reads the run's frozen config: {run_dir(cfg).resolve() / 'config.yaml'}", ""]
    for number, stages in enumerate(jobs):
        res = job_resources(cfg, stages)
        tasks = res["nodes"] * res["tasks_per_node"]
        dependency = f"afterok:<job id of {job_name(jobs[number - 1])}>" if number else "none"
        lines += [
            f"== job {number + 1}/{len(jobs)}: {job_name(stages)}",
            f"   resources: {res['nodes']} node(s) x {res['tasks_per_node']} task(s) = {tasks} task(s), "
            f"{res['gpus_per_node']} GPU(s)/node, {res['cpus_per_task']} CPU(s)/task, "
            f"time limit {res['timeout_min']} min, depends on {dependency}",
            *(f"   runs: ffn stage {stage.name} {run_dir(cfg).resolve()}" for stage in stages),
            f"   environment per task: MASTER_ADDR=<first node>, MASTER_PORT=<from job id>, "
            f"RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID, WORLD_SIZE={tasks}",
        ]
        if any(stage.name == "stage1" for stage in stages):
            lines.append(
                f"   process groups: {describe_groups(groups, splits)}; "
                f"each data-parallel ({cfg.dist.engine}), loader shards per group"
            )
        script = sbatch_script(cfg, stages, "<id>" if number else None)
        lines += ["   sbatch script:", *("     " + line for line in script.splitlines()), ""]
    lines.append("(dry run: nothing was submitted)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- submission
def _record_path(cfg: Config) -> Path:
    return slurm_dir(cfg) / "submission.json"


def _job_record(name: str, job) -> dict:
    return {
        "stage": name,
        "job_id": str(job.job_id),
        "folder": str(job.paths.folder),
        "log": str(job.paths.stdout),
    }


def _save_record(cfg: Config, kind: str, records: list[dict]) -> None:
    write_json(_record_path(cfg), {"executor": kind, "jobs": records})


def submit(cfg: Config, kind: str = "slurm", wait: bool = False) -> list[dict]:
    """Freeze the config and submit the chain; the run directory is held from before the
    first job is queued until the last one ends (by this process while it waits, else by
    the chain's jobs)."""
    stage1_groups(cfg)  # refuse a layout that cannot work before anything is queued
    hold = take_hold(cfg.output_dir, command_line())
    try:
        frozen = load_run_config(start_run(cfg).parent)  # stage-1 changes refused; the jobs read this
        records = _submit_chain(frozen, kind, wait, hold)
    except BaseException:
        hold.release()
        raise
    if kind == "slurm" and not wait:
        hold.hand_over()  # the queued chain holds it now; its last job ends the hold
    else:
        hold.release()
    return records


def _submit_chain(cfg: Config, kind: str, wait: bool, hold) -> list[dict]:
    slurm_dir(cfg).mkdir(parents=True, exist_ok=True)
    (slurm_dir(cfg) / "requeues.json").unlink(missing_ok=True)
    directory = str(run_dir(cfg).resolve())  # the jobs may start in another directory
    records, previous = [], None
    for stages in chain():
        name = job_name(stages)
        executor = _executor(cfg, stages, kind, previous.job_id if previous else None)
        job = executor.submit(ChainJob(tuple(s.name for s in stages), directory, hold.token))
        records.append(_job_record(name, job))
        _save_record(cfg, kind, records)
        print(f"submitted {name:<19} job {job.job_id:<8} log {job.paths.stdout}", flush=True)
        if kind == "local":  # no dependencies without SLURM: run the chain in order
            if not _wait_for(job, name, records[-1]):
                _save_record(cfg, kind, records)
                raise FFNError(_failure_message(records[-1]))
            _save_record(cfg, kind, records)
        previous = job
    report = run_report_tables(cfg).resolve()
    print(f"results: {report.parent} (report.md, report.json, plots)", flush=True)
    if kind == "slurm":
        # the hold lives while any job of the chain is queued or running, wherever it runs
        hold.update(slurm_jobs=[r["job_id"] for r in records])
        ids = ",".join(r["job_id"] for r in records)
        print(f"follow:  ffn status {directory}/config.yaml   or   squeue -j {ids}", flush=True)
    if wait and kind == "slurm":
        for record in records:
            if not _wait_for(_slurm_job(record), record["stage"], record, _slurm_watch(cfg)):
                _save_record(cfg, kind, records)
                raise FFNError(_failure_message(record))
        _save_record(cfg, kind, records)
    if kind == "local" or wait:
        print(report.read_text(), flush=True)
    return records


def _slurm_job(record: dict):
    import submitit

    return submitit.SlurmJob(folder=record["folder"], job_id=record["job_id"])


def _wait_for(job, name: str, record: dict, watch=None, poll_s: float = 2.0) -> bool:
    """Block until the job ends; record its final state; True if it completed. `watch(job_id)`
    (SLURM): whether the job is still queued or running, which submitit's done() cannot tell
    once a task of an attempt that SLURM then requeued wrote its failure."""
    while watch(str(job.job_id)) if watch else not job.done():
        time.sleep(poll_s)
    try:
        job.results()  # one result per task
        record["state"] = "COMPLETED"
    except Exception as exc:  # submitit re-raises the job's own error, or UncompletedJobError
        record["state"] = job.state if job.state not in ("RUNNING", "UNKNOWN") else "FAILED"
        record["error"] = _job_error(exc)
        return False
    print(f"{name}: completed (job {record['job_id']})", flush=True)
    return True


# States after which SLURM may still requeue a job (JobRequeue=1): seen for a while before
# the job is taken as ended.
REQUEUABLE_STATES = {"NODE_FAIL", "PREEMPTED", "REQUEUED", "REQUEUE_FED"}
ENDED_STATES = FAILED_STATES | {"COMPLETED", "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


def _scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict ({} once SLURM has forgotten the job)."""
    import subprocess

    shown = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if shown.returncode != 0:
        return {}
    return dict(item.split("=", 1) for item in shown.stdout.split() if "=" in item)


def _slurm_watch(cfg: Config, settle_s: float = 30.0):
    """The `watch` of `_wait_for` for SLURM jobs. A job that SLURM requeued after losing a node
    keeps the node count it ran with; where `launch.min_nodes` allows fewer, it is shrunk to the
    range again, so that it resumes on the nodes left instead of waiting for the lost one."""
    import subprocess

    ended_since: dict[str, float] = {}

    def still_going(job_id: str) -> bool:
        info = _scontrol_job(job_id)
        if not info:
            return False  # forgotten by slurmctld: ended (sacct has its state)
        state = info.get("JobState", "")
        low, high = node_range(cfg)
        if (
            state == "PENDING"
            and int(info.get("Restarts", "0")) > 0
            and "ReqNodeNotAvail" in info.get("Reason", "")
            and low < int(info.get("NumNodes", "1")) <= high
        ):
            tasks = low * tasks_per_node(cfg)
            subprocess.run(
                ["scontrol", "update", f"JobId={job_id}", f"NumNodes={low}-{high}", f"NumTasks={tasks}"],
                capture_output=True,
            )
            _log(f"job {job_id}: requeued after a node was lost; may now resume on {low} to {high} node(s)")
        if state in REQUEUABLE_STATES:
            first = ended_since.setdefault(job_id, time.monotonic())
            return time.monotonic() - first < settle_s
        ended_since.pop(job_id, None)
        return state not in ENDED_STATES

    return still_going


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


def job_states(cfg: Config) -> tuple[list[str], bool]:
    """A line per job of the run's submission (none without one); whether one failed."""
    path = _record_path(cfg)
    if not path.is_file():
        return [], False
    body = json.loads(path.read_text())
    lines, failed = [], False
    for record in body["jobs"]:
        state = record.get("state") or (
            _slurm_job(record).state if body["executor"] == "slurm" else "UNKNOWN"
        )
        state = state.split()[0]
        lines.append(f"{record['stage']:<19} job {record['job_id']:<8} {state:<12} log {record['log']}")
        failed = failed or state in FAILED_STATES
    return lines, failed
