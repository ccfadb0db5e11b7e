"""`ffn bench gpu --part P` (run part by part by scripts/gpu_check.sh): the GPU paths on one device.

- `jpegs`: generate the ImageNet-sized JPEGs the next parts read, on every core, so that no
  timed part pays for them.
- `stage1`: a ResNet-50 stage-1 step in bf16 with channels_last against a bare PyTorch loop,
  on synthetic batches delivered as the loader delivers them, and fed by the loader from
  generated ImageNet-sized JPEGs (`ffn bench train`); whether a step synchronises with the
  host; where a step's time goes; DALI `mixed` decoding (nvJPEG) when DALI is installed.
- `cache`: the feature cache against a plain forward of both ResNet-50s (`ffn bench cache`).
- `stage2`: a classifier epoch on a cache of ImageNet-LT's size against its matrix products,
  and the authors' way on the demo data (`ffn bench stage2`), on the device.
Where DALI is not installed (a bare CUDA image) its figures are recorded as missing, with the
reason, and the torch loader feeds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ffn_dist.bench.cache import bench_cache
from ffn_dist.bench.loader import write_large_jpegs
from ffn_dist.bench.stage2 import bench_stage2
from ffn_dist.bench.suite import machine, versions
from ffn_dist.bench.timing import endless_batches, synchronize
from ffn_dist.bench.train import bench_train
from ffn_dist.config import load_config, shipped_configs
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader, dali_missing
from ffn_dist.errors import FFNError

CONFIG = shipped_configs() / "imagenet_lt_r50.yaml"
PARTS = ("jpegs", "stage1", "cache", "stage2")
IMAGENET_LT_TRAIN = 115846


def _dali_mixed_rate(cfg, seconds: float = 20.0) -> float:
    device = torch.device("cuda", torch.cuda.current_device())
    loader = build_loader(cfg.data, open_dataset(cfg.data).train, train=True, device=device)
    batches = endless_batches(loader)
    for _ in range(3):
        next(batches)
    synchronize(device)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        seen += len(next(batches).labels)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def _jpegs(work: Path, images: int) -> Path:
    """Generated 400x350 JPEGs (ImageNet-sized) in `work`, written once and reused by every part."""
    root = work / "jpegs"
    if not (root / "train.txt").is_file():
        root.mkdir(parents=True, exist_ok=True)
        write_large_jpegs(root, images)
        (root / "test.txt").write_text((root / "train.txt").read_text())
    return root


def _imagenet_like(work: Path, images: int, batch_size: int, *extra: str):
    root = _jpegs(work, images)
    overrides = [
        f"data.root={root}",
        "data.train_split=train.txt",
        "data.test_split=test.txt",
        "data.val_split=null",
        "data.num_classes=10",
        f"data.batch_size={batch_size}",
        f"data.num_threads={os.cpu_count() or 1}",
        f"output_dir={work}/run",
        *extra,
    ]
    if dali_missing():
        overrides.append("data.backend=torch")
    return load_config(CONFIG, overrides)


def _stage1(work: Path, images: int, batch_size: int, steps: int, rounds: int) -> dict:
    cfg = _imagenet_like(work, images, batch_size)
    figures = {"dali_mixed_img_s": None}
    if not dali_missing() and torch.cuda.is_available():
        figures["dali_mixed_img_s"] = _dali_mixed_rate(cfg)
        print(f"DALI mixed decoding + RRC 224: {figures['dali_mixed_img_s']:,.0f} img/s", flush=True)
    train = bench_train(cfg, steps, rounds)
    rates = train["images_per_s"]
    synthetic = rates["stage-1 step (mixup, KPS, engine)"]
    fed = rates[f"end to end ({cfg.data.backend} loader)"]
    figures.update(
        train,
        bare_img_s=rates["bare PyTorch loop"],
        synthetic_img_s=synthetic,
        loader=cfg.data.backend,
        loader_fed_img_s=fed,
        loader_fed_vs_synthetic=fed / synthetic,
    )
    return figures


def _cache(work: Path, images: int, batch_size: int, rounds: int) -> dict:
    # 4 views of every image: enough passes that the job's fixed costs (checkpoint hashes,
    # the manifest) weigh as little as they do on ImageNet-LT's 115,846 x 5 views.
    cfg = _imagenet_like(work, images, batch_size, "cache.train_views=4", f"cache.batch_size={batch_size}")
    return bench_cache(cfg, rounds, work_dir=str(work))


def _stage2(work: Path, rows: int, steps: int, rounds: int) -> dict:
    cfg = load_config("demo", [f"data.root={work}/demo", f"output_dir={work}/stage2_run"])
    return bench_stage2(cfg, rows, 2048, 1000, rounds, steps, str(work))


def bench_gpu(
    part: str,
    images: int,
    batch_size: int,
    steps: int,
    rounds: int,
    work_dir: str,
    stage2_rows: int = IMAGENET_LT_TRAIN,
    allow_cpu: bool = False,
) -> dict:
    """One part's figures. `allow_cpu` (tests only) runs the same code on the CPU, whose
    figures mean nothing."""
    if not (allow_cpu or torch.cuda.is_available()):
        raise FFNError("ffn bench gpu needs a CUDA device; none is visible")
    if part not in PARTS:
        raise FFNError(f"ffn bench gpu --part: got {part!r}, expected one of {', '.join(PARTS)}")
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    missing = dali_missing()
    if missing:
        print(f"DALI is not installed ({missing}): its figures are skipped, the torch loader feeds")
    figures = {"part": part, "machine": machine(), "versions": versions(), "batch_size": batch_size}
    figures["dali_missing"] = missing
    if part == "jpegs":
        start = time.perf_counter()
        _jpegs(work, images)
        figures[part] = {"images": images, "seconds": round(time.perf_counter() - start, 1)}
    elif part == "stage1":
        figures[part] = _stage1(work, images, batch_size, steps, rounds)
    elif part == "cache":
        figures[part] = _cache(work, images, batch_size, rounds)
    else:
        figures[part] = _stage2(work, stage2_rows, steps, rounds)
    return figures
