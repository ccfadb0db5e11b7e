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


def _split_path(root: Path, name: str) -> Path:
    path = Path(name)
    return path if path.is_absolute() else root / path


def open_dataset(data_cfg) -> Dataset:
    root = Path(data_cfg.root)
    if data_cfg.builtin:
        ensure_builtin(data_cfg.builtin, root)
    classes = data_cfg.num_classes

    def read(name, is_train=False):
        return read_split(_split_path(root, name), root, classes, is_train=is_train)

    return Dataset(
        train=read(data_cfg.train_split, is_train=True),
        val=read(data_cfg.val_split) if data_cfg.val_split else None,
        test=read(data_cfg.test_split),
    )
