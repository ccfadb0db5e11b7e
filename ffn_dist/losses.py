"""The losses of FFN, exactly as docs/method.md states them, and those of the stage-2 methods.

Every per-class quantity (KPS factors and margins, LDAM margins, class-balanced and
re-weighting weights, label-aware smoothing) is a function of the class's training count
alone, never of the order of class indices, so the losses are right for ImageNet-LT, whose
class ids are not sorted by frequency.

Every loss takes either integer targets or mixup targets `(y_a, y_b, lam)` and then returns
`lam * L(y_a) + (1 - lam) * L(y_b)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ffn_dist.errors import FFNError
from ffn_dist.registry import HEADS, LOSSES

KPS_LOG_BASE = 50.0  # r_c = log(50 n_c / n_min) / log(50)
KPS_MAX_SCALE = 50.0  # the per-class ("GA") scale is clamped to [s, 50]
CB_BETA = 0.9999


def deferred_epoch(fraction: float, epochs: int) -> int:
    """The first epoch of deferred re-weighting: `fraction` of the epochs, rounded down
    (LDAM-DRW's epoch 160 of 200)."""
    return int(fraction * epochs)


def as_class_counts(class_counts) -> torch.Tensor:
    """Validate training counts per class: a non-empty 1-D sequence of integers >= 1."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise FFNError(f"class counts: expected a non-empty 1-D sequence, got shape {tuple(counts.shape)}")
    if bool((counts != counts.round()).any()):
        raise FFNError("class counts: expected integers")
    empty = torch.nonzero(counts < 1).flatten().tolist()
    if empty:
        raise FFNError(
            f"class counts: class(es) {empty[:10]} have {int(counts[empty[0]])} samples; "
            "every class needs at least 1 training sample"
        )
    return counts


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise FFNError(f"label {bad} outside the {num_classes} classes (expected 0..{num_classes - 1})")


def kps_factors(class_counts) -> tuple[torch.Tensor, torch.Tensor]:
    """r_c = log(50 n_c / n_min) / log 50 and the flipped factor r_max + r_min - r_c."""
    counts = as_class_counts(class_counts)
    r = torch.log(KPS_LOG_BASE * counts / counts.min()) / math.log(KPS_LOG_BASE)
    return r, r.max() + r.min() - r


def ldam_margins(class_counts, max_m: float) -> torch.Tensor:
    """Δ_c ∝ n_c^(-1/4), scaled so the largest margin is `max_m`."""
    margins = as_class_counts(class_counts) ** -0.25
    return margins * (max_m / margins.max())


def class_balanced_weights(class_counts, beta: float = CB_BETA) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019) (1 - beta) / (1 - beta^n_c), normalised to sum
    to C: the loss weights of deferred re-weighting (LDAM-DRW) and of weight balancing."""
    counts = as_class_counts(class_counts)
    weights = (1.0 - beta) / (1.0 - beta**counts)
    return weights * len(counts) / weights.sum()


def reweighting_weights(class_counts, rho: float) -> torch.Tensor:
    """DisAlign's generalised re-weighting (Zhang et al. 2021): (1 / r_c)^rho with r_c the
    class's share of the training set, normalised to sum to C (rho = 0: no re-weighting)."""
    counts = as_class_counts(class_counts)
    weights = (counts / counts.sum()) ** -rho
    return weights * len(counts) / weights.sum()


def label_aware_smoothing(class_counts, head: float, tail: float) -> torch.Tensor:
    """MiSLAS's per-class smoothing (Zhong et al. 2021, the concave form): epsilon_c goes from
    `tail` at the rarest class to `head` at the most frequent as
    tail + (head - tail) sin(pi/2 (n_c - n_min) / (n_max - n_min))."""
    counts = as_class_counts(class_counts)
    span = counts.max() - counts.min()
    position = (counts - counts.min()) / span if span > 0 else torch.ones_like(counts)
    return tail + (head - tail) * torch.sin(position * math.pi / 2)


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, epsilon: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against (1 - epsilon_y) onehot(y) + epsilon_y / C, epsilon per class."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    smooth = epsilon.to(log_p)[labels]
    nll = -log_p.gather(1, labels[:, None]).squeeze(1)
    return ((1.0 - smooth) * nll - smooth * log_p.mean(dim=1)).mean()


def balanced_softmax_loss(logits: torch.Tensor, labels: torch.Tensor, log_counts: torch.Tensor):
    """Balanced Softmax (Ren et al. 2020): cross-entropy on logits + log n_y, so the classifier
    learns the class-balanced posterior and predicts with the plain logits."""
    return F.cross_entropy(logits + log_counts.to(logits), labels)


class _MixupLoss(nn.Module):
    """Dispatches integer targets and mixup targets to `single(logits, labels)`."""

    num_classes: int
    checks_labels = True
    input_scale = 1.0  # logits are multiplied by this first (cosines under a loss with no scale)

    def trusting_labels(self):
        """This loss without its per-step label check, for labels validated where they were
        read (split files, the cache): on a GPU the check reads them back to the host, which
        stalls every step."""
        self.checks_labels = False
        return self

    def forward(self, logits: torch.Tensor, target) -> torch.Tensor:
        if isinstance(target, tuple):
            y_a, y_b, lam = target
            return lam * self._checked(logits, y_a) + (1.0 - lam) * self._checked(logits, y_b)
        return self._checked(logits, target)

    def _checked(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.single(self._validated(logits, labels), labels)

    def _validated(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] != self.num_classes:
            raise FFNError(
                f"logits have {logits.shape[-1]} classes, the loss was built for {self.num_classes}"
            )
        if self.checks_labels:
            check_labels(labels, self.num_classes)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # margins of a few hundredths need more than bf16's 8 bits
        return logits * self.input_scale if self.input_scale != 1.0 else logits


class CELoss(_MixupLoss):
    """Cross-entropy on the linear head (CE branch), optionally class-weighted (DRW)."""

    def __init__(self, num_classes: int, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
        )

    def single(self, logits, labels):
        return F.cross_entropy(logits, labels, weight=_match(self.weight, logits))


class FocalLoss(_MixupLoss):
    """Focal loss (Lin et al. 2017): -w_y (1 - p_y)^gamma log p_y, averaged with the class
    weights as cross-entropy averages them (gamma 0: cross-entropy)."""

    def __init__(self, num_classes: int, gamma: float, weight: torch.Tensor | None = None):
        super().__init__()
        self.num_classes, self.gamma = num_classes, gamma
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
        )

    def single(self, logits, labels):
        nll = F.cross_entropy(logits, labels, reduction="none")
        focal = (1.0 - torch.exp(-nll)).pow(self.gamma) * nll
        if self.weight is None:
            return focal.mean()
        w = _match(self.weight, logits)[labels]
        return (w * focal).sum() / w.sum()


class LogitAdjustedLoss(_MixupLoss):
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on logits + tau log pi_y, pi the
    training prior; tau 1 is Balanced Softmax (Ren et al. 2020), whose log n_y differs from
    log pi_y by a constant. Predictions use the plain logits."""

    def __init__(self, class_counts, tau: float = 1.0):
        super().__init__()
        counts = as_class_counts(class_counts)
        self.num_classes = len(counts)
        self.register_buffer("adjustment", tau * torch.log(counts / counts.sum()))

    def single(self, logits, labels):
        return F.cross_entropy(logits + _match(self.adjustment, logits), labels)


class KPSLoss(_MixupLoss):
    """Key Point Sensitive loss on cosine logits (Li, Cheung and Hu, TPAMI 2022).

    Target logit s_y * (r_y cos θ_y - m_y), others s_y * r_j cos θ_j, with
    r_c = log(50 n_c / n_min) / log 50 and m_c = max_m (r_max + r_min - r_c) / r_max.
    The scale is `s`, or with `per_class_scale` (the "GA" schedule) the sample's
    s_y = clamp(s (r_max + r_min - r_y), s, 50).
    """

    def __init__(self, class_counts, max_m: float, s: float = 15.0, per_class_scale: bool = False):
        super().__init__()
        r, flipped = kps_factors(class_counts)
        self.num_classes = len(r)
        self.s = s
        self.per_class_scale = per_class_scale
        self.register_buffer("r", r)
        self.register_buffer("margins", max_m * flipped / r.max())
        self.register_buffer("class_scales", (s * flipped).clamp(s, KPS_MAX_SCALE))

    def single(self, cosine, labels):
        logits = _minus_target_margin(cosine * _match(self.r, cosine), labels, _match(self.margins, cosine))
        scale = _match(self.class_scales, cosine)[labels, None] if self.per_class_scale else self.s
        return F.cross_entropy(scale * logits, labels)


class LDAMLoss(_MixupLoss):
    """LDAM (Cao et al., NeurIPS 2019) on cosine logits: CE(s * (cos - Δ_y onehot(y)))."""

    def __init__(self, class_counts, max_m: float = 0.5, s: float = 30.0, weight: torch.Tensor | None = None):
        super().__init__()
        margins = ldam_margins(class_counts, max_m)
        self.num_classes = len(margins)
        self.s = s
        self.register_buffer("margins", margins)
        self.register_buffer(
            "weight", None if weight is None else torch.as_tensor(weight, dtype=torch.float64)
        )

    def single(self, cosine, labels):
        return F.cross_entropy(self._logits(cosine, labels), labels, weight=_match(self.weight, cosine))

    def _logits(self, cosine, labels):
        """s * (cos - Δ_y at each row's target class y)."""
        return self.s * _minus_target_margin(cosine, labels, _match(self.margins, cosine))


def _minus_target_margin(logits: torch.Tensor, labels: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """logits - margins[y] at each row's target class y; the other classes unchanged."""
    return logits.scatter_add(1, labels[:, None], -margins[labels, None])


def _match(buffer: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """The buffer (kept in float64) in the logits' dtype."""
    return None if buffer is None else buffer.to(like.dtype)


# Each loss of registry.LOSSES: (training counts, the stage-1 settings) -> the loss.
LOSS_BUILDERS = {
    "ce": lambda counts, p: CELoss(len(counts)),
    "kps": lambda counts, p: KPSLoss(counts, max_m=p.kps_max_m, s=p.kps_s),
    "ldam": lambda counts, p: LDAMLoss(counts, max_m=p.ldam_max_m, s=p.ldam_s),
    "balanced_softmax": lambda counts, p: LogitAdjustedLoss(counts, 1.0),
    "focal": lambda counts, p: FocalLoss(len(counts), p.focal_gamma),
    "class_balanced_ce": lambda counts, p: CELoss(
        len(counts), weight=class_balanced_weights(counts, p.class_balanced_beta)
    ),
    "logit_adjusted": lambda counts, p: LogitAdjustedLoss(counts, p.logit_adjusted_tau),
}


def build_loss(name: str, class_counts, params, head: str) -> _MixupLoss:
    """Loss `name` of registry.LOSSES for a branch with `head`, its parameters read from
    `params` (the stage-1 settings: kps_max_m, kps_s, ldam_max_m, ldam_s, focal_gamma,
    class_balanced_beta, logit_adjusted_tau, cosine_s). KPS starts with its single scale;
    the trainer switches its per-class scales and deferred re-weighting at their epochs."""
    as_class_counts(class_counts)
    if name not in LOSS_BUILDERS:
        raise FFNError(f"loss {name!r}: expected one of {', '.join(LOSSES)}")
    loss = LOSS_BUILDERS[name](class_counts, params)
    if HEADS[head].cosine and not LOSSES[name].scale:
        loss.input_scale = params.cosine_s
    return loss


def probability_scale(name: str, head: str, params) -> float:
    """A branch's probabilities are softmax(scale * head logits): a margin loss's s, the
    cosine scale for cosines under another loss, 1 for a linear head."""
    own = LOSSES[name].scale
    if own:
        return getattr(params, own)
    return params.cosine_s if HEADS[head].cosine else 1.0
