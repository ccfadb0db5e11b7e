"""The data stage of a run: write the resolved config, check the splits, read every image once.

Reading each split through the configured loader proves the data path (files, decoding,
transforms) end to end before any GPU time is spent, and reports its throughput.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ffn_dist.config import Config, save_config
from ffn_dist.data.dataset import Dataset, open_dataset
from ffn_dist.data.loader import build_loader
from ffn_dist.data.splits import split_stats
from ffn_dist.progress import progress


def format_stats_table(stats: dict[str, dict]) -> str:
    columns = [
        "samples",
        "classes",
        "min_per_class",
        "max_per_class",
        "imbalance_factor",
        "many_shot_classes",
        "medium_shot_classes",
        "few_shot_classes",
    ]
    header = "| split | " + " | ".join(c.replace("_", " ") for c in columns) + " |"
    rows = [header, "|" + "---|" * (len(columns) + 1)]
    for name, row in stats.items():
        cells = [f"{row[c]:.1f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def read_through_loader(cfg: Config, dataset: Dataset) -> dict[str, float]:
    rates = {}
    for name, split in dataset.splits().items():
        loader = build_loader(cfg.data, split, train=name == "train", seed=cfg.seed)
        start, seen = time.perf_counter(), 0
        for batch in progress(loader, desc=f"reading {name} ({cfg.data.backend})", unit="batch"):
            seen += len(batch.labels)
        rates[name] = seen / (time.perf_counter() - start)
    return rates


def prepare(cfg: Config) -> Dataset:
    run_dir = Path(cfg.output_dir)
    save_config(cfg, run_dir / "config.yaml")
    dataset = open_dataset(cfg.data)
    stats = {name: split_stats(split) for name, split in dataset.splits().items()}
    print(format_stats_table(stats))
    rates = read_through_loader(cfg, dataset)
    for name, rate in rates.items():
        print(f"{name}: every image read through the {cfg.data.backend} loader, {rate:,.0f} img/s")
    report = {"splits": stats, "loader_images_per_s": rates, "backend": cfg.data.backend}
    (run_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    print(f"run directory: {run_dir} (config.yaml, data_report.json)")
    return dataset
