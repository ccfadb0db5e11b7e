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
import torch.nn.functional as F

from ffn_dist.bench.timing import (
    endless_batches,
    interleaved_medians,
    interleaved_runs,
    median_ratio,
    medians,
    synchronize,
)
from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import FeatureCache, open_cache, write_manifest
from ffn_dist.config import Config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader, default_device
from ffn_dist.losses import LDAMLoss
from ffn_dist.models.backbones import backbone_entry
from ffn_dist.models.heads import CosineHead, fused_embedding
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.stages.backbones import build_network
from ffn_dist.stages.epochs import CachedEpochs, CosineStep, OptimizerStep, classifier_device
from ffn_dist.tables import markdown_table


def write_synthetic_cache(
    directory: Path,
    branches,
    rows: int,
    dims: int,
    classes: int,
    test_rows: int = 1024,
    shard_rows: int = 16384,
) -> FeatureCache:
    """Random unit embeddings of each of `branches` with the shapes of a real cache (values
    do not change timings)."""
    gen = torch.Generator().manual_seed(0)
    splits = {}
    for name, count in (("train", rows), ("test", test_rows)):
        parts = []
        for number, start in enumerate(range(0, count, shard_rows)):
            n = min(shard_rows, count - start)
            tensors = {b: F.normalize(torch.randn(n, dims, generator=gen), dim=1).half() for b in branches}
            tensors["labels"] = torch.arange(start, start + n) % classes
            tensors["indices"] = torch.arange(start, start + n)
            file = f"{name}/view0/part{number:05d}.safetensors"
            info = write_shard(directory / file, tensors, {"split": name, "view": "0", "part": str(number)})
            parts.append({**info, "file": file, "view": 0})
        splits[name] = {"rows": count, "parts": parts}
    write_manifest(directory, {"store": "normalized", "dtype": "fp16", "dims": dims, "splits": splits})
    return open_cache(directory, verify=False)


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
