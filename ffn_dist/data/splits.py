"""ImageNet-LT-style split files: `relative/path label` per line, relative to a data root.

A split is validated as it is read; every refusal names `file:line` and the reason.
Class counts (and so shot groups, loss margins, balanced sampling) come from the
training split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffn_dist.errors import FFNError
from ffn_dist.files import write_text

# Shot groups as defined since OLTR: many > 100 training images, medium 20..100, few < 20.
MANY_SHOT_MIN = 101
FEW_SHOT_MAX = 19


class SplitError(FFNError):
    pass


@dataclass(frozen=True)
class Split:
    path: Path  # the split file
    root: Path  # the data root its paths are relative to
    files: tuple[str, ...]
    labels: np.ndarray  # int64, one per sample
    lines: np.ndarray  # 1-based line number of each sample in the split file
    num_classes: int

    def __len__(self) -> int:
        return len(self.files)

    def image_path(self, i: int) -> Path:
        return self.root / self.files[i]

    def where(self, i: int) -> str:
        """`split-file:line (image path)`: how errors point at a sample."""
        return f"{self.path}:{self.lines[i]} ({self.image_path(i)})"

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_classes)

    def subset(self, indices) -> Split:
        """The samples at `indices`, in that order (line numbers kept, so errors still point home)."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            self.path,
            self.root,
            tuple(self.files[i] for i in idx),
            self.labels[idx],
            self.lines[idx],
            self.num_classes,
        )

    def without(self, indices) -> Split:
        keep = np.ones(len(self), dtype=bool)
        keep[list(indices)] = False
        return self.subset(np.flatnonzero(keep))


def _check_relative(path: str, where: str) -> None:
    if os.path.isabs(path) or path.startswith(("/", "\\")):
        raise SplitError(f"{where}: absolute path {path!r}; paths must be relative to the data root")
    if os.path.normpath(path).split(os.sep)[0] == "..":
        raise SplitError(f"{where}: path {path!r} leaves the data root")


def read_split(
    path: str | Path,
    root: str | Path,
    num_classes: int | None = None,
    *,
    is_train: bool = False,
) -> Split:
    """Parse and validate a split file.

    `num_classes` bounds the labels (None: inferred as max label + 1). A training split
    must have at least one sample of every class, since class counts drive the losses.
    """
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: split file not found")
    files, labels, lines = [], [], []
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            text = raw.strip()
            if not text:
                continue
            where = f"{path}:{number}"
            parts = text.rsplit(maxsplit=1)
            if len(parts) != 2:
                raise SplitError(f"{where}: malformed line {text!r}; expected 'relative/path label'")
            rel, label_text = parts
            try:
                label = int(label_text)
            except ValueError:
                raise SplitError(f"{where}: label {label_text!r} is not an integer") from None
            if label < 0 or (num_classes is not None and label >= num_classes):
                allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
                raise SplitError(f"{where}: label {label} out of range, expected {allowed}")
            _check_relative(rel, where)
            files.append(rel)
            labels.append(label)
            lines.append(number)
    if not files:
        raise SplitError(f"{path}: empty split, no samples")
    labels = np.asarray(labels, dtype=np.int64)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    split = Split(path, Path(root), tuple(files), labels, np.asarray(lines), num_classes)
    if is_train:
        missing = np.flatnonzero(split.class_counts() == 0)
        if len(missing):
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise SplitError(
                f"{path}: {len(missing)} class(es) have no training sample: {shown} "
                f"(expected every class 0..{num_classes - 1})"
            )
    return split


def shot_groups(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean class masks for the many / medium / few shot groups."""
    counts = np.asarray(train_counts)
    return {
        "many": counts >= MANY_SHOT_MIN,
        "medium": (counts > FEW_SHOT_MAX) & (counts < MANY_SHOT_MIN),
        "few": counts <= FEW_SHOT_MAX,
    }


def split_stats(split: Split) -> dict:
    counts = split.class_counts()
    groups = shot_groups(counts)
    return {
        "file": str(split.path),
        "samples": len(split),
        "classes": split.num_classes,
        "min_per_class": int(counts.min()),
        "max_per_class": int(counts.max()),
        "imbalance_factor": float(counts.max() / counts.min()),
        "many_shot_classes": int(groups["many"].sum()),
        "medium_shot_classes": int(groups["medium"].sum()),
        "few_shot_classes": int(groups["few"].sum()),
    }


def write_split(path: Path, entries: list[tuple[str, int]]) -> None:
    """Write a split file atomically, so a reader never sees a half-written one."""
    write_text(path, "".join(f"{rel} {label}\n" for rel, label in entries))
