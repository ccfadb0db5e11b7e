"""A configured dataset: its train / val / test splits, validated, built-in data written first."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ffn_dist.data.builtin import ensure_builtin
from ffn_dist.data.splits import Split, read_split


@dataclass(frozen=True)
class Dataset:
    train: Split
    val: Split | None
    test: Split

    def splits(self) -> dict[str, Split]:
        named = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split for name, split in named.items() if split is not None}


def split_path(data_cfg, name: str) -> Path | None:
    """The file of split `name` (train, val, test): `data.NAME_split`, relative to
    `data.root` unless absolute; None where the config has none."""
    value = getattr(data_cfg, f"{name}_split")
    if not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else Path(data_cfg.root) / path


def write_builtin(data_cfg) -> None:
    """The built-in dataset, written into `data.root` if the config names one and it is absent:
    before anything reads (or hashes) its split files."""
    if data_cfg.builtin:
        ensure_builtin(data_cfg.builtin, Path(data_cfg.root))


def open_dataset(data_cfg) -> Dataset:
    write_builtin(data_cfg)
    root, classes = Path(data_cfg.root), data_cfg.num_classes

    def read(name, is_train=False):
        path = split_path(data_cfg, name)
        return None if path is None else read_split(path, root, classes, is_train=is_train)

    return Dataset(train=read("train", is_train=True), val=read("val"), test=read("test"))
