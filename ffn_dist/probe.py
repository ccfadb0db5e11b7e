"""What `ffn plan` measures (docs/running.md writes the model that extrapolates it):

- stage 1: `ffn train-backbones --max-steps K` under torchrun, in a scratch directory, on
  the config's process count or `--nproc P`: the median seconds of an optimizer step of
  each branch (after the first `WARMUP_STEPS`), the start-up before the first step, the
  checkpoint each branch writes when it stops, and each process's peak memory (TensorBoard's
  scalars);
- the data stage, run as it is;
- an epoch of FFN's classifier on a synthetic cache of the run's shape (its training rows up
  to `CLASSIFIER_ROWS`).
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ffn_dist.cache.store import FeatureCache
from ffn_dist.cache.synthetic import write_synthetic_cache
from ffn_dist.checkpoint import interrupted_path
from ffn_dist.config import Config, with_settings
from ffn_dist.distributed import peak_memory_gb, visible_gpus
from ffn_dist.errors import FFNError
from ffn_dist.losses import LDAMLoss
from ffn_dist.models.heads import CosineHead
from ffn_dist.run.history import freeze_config
from ffn_dist.run.paths import branch_dir, tensorboard_dir
from ffn_dist.stages.epochs import CachedEpochs, CosineStep, OptimizerStep, classifier_device
from ffn_dist.stages.prepare import prepare
from ffn_dist.stopping import run_group
from ffn_dist.torchrun import command as torchrun_command

WARMUP_STEPS = 3  # steps whose time is start-up (first allocations, loader start), not a step's
CLASSIFIER_ROWS = 8192  # rows of the synthetic cache a classifier epoch is timed on


def on_processes(cfg: Config, count: int, more: dict | None = None) -> Config:
    """`cfg` on `count` processes, shared evenly by its branches (and `more` settings)."""
    even = {f"branches.{name}.processes": None for name in cfg.branches}
    return with_settings(cfg, {"dist.nproc": count, **even, **(more or {})})


@dataclass
class Probe:
    processes: int
    device: str  # "cuda" or "cpu"
    steps: int  # steps timed a branch
    step_s: dict[str, float]  # median seconds of an optimizer step (the global batch)
    startup_s: float  # launch to the first step's end, less a step
    checkpoint_bytes: dict[str, int]
    peak_memory_gb: float  # over the processes
    data_s: float  # the data stage
    classifier_epoch_s: float  # an epoch on the run's training rows, scaled from CLASSIFIER_ROWS
    classifier_memory_gb: float
    notes: list[str]


def _scalars(directory: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars(tag) if tag in events.Tags()["scalars"] else []


def probe_stage1(cfg: Config, processes: int, steps: int, scratch: Path) -> dict:
    """`steps` steps of each branch under torchrun in `scratch`; per branch the step times
    (from each step's TensorBoard wall time), the checkpoint it stopped with, and the peak memory."""
    probe = on_processes(cfg, processes, {"output_dir": str(scratch), "stage1.log_every": 1})
    config = freeze_config(probe)
    command = torchrun_command(processes, "train-backbones", str(config), "--max-steps", str(steps))
    print(
        f"probe: stage 1, {steps} steps a branch on {processes} process(es): {' '.join(command[2:])}",
        flush=True,
    )
    launched = time.time()
    run_group(
        command, stdout=sys.stderr
    )  # exits 3 (stopped, checkpointed) when it ran its steps: judged by its log
    measured = {}
    for branch in cfg.branches:
        walls = [event.wall_time for event in _scalars(tensorboard_dir(probe, branch), f"{branch}/loss")]
        if len(walls) < 2:
            continue  # one process: the branches train in turn, and the probe stops after the first
        gaps = [b - a for a, b in zip(walls, walls[1:], strict=False)]
        step_s = statistics.median(gaps[WARMUP_STEPS - 1 :] or gaps)
        memory = [e.value for e in _scalars(tensorboard_dir(probe, branch), f"{branch}/peak_memory_gb")]
        checkpoint = interrupted_path(branch_dir(probe, branch))
        measured[branch] = {
            "step_s": step_s,
            "startup_s": max(walls[0] - launched - step_s, 0.0),
            "checkpoint_bytes": checkpoint.stat().st_size if checkpoint.is_file() else 0,
            "peak_memory_gb": max(memory, default=0.0),
            "steps": len(walls),
        }
    if not measured:
        raise FFNError(
            f"ffn plan: stage 1's probe logged fewer than 2 steps in {scratch} (its output above says why); "
            "nothing was planned"
        )
    return measured


def probe_classifier(cfg: Config, train_rows: int, dims: int, scratch: Path) -> tuple[float, float]:
    """Seconds of a stage-2 epoch on the run's training rows (timed on up to CLASSIFIER_ROWS of a
    synthetic cache of its shape, scaled linearly), and this process's peak memory (GB)."""
    rows = min(train_rows, CLASSIFIER_ROWS)
    classes = cfg.data.num_classes
    cache = write_synthetic_cache(scratch / "cache", cfg.branches, rows, dims, classes, test_rows=64)
    run, _ = cache_epoch_runner(cfg, cache)
    times = [run() for _ in range(3)]
    return statistics.median(times[1:]) * train_rows / rows, peak_memory_gb(_device_of_classifier(cfg, dims))


def _device_of_classifier(cfg: Config, dims: int):
    return classifier_device(cfg.stage2.device, cfg.data.num_classes * dims)


def run_probe(cfg: Config, processes: int, steps: int, dims: int, train_rows: int) -> Probe:
    # what the probe prints is progress, on stderr: stdout is the plan (`--json`)
    with tempfile.TemporaryDirectory(prefix="ffn-plan-") as scratch, contextlib.redirect_stdout(sys.stderr):
        scratch = Path(scratch)
        tick = time.perf_counter()
        prepare(with_settings(cfg, {"output_dir": str(scratch / "data")}))
        data_s = time.perf_counter() - tick
        measured = probe_stage1(cfg, processes, steps, scratch / "stage1")
        epoch_s, classifier_memory = probe_classifier(cfg, train_rows, dims, scratch)
    notes = []
    timed = next(iter(measured))
    for branch in cfg.branches:
        if branch not in measured:
            measured[branch] = measured[timed]
            notes.append(f"{branch}: not timed (one process trains the branches in turn), taken as {timed}'s")
    return Probe(
        processes=processes,
        device="cuda" if visible_gpus() else "cpu",
        steps=min(m["steps"] for m in measured.values()),
        step_s={b: measured[b]["step_s"] for b in cfg.branches},
        startup_s=max(m["startup_s"] for m in measured.values()),
        checkpoint_bytes={b: measured[b]["checkpoint_bytes"] for b in cfg.branches},
        peak_memory_gb=max(m["peak_memory_gb"] for m in measured.values()),
        data_s=data_s,
        classifier_epoch_s=epoch_s,
        classifier_memory_gb=classifier_memory,
        notes=notes,
    )


def ffn_step(cfg: Config, counts, dims: int, device: torch.device) -> CosineStep:
    """FFN's classifier (a cosine head, random init) and its step, as the classifier stage builds them."""
    s2 = cfg.stage2
    head = CosineHead(dims, cfg.data.num_classes).to(device)
    loss = LDAMLoss(counts, s2.ldam_max_m, s2.ldam_s).trusting_labels().to(device)
    return CosineStep(head, loss, s2.momentum, s2.weight_decay)


def cache_epoch_runner(cfg: Config, cache: FeatureCache, torch_step: bool = False):
    """Epochs of FFN's classifier on `cache`: its written-out step, or with `torch_step` the
    same on autograd and torch.optim.SGD (what the written-out step is measured against)."""
    train = cache.splits["train"]
    device = classifier_device(cfg.stage2.device, cfg.data.num_classes * cache.dims)
    loop = CachedEpochs(cfg, train, device)
    counts = torch.bincount(torch.from_numpy(train.labels), minlength=cfg.data.num_classes)
    step = ffn_step(cfg, counts, cache.dims, device)
    if torch_step:
        head = CosineHead(cache.dims, cfg.data.num_classes).to(device)
        loss, s2 = step.loss, cfg.stage2
        step = OptimizerStep(
            [head.weight], lambda z, y: loss(head(z, normalized=True), y), s2.momentum, s2.weight_decay
        )
    epochs = iter(range(10**6))

    def run() -> float:
        start = time.perf_counter()
        loop.epoch(step, next(epochs), "balanced").item()  # waits for the device
        return time.perf_counter() - start

    return run, loop.steps
