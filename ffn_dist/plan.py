"""`ffn plan CONFIG`: what a run will cost, from a few real steps, before anything is queued.

`probe.py` measures (stage 1's steps, the data stage, a classifier epoch); this module is the
cost model that extrapolates those figures to the run, and says how: stage 1's steps and
evaluations per epoch, forward passes (evaluations, the cache) at `FORWARD_SHARE` of a
training step's time per image, another process count at `--dp-efficiency` of the measured
per-process speed, the classifier's epochs linear in its rows. docs/running.md writes the
model down.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from ffn_dist.config import Config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import visible_gpus
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json
from ffn_dist.launchers.slurm import tasks_per_node
from ffn_dist.layout import split_batches
from ffn_dist.probe import CLASSIFIER_ROWS, WARMUP_STEPS, Probe, on_processes, run_probe
from ffn_dist.progress import format_duration
from ffn_dist.run.history import config_id
from ffn_dist.run.paths import plan_path
from ffn_dist.run.stages import STAGES, describe_changes, flatten

FORWARD_SHARE = 1 / 3  # a forward pass per image, as a share of a training step's (backward ~ 2x)
STORED_BYTES = {"fp16": 2, "fp32": 4}
ROW_BYTES = 16  # a cached row's label and index (int64 each)
# A SLURM job's own start, outside every stage's figure: srun, Python and torch imports, the
# frozen config. Without it a job whose stages take seconds (the data stage, the classifier)
# would get a limit of `launch.signal_delay_s` alone, and SLURM's USR2 as it starts.
JOB_START_S = 60


# ----------------------------------------------------------------------------- the layout
def target_processes(cfg: Config) -> int:
    """The processes of the stages of all processes: `ffn run`'s `dist.nproc` on one machine,
    `ffn submit`'s nodes x tasks on SLURM (the same on one CPU node)."""
    return (
        cfg.launch.nodes * tasks_per_node(cfg)
        if cfg.launch.nodes > 1 or cfg.launch.gpus_per_node
        else cfg.dist.nproc
    )


def target_gpus(cfg: Config) -> int:
    """GPUs a job of all processes holds (0: CPU tasks)."""
    if cfg.launch.gpus_per_node:
        return cfg.launch.nodes * cfg.launch.gpus_per_node
    return min(cfg.dist.nproc, visible_gpus())


def probe_processes(cfg: Config, target: int) -> int:
    """The run's own count, on this machine's GPUs where it has fewer than that (the largest
    count they hold that keeps the recipe); a CPU runs them all (`--nproc` to run fewer)."""
    gpus = visible_gpus()
    for count in range(min(target, gpus) if gpus else target, 0, -1):
        try:
            split_batches(on_processes(cfg, count), count)
            return count
        except FFNError:
            continue
    return 1


@dataclass(frozen=True)
class RunShape:
    """What the plan scales by: images a split, the embedding's size, and each branch's
    processes in the run (`target`) and in the probe."""

    rows: dict[str, int]
    dims: int
    target: dict[str, int]
    probe: dict[str, int]


def run_shape(cfg: Config, target: int, processes: int) -> RunShape:
    from ffn_dist.models.backbones import build_backbone

    rows = {name: len(split) for name, split in open_dataset(cfg.data).splits().items()}
    probe_sizes = branch_sizes(on_processes(cfg, processes), processes)
    dims = build_backbone(cfg.model.arch).embedding_dim
    return RunShape(rows, dims, branch_sizes(cfg, target), probe_sizes)


def branch_sizes(cfg: Config, processes: int) -> dict[str, int]:
    return {branch: split.ranks for branch, split in split_batches(cfg, processes).items()}


# ----------------------------------------------------------------------------- the model
def _evaluations(cfg: Config) -> int:
    s1 = cfg.stage1
    return sum(1 for epoch in range(1, s1.epochs + 1) if epoch % s1.eval_every == 0 or epoch == s1.epochs)


def predict(cfg: Config, probe: Probe, shape: RunShape, dp_efficiency: float) -> dict:
    """Per stage: wall seconds, GPU-hours, peak memory per process, bytes on disk, and how
    each figure was reached."""
    n, dims = shape.rows, shape.dims
    sizes = {"target": shape.target, "probe": shape.probe}
    batch, s1, s2 = cfg.data.batch_size, cfg.stage1, cfg.stage2
    target, gpus = target_processes(cfg), target_gpus(cfg)
    shared = target == 1  # one process trains the branches in turn
    steps_per_epoch = math.ceil(n["train"] / batch)
    # a process's seconds per training image, measured on the probe's share of the batch and
    # taken at the efficiency assumed where the target's count differs
    per_image = {}
    for b in cfg.branches:
        efficiency = 1.0 if sizes["target"][b] == sizes["probe"][b] else dp_efficiency
        per_image[b] = probe.step_s[b] * sizes["probe"][b] / batch / efficiency
    step_s = {b: per_image[b] * batch / sizes["target"][b] for b in cfg.branches}
    forward_s = {b: FORWARD_SHARE * per_image[b] for b in cfg.branches}
    evals = _evaluations(cfg)
    branch_s = {
        b: s1.epochs * steps_per_epoch * step_s[b] + evals * n["test"] / sizes["target"][b] * forward_s[b]
        for b in cfg.branches
    }
    stage1_s = probe.startup_s + (sum(branch_s.values()) if shared else max(branch_s.values()))
    cache_rows = n["train"] * cfg.cache.train_views + n.get("val", 0) + n["test"]
    cache_s = probe.startup_s + cache_rows / target * sum(forward_s.values())  # every backbone a row
    fits = _fits(cfg, "val" in n)
    classifier_s = fits * s2.epochs * probe.classifier_epoch_s
    stored = 1 if cfg.cache.store == "fused" else len(cfg.branches)
    train_bytes = (
        n["train"] * cfg.cache.train_views * (stored * dims * STORED_BYTES[cfg.cache.dtype] + ROW_BYTES)
    )
    eval_bytes = (n.get("val", 0) + n["test"]) * (stored * dims * STORED_BYTES["fp32"] + ROW_BYTES)
    cache_bytes = train_bytes + eval_bytes
    kept = min(s1.keep_checkpoints, math.ceil(s1.epochs / s1.checkpoint_every))
    checkpoint_bytes = kept * sum(probe.checkpoint_bytes.values())
    on = f"{target} process(es)" + (f", {gpus} GPU(s)" if gpus else " on the CPU")
    modelled = {
        "data": _figures(probe.data_s, 0, None, 0, "measured: the data stage, run here"),
        "stage1": _figures(
            stage1_s,
            gpus,
            probe.peak_memory_gb,
            checkpoint_bytes,
            f"{s1.epochs} epochs x {steps_per_epoch} steps a branch at "
            + ", ".join(f"{b} {step_s[b]:.3g} s" for b in cfg.branches)
            + f" a step ({'in turn' if shared else 'concurrently'}, on {on}); "
            f"{evals} test evaluations of {n['test']} images; start-up {probe.startup_s:.0f} s; "
            f"checkpoints: {kept} kept a branch of "
            + ", ".join(f"{b} {probe.checkpoint_bytes[b] / 1e6:.1f} MB" for b in cfg.branches),
        ),
        "cache": _figures(
            cache_s,
            gpus,
            probe.peak_memory_gb,
            cache_bytes,
            f"{cache_rows} rows ({cfg.cache.train_views} views of train, val, test) through every backbone "
            f"on {on}; start-up as stage 1's; memory at most stage 1's (no gradients); size "
            f"rows x {stored} x {dims} dims x bytes ({cfg.cache.dtype} train, fp32 val/test), 16 more a row",
        ),
        "classifier": _figures(
            classifier_s,
            min(gpus, 1),
            probe.classifier_memory_gb + cache_bytes / 2**30,
            0,
            f"{fits} fit(s) x {s2.epochs} epochs at {probe.classifier_epoch_s:.3g} s an epoch "
            f"of {n['train']} rows; "
            "memory: this process's in the probe plus the cache (memory-mapped, read whole each epoch)",
        ),
        "evaluate": _figures(
            0.0, min(gpus, 1), None, 0, "not measured: tables and plots of the results, seconds"
        ),
    }
    unmodelled = _figures(0.0, 0, None, 0, "not modelled: no cost model for this stage yet")
    stages = {stage.name: modelled.get(stage.name, unmodelled) for stage in STAGES}
    measured_on = f"{probe.processes} process(es) on the {'GPU' if probe.device == 'cuda' else 'CPU'}"
    extrapolated = [
        f"stage 1: {probe.steps} steps a branch timed on {measured_on} (median after {WARMUP_STEPS}), "
        f"{s1.epochs * steps_per_epoch} planned",
        f"forward passes (evaluations, the cache) at {FORWARD_SHARE:.2f} of a training step's time per image",
        f"the classifier's epochs timed on {min(n['train'], CLASSIFIER_ROWS)} synthetic rows, linear in rows",
        *probe.notes,
    ]
    if any(sizes["target"][b] != sizes["probe"][b] for b in cfg.branches):
        extrapolated.append(
            f"{target} processes from {probe.processes}: per-process speed x {dp_efficiency:g} "
            "(data-parallel efficiency)"
        )
    if gpus and probe.device != "cuda":
        extrapolated.append(
            "measured on the CPU for a run on GPUs: the times are this CPU's; run `ffn plan` on a node "
            "of the "
            "run's partition (e.g. inside `salloc`) for the GPUs' figures"
        )
    total = sum(stage["seconds"] for stage in stages.values())
    return {
        "config": config_id(cfg),
        "settings": _planned_settings(cfg),
        "layout": {"processes": target, "gpus": gpus, "branch_processes": sizes["target"]},
        "measured_on": {"processes": probe.processes, "device": probe.device, "steps": probe.steps},
        "stages": stages,
        "total_seconds": round(total, 1),
        "gpu_hours": round(sum(stage["gpu_hours"] for stage in stages.values()), 3),
        "disk_bytes": cache_bytes + checkpoint_bytes,
        "extrapolated": extrapolated,
    }


def _figures(seconds: float, gpus: int, memory_gb: float | None, disk_bytes: int, basis: str) -> dict:
    return {
        "seconds": round(seconds, 1),
        "gpu_hours": round(seconds * gpus / 3600, 3),
        "peak_memory_gb": None if memory_gb is None else round(memory_gb, 2),
        "disk_bytes": int(disk_bytes),
        "basis": basis,
    }


def _fits(cfg: Config, has_val: bool) -> int:
    from ffn_dist.stages.classifier import candidates, selection_split

    return len(candidates(cfg, selection_split(cfg, has_val)))


def _planned_settings(cfg: Config) -> dict:
    """What the plan depends on: every setting but SLURM's (whose time limits it sets)."""
    return {
        k: v
        for k, v in flatten(dataclasses.asdict(cfg)).items()
        if not k.startswith("launch.") and k != "name"
    }


# ----------------------------------------------------------------------------- the command
def plan(cfg: Config, processes: int | None = None, steps: int = 10, dp_efficiency: float = 0.9) -> dict:
    """Measure, predict, write `output_dir/plan.json` (what `ffn submit --plan` and `ffn status` read)."""
    if steps <= WARMUP_STEPS:
        raise FFNError(f"--steps: {steps}; give more than the {WARMUP_STEPS} warm-up steps")
    if not 0 < dp_efficiency <= 1:
        raise FFNError(f"--dp-efficiency: {dp_efficiency:g}; give a share in (0, 1]")
    target = target_processes(cfg)
    split_batches(cfg, target)  # a layout that cannot keep the recipe is refused before measuring
    processes = processes or probe_processes(cfg, target)
    shape = run_shape(cfg, target, processes)
    probe = run_probe(cfg, processes, steps, shape.dims, shape.rows["train"])
    result = predict(cfg, probe, shape, dp_efficiency)
    write_json(plan_path(cfg), result)
    return result


def read_plan(cfg: Config) -> dict:
    """The plan of this run's config, refused when it was made for other settings."""
    path = plan_path(cfg)
    if not path.is_file():
        raise FFNError(f"{path}: no plan; run `ffn plan` with the same config first")
    saved = json.loads(path.read_text())
    changes = describe_changes(saved["settings"], _planned_settings(cfg), then="planned")
    if changes:
        raise FFNError(f"{path}: made for another config ({'; '.join(changes[:5])}); run `ffn plan` again")
    return saved


def time_limits(saved: dict, margin: float, warning_s: float = 0.0) -> list[str]:
    """`launch.*_minutes` overrides: each job's predicted time x `margin`, plus its start
    (`JOB_START_S`) and `warning_s` (`launch.signal_delay_s`: SLURM's USR2 comes that long
    before the limit, and a job should not be stopped before its predicted end), in whole minutes."""
    if margin < 1:
        raise FFNError(
            f"--plan-margin: {margin:g}; a time limit below the prediction would cut the job short"
        )
    seconds: dict[str, float] = {}
    for stage in STAGES:
        planned = saved["stages"].get(stage.name, {}).get("seconds", 0.0)  # a plan older than the stage
        seconds[stage.minutes] = seconds.get(stage.minutes, 0.0) + planned
    minutes = {
        key: math.ceil((value * margin + JOB_START_S + warning_s) / 60) for key, value in seconds.items()
    }
    return [f"launch.{key}={value}" for key, value in minutes.items()]


def format_plan(result: dict) -> str:
    from ffn_dist.tables import markdown_table

    rows = []
    for name, stage in result["stages"].items():
        memory = "-" if stage["peak_memory_gb"] is None else f"{stage['peak_memory_gb']:.2f} GB"
        disk = f"{stage['disk_bytes'] / 1e6:,.1f} MB" if stage["disk_bytes"] else "-"
        rows.append([name, format_duration(stage["seconds"]), f"{stage['gpu_hours']:.3f}", memory, disk])
    total_disk = f"{result['disk_bytes'] / 1e6:,.1f} MB"
    rows.append(
        ["total", format_duration(result["total_seconds"]), f"{result['gpu_hours']:.3f}", "", total_disk]
    )
    layout = result["layout"]
    lines = [
        f"plan for {layout['processes']} process(es)"
        + (f", {layout['gpus']} GPU(s)" if layout["gpus"] else " on the CPU")
        + f" (config {result['config']}):",
        markdown_table(["stage", "wall time", "GPU-hours", "peak memory / process", "on disk"], rows),
        "how:",
        *(f"- {name}: {stage['basis']}" for name, stage in result["stages"].items()),
        "extrapolated:",
        *(f"- {line}" for line in result["extrapolated"]),
    ]
    return "\n".join(lines)
