"""`ffn bench gpu` (run by scripts/gpu_check.sh): the GPU paths, measured on one CUDA device.

- DALI `mixed` decoding (nvJPEG on the GPU) of generated ImageNet-sized JPEGs, img/s;
- a ResNet-50 stage-1 step in bf16 with channels_last on synthetic batches, and the same step
  fed by DALI from those JPEGs (img/s of both and their ratio; goal: within 5%), with a bare
  PyTorch loop for reference (`ffn bench train`);
- the feature cache against a plain forward of both ResNet-50s (`ffn bench cache`).
Where DALI is not installed (a bare CUDA image) the DALI figures are recorded as missing,
with the reason, and the loader-fed figures use the torch loader.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from ffn_dist.bench.cache import bench_cache
from ffn_dist.bench.loader import write_large_jpegs
from ffn_dist.bench.suite import machine, versions
from ffn_dist.bench.timing import endless_batches
from ffn_dist.bench.train import bench_train
from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader, dali_missing
from ffn_dist.errors import FFNError

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "imagenet_lt_r50.yaml"


def _dali_mixed_rate(cfg, seconds: float = 20.0) -> float:
    loader = build_loader(cfg.data, open_dataset(cfg.data).train, train=True)
    batches = endless_batches(loader)
    for _ in range(3):
        next(batches)
    torch.cuda.synchronize()
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seen += len(next(batches).labels)
    torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def bench_gpu(images: int, batch_size: int, steps: int, rounds: int, allow_cpu: bool = False) -> dict:
    """`allow_cpu` (tests only) runs the same code on the CPU, whose figures mean nothing."""
    if not (allow_cpu or torch.cuda.is_available()):
        raise FFNError("ffn bench gpu needs a CUDA device; none is visible")
    with tempfile.TemporaryDirectory(prefix="ffn-bench-gpu-") as tmp:
        write_large_jpegs(Path(tmp), images)
        (Path(tmp) / "test.txt").write_text((Path(tmp) / "train.txt").read_text())
        overrides = [
            f"data.root={tmp}",
            "data.train_split=train.txt",
            "data.test_split=test.txt",
            "data.val_split=null",
            "data.num_classes=10",
            f"data.batch_size={batch_size}",
            f"data.num_threads={min(8, os.cpu_count() or 1)}",
            f"output_dir={tmp}/run",
            "cache.train_views=1",
        ]
        missing = dali_missing()
        if missing:
            print(f"DALI is not installed ({missing}): its figures are skipped, the torch loader feeds")
            overrides.append("data.backend=torch")
        cfg = load_config(CONFIG, overrides)
        figures = {"machine": machine(), "versions": versions(), "batch_size": batch_size}
        figures.update(dali_missing=missing, dali_mixed_img_s=None)
        if not missing:
            figures["dali_mixed_img_s"] = _dali_mixed_rate(cfg)
            print(f"DALI mixed decoding + RRC 224: {figures['dali_mixed_img_s']:,.0f} img/s", flush=True)
        train = bench_train(cfg, steps, rounds)
        rates = train["images_per_s"]
        synthetic = rates["stage-1 step (mixup, KPS, engine)"]
        fed = rates[f"end to end ({cfg.data.backend} loader)"]
        figures["stage1"] = {
            "images_per_s": rates,
            "synthetic_img_s": synthetic,
            "loader": cfg.data.backend,
            "loader_fed_img_s": fed,
            "loader_fed_vs_synthetic": fed / synthetic,
            "stage1_vs_bare": train["stage1_vs_bare"],
        }
        figures["cache"] = bench_cache(load_config(CONFIG, overrides), rounds=1, work_dir=tmp)
    return figures
