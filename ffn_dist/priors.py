"""Label priors: the shifted test distributions of the test-agnostic protocol, prior files a
user supplies, and the logit-adjustment rule that corrects a classifier for one.

Shifted priors follow SADE (Zhang et al., 2022): classes ranked by their training count
(rank 0 the most frequent), a forward prior of imbalance r puts mass r^(-rank/(C-1)) on a
class, a backward one r^(-(C-1-rank)/(C-1)), normalised; the uniform prior is the balanced
test set. Accuracy under a prior is computed exactly from the per-class accuracies on the
full test set, sum_c prior_c * acc_c, instead of SADE's subsampled test sets (which it
equals in expectation). numpy only: `ffn predict` reads priors without the training code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ffn_dist.errors import FFNError

IMBALANCES = (50, 25, 10, 5, 2)


class PriorError(FFNError):
    pass


def shifted_priors(train_counts) -> dict[str, np.ndarray]:
    """forward_50 ... forward_2, uniform, backward_2 ... backward_50: SADE's table order."""
    counts = np.asarray(train_counts, dtype=np.float64)
    classes = len(counts)
    rank = np.empty(classes)
    rank[np.argsort(-counts, kind="stable")] = np.arange(classes)
    position = rank / max(classes - 1, 1)
    priors = {f"forward_{r}": float(r) ** -position for r in IMBALANCES}
    priors["uniform"] = np.ones(classes)
    priors.update({f"backward_{r}": float(r) ** -(1.0 - position) for r in reversed(IMBALANCES)})
    return {name: prior / prior.sum() for name, prior in priors.items()}


def prior_accuracy(per_class: list[float | None], prior: np.ndarray) -> float | None:
    """Top-1 (%) on a test set whose labels follow `prior`: sum_c prior_c * acc_c; None where a
    class the prior weighs has no test image to measure it on."""
    accuracy = np.array([np.nan if a is None else a for a in per_class], dtype=np.float64)
    weighed = prior > 0
    if np.isnan(accuracy[weighed]).any():
        return None
    return float(np.dot(prior[weighed], accuracy[weighed]))


def shifted_accuracies(per_class: list[float | None], train_counts) -> dict[str, float | None]:
    return {name: prior_accuracy(per_class, p) for name, p in shifted_priors(train_counts).items()}


def read_prior(spec: str, num_classes: int) -> np.ndarray:
    """`uniform`, or a file of one non-negative frequency (or count) a line, line i for class i;
    normalised to sum to 1. Refused, naming the file and the line, where it is not that."""
    if spec == "uniform":
        return np.full(num_classes, 1.0 / num_classes)
    path = Path(spec)
    if not path.is_file():
        raise PriorError(f"{path}: prior file not found (a file of one frequency a line, or 'uniform')")
    values = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise PriorError(f"{path}:{number}: {text!r} is not a number (one frequency a line)") from None
        if not np.isfinite(value) or value < 0:
            raise PriorError(f"{path}:{number}: frequency {text} is not a finite non-negative number")
        values.append(value)
    if len(values) != num_classes:
        raise PriorError(
            f"{path}: {len(values)} frequencies for a model of {num_classes} classes (one line per class)"
        )
    prior = np.asarray(values)
    if prior.sum() <= 0:
        raise PriorError(f"{path}: the frequencies sum to 0; a prior needs mass on some class")
    return prior / prior.sum()


def logit_adjustment(test_prior: np.ndarray, train_counts) -> np.ndarray:
    """log(pi_test / pi_train), added to a classifier's logits (in the units of its softmax):
    the logit-adjustment rule that moves its posterior from the training prior to the test
    prior. A class the test prior excludes gets -inf: never predicted."""
    counts = np.asarray(train_counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(test_prior) - np.log(counts / counts.sum())
