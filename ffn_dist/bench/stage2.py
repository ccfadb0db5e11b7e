"""`ffn bench stage2`: seconds per classifier epoch on the feature cache, against
(a) the matrix products the epoch needs, timed alone in the same run, on a synthetic cache
    of ImageNet-LT's size (115,846 rows x 2 branches x 2048 dims, fp16, memory-mapped), and
(b) the authors' way: both frozen backbones run on every batch of every epoch, timed on the
    configured data (CIFAR-10-LT with ResNet-32, or the built-in digits) and compared with
    an epoch on a cache of the same rows and dims.
The cache epochs run `CachedEpochs.epoch` on FFN's loss, the code `ffn train-classifier` runs.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import torch

from ffn_dist.bench.timing import (
    endless_batches,
    interleaved_medians,
    interleaved_runs,
    median_ratio,
    medians,
    synchronize,
)
from ffn_dist.cache.synthetic import write_synthetic_cache
from ffn_dist.config import Config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader, default_device
from ffn_dist.models.backbones import backbone_entry
from ffn_dist.models.heads import fused_embedding
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.probe import cache_epoch_runner, ffn_step
from ffn_dist.stages.backbones import build_network
from ffn_dist.tables import markdown_table


def matmul_bound_runner(steps: int, batch: int, dims: int, classes: int, device: torch.device):
    """The two products of a step, logits z W^T and weight gradient G^T z, `steps` times."""
    z, grad = torch.randn(batch, dims, device=device), torch.randn(batch, classes, device=device)
    weight = torch.randn(classes, dims, device=device)

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            z @ weight.t()
            grad.t() @ z
        synchronize(device)
        return time.perf_counter() - start

    return run


def _backbone_epoch_runner(cfg: Config, timed_steps: int, scratch: str | None = None):
    """Seconds per epoch of the authors' stage 2, from `timed_steps` timed steps: both frozen
    backbones on an augmented, class-balanced batch, then the same classifier step, all on
    the default device (a GPU when there is one: the backbones are the cost)."""
    device = default_device()
    dataset = open_dataset(cfg.data)
    networks = {
        b: place_model(build_network(cfg, b), device).eval().requires_grad_(False) for b in cfg.branches
    }
    loader = build_loader(cfg.data, dataset.train, train=True, balanced=True, device=device, run_dir=scratch)
    s2 = cfg.stage2
    step_of = ffn_step(
        cfg, dataset.train.class_counts(), backbone_entry(cfg.model.arch).embedding_dim, device
    )
    steps_per_epoch = math.ceil(len(dataset.train) / cfg.data.batch_size)
    stream = endless_batches(loader)

    def step():
        batch = next(stream)
        with torch.no_grad(), autocast(device, cfg.model.precision):
            images = place_images(batch.images, device)
            features = {b: networks[b].embed(images).float() for b in cfg.branches}
        step_of(fused_embedding(features, s2.fusion), batch.labels.to(device), s2.lr)

    step()  # warm-up: loader start, first allocations

    def run() -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(timed_steps):
            step()
        synchronize(device)
        return (time.perf_counter() - start) / timed_steps * steps_per_epoch

    return run, len(dataset.train)


def bench_stage2(
    cfg: Config, rows: int, dims: int, classes: int, rounds: int, backbone_steps: int, work_dir: str | None
) -> dict:
    batch = cfg.stage2.batch_size
    large = None
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ffn-bench-stage2-") as tmp:
        if rows:
            shape = f"{rows:,} rows x {len(cfg.branches)} x {dims}"
            print(f"writing a synthetic cache: {shape} fp16 ...", flush=True)
            big = write_synthetic_cache(Path(tmp) / "large", cfg.branches, rows, dims, classes)
            big_epoch, big_steps = cache_epoch_runner(_with_classes(cfg, classes), big)
            bound = matmul_bound_runner(big_steps, batch, dims, classes, default_device())
            torch_epoch, _ = cache_epoch_runner(_with_classes(cfg, classes), big, torch_step=True)
            large_runs = interleaved_runs(
                {"cache epoch": big_epoch, "torch step": torch_epoch, "matrix products": bound}, rounds
            )
            large = medians(large_runs)

        backbones, images = _backbone_epoch_runner(cfg, backbone_steps, tmp)
        embedding_dim = backbone_entry(cfg.model.arch).embedding_dim
        classes_here = cfg.data.num_classes
        same = write_synthetic_cache(Path(tmp) / "same", cfg.branches, images, embedding_dim, classes_here)
        same_epoch, _ = cache_epoch_runner(cfg, same)
        small = interleaved_medians({"cache epoch": same_epoch, "backbones every batch": backbones}, rounds)

    result = {
        "device": str(default_device()),
        "threads": torch.get_num_threads(),
        "batch_size": batch,
        "data": {"images": images, "arch": cfg.model.arch, "root": cfg.data.root, "seconds_per_epoch": small},
        "backbones_vs_cache": small["backbones every batch"] / small["cache epoch"],
    }
    table = []
    if large:
        result["large"] = {"rows": rows, "dims": dims, "classes": classes, "seconds_per_epoch": large}
        result["torch_vs_written_out"] = median_ratio(large_runs["torch step"], large_runs["cache epoch"])
        result["large_epoch_vs_matmul_bound"] = median_ratio(
            large_runs["cache epoch"], large_runs["matrix products"]
        )
        result["large"]["rounds"] = large_runs
        table += [
            [f"cache {rows:,} x 2 x {dims}, {classes} classes", f"{large['cache epoch']:.2f}", ""],
            ["  its matrix products alone", f"{large['matrix products']:.2f}", ""],
            ["  cache / products, median per round", "", f"{result['large_epoch_vs_matmul_bound']:.2f}x"],
            ["  the same on torch's step (autograd, torch.optim)", f"{large['torch step']:.2f}", ""],
            ["  torch's / written-out step, median per round", "", f"{result['torch_vs_written_out']:.2f}x"],
        ]
    table += [
        [f"{cfg.data.root} ({images:,} images): cache", f"{small['cache epoch']:.3f}", ""],
        [f"  both {cfg.model.arch} backbones every batch", f"{small['backbones every batch']:.1f}", ""],
        ["  backbones / cache", "", f"{result['backbones_vs_cache']:,.0f}x"],
    ]
    print(
        f"\nstage-2 epoch, batch {batch}, {torch.get_num_threads()} threads, median of {rounds} rounds\n"
        + markdown_table(["setting", "seconds per epoch", "ratio"], table),
        flush=True,
    )
    return result


def _with_classes(cfg: Config, classes: int) -> Config:
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_classes=classes))
