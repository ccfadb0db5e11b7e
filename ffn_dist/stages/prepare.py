"""The data stage of a run: write the resolved config, check the splits, print their statistics."""

from __future__ import annotations

import json
from pathlib import Path

from ffn_dist.config import Config, save_config
from ffn_dist.data.dataset import Dataset, open_dataset
from ffn_dist.data.splits import split_stats
from ffn_dist.data.transforms import TransformSpec


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


def check_memory_backend(cfg: Config, dataset: Dataset) -> None:
    """With data.backend=memory, refuse a split whose pixels would not fit before anything runs."""
    if cfg.data.backend != "memory":
        return
    from ffn_dist.data.loader import default_device
    from ffn_dist.data.memory import check_fits

    for name, split in dataset.splits().items():
        spec = TransformSpec.from_config(cfg.data, train=name == "train")
        check_fits(split, spec, cfg.data.memory_limit_gb, default_device())


def prepare(cfg: Config) -> Dataset:
    run_dir = Path(cfg.output_dir)
    dataset = open_dataset(cfg.data)
    check_memory_backend(cfg, dataset)
    save_config(cfg, run_dir / "config.yaml")
    stats = {name: split_stats(split) for name, split in dataset.splits().items()}
    print(format_stats_table(stats), flush=True)
    (run_dir / "data_report.json").write_text(json.dumps({"splits": stats}, indent=2))
    return dataset
