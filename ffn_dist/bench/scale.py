"""`ffn bench scale`: iNaturalist 2018's scale on this machine, with synthetic data of its shape.

- The split: annotation files of iNaturalist 2018's shape (437,513 training images over 8,142
  classes, 2 to 1,000 a class; 24,426 validation images), turned into split files by `ffn
  splits inat`, then read and validated as every stage reads them (`read_split`, every class
  present, labels in range) and summarised (`ffn splits stats`).
- Stage 2: a cache of its shape (437,513 rows x 2 branches x 2048 dims, fp16, memory-mapped):
  its size on disk per view, one epoch of FFN's classifier (8,142 classes) on it, timed
  against the epoch's matrix products alone, and the process's peak resident memory (which
  counts the cache's pages the epoch touched: they are the page cache's, not the heap's).
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ffn_dist.bench.stage2 import matmul_bound_runner
from ffn_dist.bench.timing import interleaved_runs, median_ratio
from ffn_dist.cache.synthetic import write_synthetic_cache
from ffn_dist.config import Config, with_settings
from ffn_dist.data.inat import write_inat
from ffn_dist.data.splits import read_split, split_stats
from ffn_dist.probe import cache_epoch_runner
from ffn_dist.stages.epochs import classifier_device
from ffn_dist.tables import markdown_table

TRAIN, TEST, CLASSES, MOST, FEWEST = 437_513, 24_426, 8_142, 1_000, 2


def inat_counts(
    total: int = TRAIN, classes: int = CLASSES, most: int = MOST, fewest: int = FEWEST
) -> np.ndarray:
    """Per-class counts from `most` down to `fewest`, geometric in the class rank, summing to
    `total`: the shape of iNaturalist 2018's long tail."""
    rank = np.arange(classes) / (classes - 1)
    for power in np.linspace(10, 0.1, 4000):  # the curvature that comes closest below the total
        counts = np.maximum(fewest, np.round(most * (fewest / most) ** (rank**power))).astype(np.int64)
        if counts.sum() <= total:
            break
    below = np.flatnonzero(counts < most)
    counts[below[np.argsort(-counts[below], kind="stable")][: total - counts.sum()]] += 1  # the rest
    return counts


def write_annotations(path: Path, counts: np.ndarray, first_id: int = 0) -> None:
    labels = np.repeat(np.arange(len(counts)), counts)
    images = [
        {"id": first_id + i, "file_name": f"train_val2018/c{c}/{i}.jpg"}
        for i, c in enumerate(labels.tolist())
    ]
    annotations = [{"image_id": first_id + i, "category_id": c} for i, c in enumerate(labels.tolist())]
    categories = [{"id": c, "name": f"species {c}"} for c in range(len(counts))]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))


def bench_splits(work: Path, images: int, classes: int) -> dict:
    counts = inat_counts(images, classes)
    test = round(TEST * images / TRAIN)
    write_annotations(work / "train2018.json", counts)
    per_class = np.full(classes, test // classes) + (np.arange(classes) < test % classes)
    write_annotations(work / "val2018.json", per_class, 10**7)
    start = time.perf_counter()
    written = write_inat(work / "train2018.json", work / "val2018.json", work / "inat")
    converted = time.perf_counter() - start
    start = time.perf_counter()
    split = read_split(work / "inat" / "train.txt", work, classes, is_train=True)
    stats = split_stats(split)
    validated = time.perf_counter() - start
    return {
        "train_images": written["train_size"],
        "classes": written["classes"],
        "per_class": [stats["min_per_class"], stats["max_per_class"]],
        "seconds": {
            "ffn splits inat": round(converted, 2),
            "read and validate train.txt": round(validated, 2),
        },
    }


def bench_stage2_scale(cfg: Config, work: Path, rows: int, dims: int, classes: int) -> dict:
    print(f"writing a synthetic cache: {rows:,} rows x {len(cfg.branches)} x {dims} fp16 ...", flush=True)
    cache = write_synthetic_cache(work / "cache", cfg.branches, rows, dims, classes)
    per_view = sum(p["bytes"] for p in cache.manifest["splits"]["train"]["parts"])
    epoch, steps = cache_epoch_runner(cfg, cache)
    device = classifier_device(cfg.stage2.device, classes * dims)
    runs = interleaved_runs(
        {
            "epoch": epoch,
            "products": matmul_bound_runner(steps, cfg.stage2.batch_size, dims, classes, device),
        },
        1,
    )
    return {
        "rows": rows,
        "dims": dims,
        "classes": classes,
        "steps": steps,
        "cache_bytes_per_view": per_view,
        "epoch_seconds": runs["epoch"][0],
        "products_seconds": runs["products"][0],
        "epoch_vs_products": median_ratio(runs["epoch"], runs["products"]),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def bench_scale(
    cfg: Config, rows: int, dims: int, classes: int, work_dir: str | None, split_images: int = TRAIN
) -> dict:
    cfg = with_settings(cfg, {"data.num_classes": classes})
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="ffn-bench-scale-") as tmp:
        work = Path(tmp)
        splits = bench_splits(work, split_images, classes)
        stage2 = bench_stage2_scale(cfg, work, rows, dims, classes)
    rows_out = [
        [
            f"ffn splits inat ({splits['train_images']:,} train images, {splits['classes']:,} classes)",
            f"{splits['seconds']['ffn splits inat']:.1f} s",
        ],
        [
            "read and validate its train.txt (every stage's read)",
            f"{splits['seconds']['read and validate train.txt']:.1f} s",
        ],
        [
            f"cache on disk, one view of {rows:,} rows x 2 x {dims} fp16",
            f"{stage2['cache_bytes_per_view'] / 1e9:.2f} GB",
        ],
        [
            f"FFN's classifier, one epoch ({stage2['steps']:,} steps, {classes:,} classes)",
            f"{stage2['epoch_seconds']:.0f} s",
        ],
        ["  its matrix products alone", f"{stage2['products_seconds']:.0f} s"],
        ["  epoch / products", f"{stage2['epoch_vs_products']:.2f}x"],
        ["peak resident memory of the process", f"{stage2['peak_rss_gb']:.1f} GB"],
    ]
    print(
        f"\niNaturalist 2018's scale, {torch.get_num_threads()} threads\n"
        + markdown_table(["what", "measured"], rows_out),
        flush=True,
    )
    return {"splits": splits, "stage2": stage2, "threads": torch.get_num_threads()}
