"""`ffn run CONFIG`: the run's stages (`run.STAGES`) in order, each skipped when complete.

The config is read once, here, and frozen to `output_dir/config.yaml`; every stage runs from
that file. Stages of all processes (stage 1, the feature cache) run under torchrun with
`dist.nproc` processes, started here, so that one command on one machine does what the
SLURM launcher does across nodes; the others (the data check, the classifier: seconds per
epoch on the cache, the report) run in this process.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

from ffn_dist.config import Config
from ffn_dist.distributed import visible_gpus
from ffn_dist.errors import FFNError
from ffn_dist.layout import branch_shares, describe_groups, plan_groups, planned_placements, split_batches
from ffn_dist.run.history import load_run_config, note_end
from ffn_dist.run.paths import run_dir, run_report
from ffn_dist.run.stages import STAGES, Stage, run_stage, stage_state, start_run
from ffn_dist.rundir import holding
from ffn_dist.stopping import run_group
from ffn_dist.torchrun import command as torchrun_command


def torchrun(cfg: Config, stage: Stage) -> None:
    """One stage of the run under torchrun on this machine, `dist.nproc` processes, each
    reading the frozen config."""
    cmd = torchrun_command(cfg.dist.nproc, "stage", stage.name, str(run_dir(cfg)))
    print(f"{stage.name}: {' '.join(cmd[2:])}", flush=True)
    status = run_group(cmd)
    if status != 0:
        note_end(cfg, stage.name, "failed", error=f"its processes exited with status {status}")
        raise FFNError(
            f"{stage.name} failed (exit status {status}); the run stops here. `ffn status` says why"
        )


def stage1_layout(cfg: Config) -> str:
    """Stage 1's groups on this machine (`dist.nproc` processes, the visible GPUs), checked
    before anything is written or launched."""
    gpus = visible_gpus()
    plans = plan_groups(planned_placements(1, cfg.dist.nproc, gpus), branch_shares(cfg), cfg.dist.engine)
    splits = split_batches(cfg, cfg.dist.nproc)
    where = f"{gpus} GPU(s)" if gpus else "the CPU"
    return f"{cfg.dist.nproc} process(es) on {where}: {describe_groups(plans, splits)}"


@contextmanager
def timed(seconds: dict, stage: str):
    """Adds the wall time of the block to `seconds[stage]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - start, 1)


def run_pipeline(cfg: Config) -> dict:
    """Every stage in order; returns the report's results with the wall time of each stage.
    The run directory is held throughout; the stages' processes share the hold."""
    layout = stage1_layout(cfg)
    with holding(cfg.output_dir):
        frozen = load_run_config(start_run(cfg).parent)  # from here on, the run's own file
        print(f"stage 1 layout: {layout}", flush=True)
        seconds = _run_stages(frozen)
    results = json.loads(run_report(cfg).read_text())
    return {**results, "seconds": seconds}


def _run_stages(cfg: Config) -> dict:
    seconds = {}
    for stage in STAGES:
        with timed(seconds, stage.name):
            if not stage.always:
                state, detail = stage_state(cfg, stage.name)
                if state == "complete":
                    print(f"{stage.label(cfg)}: complete, skipped", flush=True)
                    continue
                if state in ("stale", "failed"):
                    print(f"{stage.label(cfg)}: runs again ({state}: {detail})", flush=True)
            if stage.processes == "all":
                torchrun(cfg, stage)
            else:
                run_stage(cfg, stage.name)
    print("wall time per stage (s): " + ", ".join(f"{k} {v:g}" for k, v in seconds.items()), flush=True)
    return seconds
