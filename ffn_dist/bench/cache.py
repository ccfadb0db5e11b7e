"""`ffn bench cache`: feature-cache extraction against a plain forward pass of both backbones.

Both read the same (split, view) loaders, so decoding is in both: the plain pass runs the
two frozen backbones and discards the embeddings; the cache pass is `ffn cache-features`
itself (normalise, fp16, shard files, checksums, manifest), in a world of one process, on
weights written as final stage-1 checkpoints of a scratch run. Also: the cache's size on
disk against rows x dims x bytes of what it stores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ffn_dist.bench.timing import interleaved_runs, median_ratio, medians, synchronize
from ffn_dist.cache.store import MANIFEST
from ffn_dist.checkpoint import checkpoint_state, save_checkpoint
from ffn_dist.config import Config
from ffn_dist.data.dataset import open_dataset, write_builtin
from ffn_dist.data.loader import build_loader, default_device
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.run.paths import branch_dir, cache_dir, final_checkpoint
from ffn_dist.run.stages import begin_stage, finish_stage, stage_identity
from ffn_dist.stages.backbones import build_network
from ffn_dist.stages.cache import STORED_DTYPES, cache_features
from ffn_dist.tables import markdown_table

WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def fake_stage1(cfg: Config) -> None:
    """A complete stage 1 of freshly initialised weights (timings do not care)."""
    write_builtin(cfg.data)  # the record hashes the split files
    begin_stage(cfg, "stage1")
    for branch in cfg.branches:
        state = checkpoint_state(build_network(cfg, branch).state_dict(), stage_identity(cfg, "stage1"))
        save_checkpoint(branch_dir(cfg, branch), cfg.stage1.epochs, state, keep=1)
    finish_stage(cfg, "stage1", [final_checkpoint(cfg, branch) for branch in cfg.branches])


def _loaders(cfg: Config, scratch: str):
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.cache.batch_size)
    for name, split in open_dataset(cfg.data).splits().items():
        for view in range(cfg.cache.train_views if name == "train" else 1):
            loader = build_loader(data_cfg, split, train=view > 0, order="sequential", run_dir=scratch)
            loader.set_epoch(view)
            yield loader


def bench_cache(cfg: Config, rounds: int, work_dir: str | None = None) -> dict:
    device = default_device()
    networks = {b: place_model(build_network(cfg, b), device).eval() for b in cfg.branches}

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ffn-bench-cache-") as tmp:
        # built once untimed: the memory backend decodes here, and both passes share its arrays
        images = sum(len(loader.split) for loader in _loaders(cfg, tmp))

        def plain() -> float:
            start = time.perf_counter()
            with torch.no_grad(), autocast(device, cfg.model.precision):
                for loader in _loaders(cfg, tmp):
                    for batch in loader:
                        x = place_images(batch.images, device)
                        for network in networks.values():
                            network.embed(x)
            synchronize(device)
            return images / (time.perf_counter() - start)

        numbers = iter(range(10**6))

        def cached() -> float:
            run_cfg = dataclasses.replace(cfg, output_dir=str(Path(tmp) / f"run{next(numbers)}"))
            fake_stage1(run_cfg)
            for key in WORLD_ENV:  # a fresh world of one for every round
                os.environ.pop(key, None)
            start = time.perf_counter()
            cache_features(run_cfg)
            rate = images / (time.perf_counter() - start)
            cached.last = run_cfg
            return rate

        # a warm-up round first: the first pass alone would pay for starting the loader's
        # workers and cuDNN's first calls, biasing the ratio
        runs = interleaved_runs(
            {"plain forward, both backbones": plain, "ffn cache-features": cached}, rounds, 1
        )
        rates = medians(runs)
        manifest = json.loads((cache_dir(cached.last) / MANIFEST).read_text())
        on_disk = sum(p["bytes"] for s in manifest["splits"].values() for p in s["parts"])
    rows = sum(s["rows"] for s in manifest["splits"].values())
    stored = len(cfg.branches) if cfg.cache.store == "normalized" else 1
    payload = sum(  # each split in its own dtype (val and test: fp32)
        entry["rows"] * manifest["dims"] * stored * STORED_DTYPES[manifest["dtype"][name]].itemsize
        for name, entry in manifest["splits"].items()
    )
    result = {
        "images": images,
        "device": str(device),
        "images_per_s": rates,
        "cache_vs_plain": median_ratio(runs["ffn cache-features"], runs["plain forward, both backbones"]),
        "bytes_on_disk": on_disk,
        "rows_x_dims_x_bytes": payload,
        "size_vs_payload": on_disk / payload,
    }
    print(
        f"{cfg.model.arch}, {images:,} images ({cfg.cache.train_views} train views), {device}, "
        f"median of {rounds} rounds after a warm-up round\n"
        + markdown_table(
            ["pass", "img/s", "ratio"],
            [
                ["plain forward, both backbones", f"{rates['plain forward, both backbones']:,.1f}", "1.000"],
                [
                    "ffn cache-features",
                    f"{rates['ffn cache-features']:,.1f}",
                    f"{result['cache_vs_plain']:.3f}",
                ],
            ],
        )
        + f"\ncache size {on_disk:,} bytes = {result['size_vs_payload']:.3f} x rows x dims x bytes "
        f"({rows:,} rows x {manifest['dims']} x {stored}, train {cfg.cache.dtype}, val and test fp32)",
        flush=True,
    )
    return result
