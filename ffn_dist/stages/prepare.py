"""The data stage of a run: check the splits (and that the memory backend fits), print and
record their statistics."""

from __future__ import annotations

from ffn_dist.config import Config
from ffn_dist.data.dataset import Dataset, open_dataset
from ffn_dist.data.splits import split_stats
from ffn_dist.data.transforms import TransformSpec
from ffn_dist.files import write_json
from ffn_dist.run.paths import data_report
from ffn_dist.run.stages import begin_stage, finish_stage, recorded


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


def check_pretrained(cfg: Config) -> None:
    """`model.pretrained` refused before stage 1 starts when it is not a trunk of `model.arch`."""
    if cfg.model.pretrained:
        from ffn_dist.models.backbones import build_backbone, load_pretrained

        load_pretrained(build_backbone(cfg.model.arch), cfg.model.pretrained, cfg.model.arch)


def prepare(cfg: Config) -> Dataset:
    with recorded(cfg, "data"):
        dataset = open_dataset(cfg.data)  # writes a built-in dataset first: before its hashes
        check_memory_backend(cfg, dataset)
        check_pretrained(cfg)
        begin_stage(cfg, "data")
        stats = {name: split_stats(split) for name, split in dataset.splits().items()}
        print(format_stats_table(stats), flush=True)
        report = write_json(data_report(cfg), {"splits": stats})
        finish_stage(cfg, "data", [report])
    return dataset
