"""`ffn bench gpu` (run by scripts/gpu_check.sh): the GPU paths, measured on one CUDA device.

- DALI `mixed` decoding (nvJPEG on the GPU) of generated ImageNet-sized JPEGs, img/s;
- a ResNet-50 stage-1 step in bf16 with channels_last on synthetic batches, and the same step
  fed by DALI from those JPEGs (img/s of both and their ratio; goal: within 5%), with a bare
  PyTorch loop for reference (`ffn bench train`);
- the feature cache against a plain forward of both ResNet-50s (`ffn bench cache`).
"""

from __future__ import annotations

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
from ffn_dist.data.loader import build_loader
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


def bench_gpu(images: int, batch_size: int, steps: int, rounds: int) -> dict:
    if not torch.cuda.is_available():
        raise FFNError("ffn bench gpu needs a CUDA device; none is visible")
    with tempfile.TemporaryDirectory(prefix="ffn-bench-gpu-") as tmp:
        write_large_jpegs(Path(tmp), images)
        (Path(tmp) / "test.txt").write_text((Path(tmp) / "train.txt").read_text())
        overrides = [
            f"data.root={tmp}",
            "data.train_split=train.txt",
            "data.test_split=test.txt",
            "data.num_classes=10",
            f"data.batch_size={batch_size}",
            "data.num_threads=8",
            f"output_dir={tmp}/run",
            "cache.train_views=1",
        ]
        cfg = load_config(CONFIG, overrides)
        figures = {"machine": machine(), "versions": versions(), "batch_size": batch_size}
        figures["dali_mixed_img_s"] = _dali_mixed_rate(cfg)
        print(f"DALI mixed decoding + RRC 224: {figures['dali_mixed_img_s']:,.0f} img/s", flush=True)
        train = bench_train(cfg, steps, rounds)
        rates = train["images_per_s"]
        figures["stage1"] = {
            "images_per_s": rates,
            "synthetic_img_s": rates["stage-1 step (mixup, KPS, engine)"],
            "dali_fed_img_s": rates["end to end (dali loader)"],
            "dali_fed_vs_synthetic": rates["end to end (dali loader)"]
            / rates["stage-1 step (mixup, KPS, engine)"],
            "stage1_vs_bare": train["stage1_vs_bare"],
        }
        figures["cache"] = bench_cache(load_config(CONFIG, overrides), rounds=1, work_dir=tmp)
    return figures
