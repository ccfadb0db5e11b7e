"""`ffn run CONFIG`: the stages in order, each skipped when its outputs are complete.

Stage 1 and the feature cache run under torchrun with `dist.nproc` processes, started here,
so that one command on one machine does what the SLURM launcher does across nodes; the
classifier (seconds per epoch on the cache) and the report run in this process.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

from ffn_dist.cache.store import read_manifest
from ffn_dist.checkpoint import list_checkpoints
from ffn_dist.config import Config
from ffn_dist.distributed import BRANCHES, visible_gpus
from ffn_dist.errors import FFNError
from ffn_dist.layout import describe_groups, plan_groups, planned_placements
from ffn_dist.rundir import holding
from ffn_dist.stages.backbones import branch_dir, refuse_other_config
from ffn_dist.stages.cache import cache_dir, open_run_cache
from ffn_dist.stages.classifier import train_classifier
from ffn_dist.stages.evaluate import evaluate_run
from ffn_dist.stages.prepare import prepare
from ffn_dist.stopping import run_group


def stage1_complete(cfg: Config) -> bool:
    for branch in BRANCHES:
        found = list_checkpoints(branch_dir(cfg, branch))
        if (
            not found
            or found[-1][0] < cfg.stage1.epochs
            or not (branch_dir(cfg, branch) / "report.json").is_file()
        ):
            return False
    return True


def cache_complete(cfg: Config) -> bool:
    try:
        open_run_cache(cfg)
    except FFNError as exc:
        if read_manifest(cache_dir(cfg)) is not None:
            print(f"cache: {exc}", flush=True)
        return False
    return True


def torchrun(cfg: Config, command: str, config_path: str, overrides: list[str], *extra: str) -> None:
    """`command` under torchrun on this machine, `dist.nproc` processes."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={cfg.dist.nproc}",
        "-m",
        "ffn_dist.cli",
        command,
        config_path,
        *overrides,
        *extra,
    ]
    print(f"{command}: {' '.join(cmd[2:])}", flush=True)
    if run_group(cmd) != 0:  # argument list, no shell: nothing is interpolated
        raise FFNError(f"{command} failed; its output is above (run directory {cfg.output_dir})")


def stage1_layout(cfg: Config) -> str:
    """Stage 1's groups on this machine (`dist.nproc` processes, the visible GPUs), checked
    before anything is written or launched."""
    gpus = visible_gpus()
    plans = plan_groups(planned_placements(1, cfg.dist.nproc, gpus), cfg.dist.kps_ranks, cfg.dist.engine)
    where = f"{gpus} GPU(s)" if gpus else "the CPU"
    return f"{cfg.dist.nproc} process(es) on {where}: {describe_groups(plans)}"


@contextmanager
def timed(seconds: dict, stage: str):
    """Adds the wall time of the block to `seconds[stage]`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(seconds.get(stage, 0.0) + time.perf_counter() - start, 1)


def run_pipeline(cfg: Config, config_path: str, overrides: list[str]) -> dict:
    """Every stage in order; returns the report's results with the wall time of each stage.
    The run directory is held throughout; the stages' processes share the hold."""
    layout = stage1_layout(cfg)
    with holding(cfg.output_dir):
        refuse_other_config(cfg)
        return _run_stages(cfg, config_path, overrides, layout)


def _run_stages(cfg: Config, config_path: str, overrides: list[str], layout: str) -> dict:
    seconds = {}
    with timed(seconds, "data"):
        prepare(cfg)
    with timed(seconds, "stage1"):
        if stage1_complete(cfg):
            print(f"stage 1: complete in {Path(cfg.output_dir) / 'stage1'}, skipped", flush=True)
        else:
            print(f"stage 1: {layout}", flush=True)
            torchrun(cfg, "train-backbones", config_path, overrides)
    with timed(seconds, "cache"):
        if cache_complete(cfg):
            print(f"cache: complete in {cache_dir(cfg)}, skipped", flush=True)
        else:
            # A cache made from older backbones or settings is replaced, not refused: stage 1
            # or the config changed on purpose, and the fingerprint says how.
            torchrun(cfg, "cache-features", config_path, overrides, "--rebuild")
    with timed(seconds, "classifier"):
        train_classifier(cfg)
    with timed(seconds, "evaluate"):
        results = evaluate_run(cfg)
    print("wall time per stage (s): " + ", ".join(f"{k} {v:g}" for k, v in seconds.items()), flush=True)
    return {**results, "seconds": seconds}
