"""`ffn bench loader`: DALI CPU pipeline vs torchvision DataLoader, same transforms and threads,
and the memory backend where it applies.

Two image sets: CIFAR-sized JPEGs (a given CIFAR split file, else the built-in digits,
which are 32x32 JPEGs too) with the CIFAR train transform, and generated ImageNet-sized JPEGs
(400x350) with random-resized-crop 224 + jitter (which the memory backend does not do). The
memory backend's one-off decoding happens when its loader is built, before the timing.
"""

from __future__ import annotations

import functools
import gc
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ffn_dist.bench.timing import endless_batches, images_per_second, interleaved_medians
from ffn_dist.config import DataConfig
from ffn_dist.data.builtin import ensure_builtin
from ffn_dist.data.loader import build_loader
from ffn_dist.data.splits import Split, read_split, write_split
from ffn_dist.tables import markdown_table

LARGE_SIZE = (400, 350)


def write_large_jpegs(out_dir: Path, count: int, seed: int = 0) -> Path:
    """Smooth random colour fields with texture, so JPEG sizes resemble photographs; written
    by every core (image i drawn from (seed, i) alone, so the files do not depend on it)."""
    w, h = LARGE_SIZE
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)

    def write(i: int) -> tuple[str, int]:
        rng = np.random.default_rng([seed, i])
        coeffs = rng.normal(size=(3, 4))
        base = np.stack([c[0] * xx + c[1] * yy + c[2] * np.sin(8 * xx * c[3]) for c in coeffs], -1)
        pixels = (base - base.min()) / (np.ptp(base) + 1e-9) * 200 + rng.normal(0, 12, (h, w, 3))
        name = f"img_{i:05d}.jpg"
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out_dir / name, quality=90)
        return name, i % 10

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # numpy and PIL's encoder release the GIL
        entries = list(pool.map(write, range(count)))
    write_split(out_dir / "train.txt", entries)
    return out_dir / "train.txt"


def _rate(data_cfg: DataConfig, split: Split, backend: str, num_images: int) -> float:
    loader = build_loader(data_cfg, split, train=True, backend=backend, device=torch.device("cpu"))

    stream = (batch.labels for batch in endless_batches(loader))
    try:
        return images_per_second(stream, num_images)
    finally:
        # Tear the loader down now: idle DALI threads or DataLoader workers left behind
        # would compete with the next runner.
        stream.close()
        del stream, loader
        gc.collect()


def bench_loader(
    cifar_split: str | None,
    cifar_root: str | None,
    threads: int,
    batch_size: int,
    num_images: int,
    rounds: int,
    large_images: int = 512,
) -> dict:
    with tempfile.TemporaryDirectory(prefix="ffn-bench-loader-") as work:
        return _bench_in(
            Path(work), cifar_split, cifar_root, threads, batch_size, num_images, rounds, large_images
        )


def _bench_in(work: Path, cifar_split, cifar_root, threads, batch_size, num_images, rounds, large_images):
    if cifar_split:
        small_split = read_split(cifar_split, cifar_root)
        small_name = f"CIFAR JPEGs ({Path(cifar_split).name})"
    else:
        small_root = work / "digits"
        ensure_builtin("digits", small_root)
        small_split = read_split(small_root / "train.txt", small_root)
        small_name = "built-in digits, 32x32 JPEGs"
    large_root = work / "large"
    large_root.mkdir(parents=True, exist_ok=True)
    large_file = large_root / "train.txt"
    if not large_file.exists():
        write_large_jpegs(large_root, large_images)
    large_split = read_split(large_file, large_root)

    common = dict(batch_size=batch_size, num_threads=threads, num_classes=max(small_split.num_classes, 10))
    settings = [
        (small_name, small_split, DataConfig(train_crop="pad_crop", image_size=32, resize_size=32, **common)),
        (
            "generated 400x350 JPEGs -> RRC 224",
            large_split,
            DataConfig(
                train_crop="random_resized_crop",
                image_size=224,
                resize_size=256,
                color_jitter=0.4,
                mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225],
                **common,
            ),
        ),
    ]
    results = []
    for name, split, cfg in settings:
        images = num_images if split is small_split else max(num_images // 10, 4 * batch_size)
        backends = ("dali", "torch", "memory") if cfg.train_crop == "pad_crop" else ("dali", "torch")
        runners = {b: functools.partial(_rate, cfg, split, b, images) for b in backends}
        medians = interleaved_medians(runners, rounds)
        memory = medians.get("memory")
        results.append(
            {
                "images": name,
                "dali_img_s": medians["dali"],
                "torch_img_s": medians["torch"],
                "memory_img_s": memory,
                "ratio": medians["dali"] / medians["torch"],
                "memory_vs_dali": memory / medians["dali"] if memory else None,
            }
        )

    def cell(value, suffix=""):
        return "-" if value is None else f"{value:,.0f}" if not suffix else f"{value:.2f}{suffix}"

    table = markdown_table(
        [
            "images",
            "DALI CPU img/s",
            "torchvision img/s",
            "memory img/s",
            "DALI / torchvision",
            "memory / DALI",
        ],
        [
            [
                r["images"],
                cell(r["dali_img_s"]),
                cell(r["torch_img_s"]),
                cell(r["memory_img_s"]),
                cell(r["ratio"], "x"),
                cell(r["memory_vs_dali"], "x"),
            ]
            for r in results
        ],
    )
    print(f"batch {batch_size}, {threads} threads/workers each, median of {rounds} interleaved rounds")
    print(table)
    return {"threads": threads, "batch_size": batch_size, "rounds": rounds, "results": results}
