"""`ffn bench train`: the stage-1 step against a bare PyTorch loop, and end to end with the loader.

In one process (a world of one, the engine wrapping the model for its group):
- bare: the same network and batch, `F.cross_entropy`, backward, `SGD.step`, nothing else;
- stage-1 step: `BranchTrainer.train_step` on the same batch (mixup, KPS loss, engine);
- end to end: `train_step` fed by the configured loader;
- loader alone: the same loader drained without training.
Both synthetic loops get their batch the way the configured loader delivers it (on the
device from DALI `mixed`; in pinned host memory, copied without blocking, from the torch
loader), and every timing waits for the GPU. Rounds are interleaved and the medians reported.
Also recorded: whether a step synchronises with the host (on CUDA, under
`torch.cuda.set_sync_debug_mode("error")`) and a profile of where a step's time goes.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from ffn_dist.bench.timing import endless_batches, interleaved_medians, synchronize
from ffn_dist.config import Config, head_branch
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import init_world, make_branches
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.stages.backbones import BranchTrainer, build_network
from ffn_dist.tables import markdown_table

PROFILED_STEPS = 5


def batch_delivery(backend: str, device: torch.device) -> str:
    """Where a loader hands its batches over: 'device' (DALI mixed on CUDA), 'pinned' (the
    torch loader on CUDA) or 'host' (any loader on the CPU)."""
    if device.type != "cuda":
        return "host"
    return "device" if backend == "dali" else "pinned"


def as_delivered(tensor: torch.Tensor, delivery: str, device: torch.device) -> torch.Tensor:
    if delivery == "device":
        return tensor.to(device)
    return tensor.pin_memory() if delivery == "pinned" else tensor


def _timed(step, batch_size: int, steps: int, device: torch.device, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch_size * steps / (time.perf_counter() - start)


def host_syncs(step, device: torch.device, steps: int = 3) -> str | None:
    """None if `steps` steps run without synchronising with the host, else what did; on the
    CPU there is nothing to synchronise with (tests/test_host_reads.py checks the reads)."""
    if device.type != "cuda":
        return "not applicable: the CPU has no queue to wait for"
    step()
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            step()
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return None


def step_profile(step, device: torch.device, steps: int = PROFILED_STEPS, top: int = 15) -> dict:
    """Where a step's time goes: the operators with the most self time, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    events = prof.key_averages()
    # torch >= 2.4 calls it device time; where the attribute is missing, only CPU time is reported
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    return {
        "sorted_by": key,
        "ms_per_step": [
            {
                "op": e.key,
                "calls": e.count // steps,
                "self_cpu": e.self_cpu_time_total / 1000 / steps,
                "self_device": getattr(e, "self_device_time_total", 0) / 1000 / steps,
            }
            for e in ranked
        ],
    }


def bench_train(cfg: Config, steps: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ffn-bench-train-") as scratch:
        # the trainer's TensorBoard files and decoded arrays go to scratch, not the config's run
        return _bench_train(dataclasses.replace(cfg, output_dir=scratch), steps, rounds)


def _bench_train(cfg: Config, steps: int, rounds: int) -> dict:
    world = init_world(cfg.dist.timeout_s)
    dataset = open_dataset(cfg.data)
    timed = head_branch(cfg)  # the paper's KPS branch: a cosine head and a margin loss
    branch = next(b for b in make_branches(world, cfg) if b.name == timed)
    trainer = BranchTrainer(cfg, world, branch, dataset)
    device, size, side = world.device, cfg.data.batch_size, cfg.data.image_size
    delivery = batch_delivery(cfg.data.backend, device)
    gen = torch.Generator().manual_seed(0)
    images = as_delivered(torch.randn(size, 3, side, side, generator=gen), delivery, device)
    labels = as_delivered(torch.randint(cfg.data.num_classes, (size,), generator=gen), delivery, device)
    rng = np.random.default_rng(0)

    bare_net = place_model(build_network(cfg, timed), device)
    bare_opt = torch.optim.SGD(
        bare_net.parameters(), lr=0.01, momentum=0.9, weight_decay=cfg.stage1.weight_decay
    )

    def bare_step():
        x, y = place_images(images, device), labels.to(device, non_blocking=True)
        with autocast(device, cfg.model.precision):
            loss = F.cross_entropy(bare_net(x), y)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    def stage1_step():
        trainer.train_step(images, labels, rng, 0.01)

    def end_to_end() -> float:
        batches = endless_batches(trainer.train_loader)  # a fresh pass each round

        def step():
            batch = next(batches)
            trainer.train_step(batch.images, batch.labels, rng, 0.01)

        return _timed(step, size, steps, device)

    def loader_alone() -> float:
        batches = endless_batches(trainer.train_loader)
        return _timed(lambda: next(batches), size, steps * 4, device)

    runners = {
        "bare PyTorch loop": lambda: _timed(bare_step, size, steps, device),
        "stage-1 step (mixup, KPS, engine)": lambda: _timed(stage1_step, size, steps, device),
        f"end to end ({cfg.data.backend} loader)": end_to_end,
        f"{cfg.data.backend} loader alone": loader_alone,
    }
    medians = interleaved_medians(runners, rounds)
    bare = medians["bare PyTorch loop"]
    names = list(runners)
    print(
        f"{cfg.model.arch}, batch {size}, {side}px, {device}, {cfg.dist.engine}, batches {delivery}, "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds of {steps} steps"
    )
    print(
        markdown_table(
            ["loop", "img/s", "vs bare"],
            [[n, f"{medians[n]:,.1f}", f"{medians[n] / bare:.3f}"] for n in names],
        )
    )
    syncs = host_syncs(stage1_step, device)
    print(f"host synchronisation inside a stage-1 step: {syncs or 'none'}")
    profile = step_profile(stage1_step, device)
    torch.distributed.destroy_process_group()
    return {
        "arch": cfg.model.arch,
        "batch_size": size,
        "device": str(device),
        "engine": cfg.dist.engine,
        "batch_delivery": delivery,
        "images_per_s": medians,
        "stage1_vs_bare": medians[names[1]] / bare,
        "end_to_end_vs_bare": medians[names[2]] / bare,
        "loader_vs_end_to_end": medians[names[3]] / medians[names[2]],
        "host_syncs_in_step": syncs,
        "step_profile": profile,
    }
