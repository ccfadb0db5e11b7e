"""Accuracy reports: top-1, top-5, per class and per shot group, gathered over a group."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ffn_dist.data.splits import shot_groups

TOP_K = 5


def gather_predictions(indices, labels, topk, group=None, group_size: int = 1):
    """All ranks' (index, label, top-k) rows, each split index once (padding dropped).

    Every rank of a group holds the same number of rows (the sampler pads to equal shares),
    so a plain all_gather works.
    """
    rows = torch.cat([indices[:, None], labels[:, None], topk], dim=1).to(torch.int64)
    if group_size > 1:
        parts = [torch.empty_like(rows) for _ in range(group_size)]
        dist.all_gather(parts, rows, group=group)
        rows = torch.cat(parts)
    rows = rows.cpu().numpy()
    _, first = np.unique(rows[:, 0], return_index=True)
    rows = rows[first]
    return rows[:, 0], rows[:, 1], rows[:, 2:]


def accuracy_report(labels: np.ndarray, topk: np.ndarray, train_counts: np.ndarray) -> dict:
    """Accuracies in percent; a shot group with no class is reported as None."""
    num_classes = len(train_counts)
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(axis=1)
    seen = np.bincount(labels, minlength=num_classes)
    hits = np.bincount(labels, weights=correct1, minlength=num_classes)
    per_class = np.where(seen > 0, 100.0 * hits / np.maximum(seen, 1), np.nan)
    report = {
        "samples": int(len(labels)),
        "top1": float(100.0 * correct1.mean()),
        "top5": float(100.0 * correct5.mean()),
    }
    for name, mask in {**shot_groups(train_counts), **halves(train_counts)}.items():
        in_group = mask[labels]
        report[name] = float(100.0 * correct1[in_group].mean()) if in_group.any() else None
    report["per_class"] = [None if np.isnan(a) else float(a) for a in per_class]
    return report


def halves(train_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Class masks of the C//2 most frequent ("head") and C//2 least frequent ("tail") classes;
    CIFAR-10-LT has no few-shot class, so these are how its tail is reported."""
    by_size = np.argsort(-np.asarray(train_counts), kind="stable")
    half = len(by_size) // 2
    masks = {"head": np.zeros(len(by_size), bool), "tail": np.zeros(len(by_size), bool)}
    masks["head"][by_size[:half]] = True
    masks["tail"][by_size[len(by_size) - half :]] = True
    return masks


def top_k(logits: torch.Tensor) -> torch.Tensor:
    return logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices
