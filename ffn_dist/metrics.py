"""Reports of a classifier's predictions on a split: top-1, top-5, per class and per shot
group, accuracy under shifted test priors, and calibration (expected calibration error over
15 equal-width confidence bins, negative log-likelihood, the reliability diagram's bins),
before and after temperature scaling; gathered over a process group."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from ffn_dist.data.splits import shot_groups
from ffn_dist.priors import shifted_accuracies

TOP_K = 5
BINS = 15


def gather_predictions(indices, labels, topk, scores, group=None, group_size: int = 1):
    """All ranks' (label, top-k, scores) rows, each split index once (padding dropped).

    Every rank of a group holds the same number of rows (the sampler pads to equal shares),
    so a plain all_gather works. `scores`: float rows (confidence, log-likelihood of the label).
    """
    rows = torch.cat([indices[:, None], labels[:, None], topk], dim=1).to(torch.int64)
    scores = scores.to(torch.float64)
    if group_size > 1:
        gathered = []
        for tensor in (rows, scores):
            parts = [torch.empty_like(tensor) for _ in range(group_size)]
            dist.all_gather(parts, tensor, group=group)
            gathered.append(torch.cat(parts))
        rows, scores = gathered
    rows, scores = rows.cpu().numpy(), scores.cpu().numpy()
    _, first = np.unique(rows[:, 0], return_index=True)
    rows, scores = rows[first], scores[first]
    return rows[:, 1], rows[:, 2:], scores


def prediction_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """N x 2: each row's confidence (its top probability) and the log-likelihood of its label,
    under softmax(logits) in float64."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    return torch.stack([log_p.max(dim=1).values.exp(), log_p.gather(1, labels.long()[:, None])[:, 0]], dim=1)


def calibration(
    confidence: np.ndarray, correct: np.ndarray, log_likelihood: np.ndarray, bins: int = BINS
) -> dict:
    """ECE (%): sum over equal-width confidence bins (b/B, (b+1)/B] of the bin's share of the
    samples times |its accuracy - its mean confidence|; NLL: the mean -log p(label); and the
    bins themselves (count, accuracy %, mean confidence %) for the reliability diagram."""
    which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    hits = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    sure = np.bincount(which, weights=confidence, minlength=bins)
    filled = count > 0
    accuracy = np.where(filled, hits / np.maximum(count, 1), np.nan)
    mean_confidence = np.where(filled, sure / np.maximum(count, 1), np.nan)
    ece = float(np.sum(count[filled] * np.abs(accuracy[filled] - mean_confidence[filled])) / len(confidence))
    return {
        "ece": 100.0 * ece,
        "nll": float(-np.mean(log_likelihood)),
        "reliability": {
            "count": count.tolist(),
            "accuracy": [None if np.isnan(a) else float(100.0 * a) for a in accuracy],
            "confidence": [None if np.isnan(c) else float(100.0 * c) for c in mean_confidence],
        },
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) (temperature scaling, Guo et al.
    2017). The NLL is convex in 1/T, so a golden-section search over log T finds its minimum."""
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return torch.nn.functional.cross_entropy(logits / np.exp(log_t), labels).item()

    low, high, ratio = -7.0, 7.0, (np.sqrt(5.0) - 1.0) / 2.0
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-6:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return float(np.exp((low + high) / 2.0))


def logits_report(
    logits: torch.Tensor, labels, train_counts, scale: float = 1.0, temperature: float | None = None
) -> dict:
    """The report of a classifier's logits on a split: predictions ranked by the logits
    themselves, probabilities softmax(scale * logits) (the scale its loss trained them at)
    and, with a temperature, softmax(scale * logits / T) too (the predictions do not change)."""
    labels = torch.as_tensor(labels)
    predicted = top_k(logits)
    scores = prediction_scores(scale * logits, labels).numpy()
    report = accuracy_report(labels.numpy(), predicted.numpy(), train_counts, scores)
    if temperature is not None:
        calibrated = prediction_scores(scale * logits / temperature, labels).numpy()
        correct = predicted[:, 0].numpy() == labels.numpy()
        report["calibrated"] = {
            "temperature": temperature,
            **calibration(calibrated[:, 0], correct, calibrated[:, 1]),
        }
    return report


def accuracy_report(labels: np.ndarray, topk: np.ndarray, train_counts: np.ndarray, scores=None) -> dict:
    """Accuracies in percent (a shot group with no class: None), the accuracy under every
    shifted test prior and, given each row's `scores` (prediction_scores), the calibration."""
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
    report["shifted_prior"] = shifted_accuracies(report["per_class"], train_counts)
    if scores is not None:  # non-finite logits have no probabilities to calibrate: None
        finite = bool(np.isfinite(scores).all())
        report["calibration"] = calibration(scores[:, 0], correct1, scores[:, 1]) if finite else None
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
