"""Each loss against an independent float64 re-computation of docs/method.md."""

import math

import numpy as np
import pytest
import torch

from ffn_dist.errors import FFNError
from ffn_dist.losses import (
    CELoss,
    FocalLoss,
    KPSLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    balanced_softmax_loss,
    build_loss,
    class_balanced_weights,
    ldam_margins,
    probability_scale,
)
from ffn_dist.registry import LOSSES, MARGIN_LOSSES

CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def imagenet_lt_like_counts(seed=0):
    """1000 classes, 5..1280 images each, in random class order (like ImageNet-LT)."""
    rng = np.random.default_rng(seed)
    counts = np.concatenate([[5, 1280], rng.integers(5, 1281, size=998)])
    return rng.permutation(counts).tolist()


COUNT_SETS = {"imagenet_lt_unsorted": imagenet_lt_like_counts(), "cifar10_lt_sorted": CIFAR10_LT}


def logsumexp(v):
    top = max(v)
    return top + math.log(sum(math.exp(x - top) for x in v))


def ref_kps(cos, labels, counts, max_m, s, per_class_scale):
    n = np.asarray(counts, dtype=np.float64)
    r = np.log(50 * n / n.min()) / np.log(50)
    m = max_m * (r.max() + r.min() - r) / r.max()
    total = 0.0
    for row, y in zip(cos, labels, strict=True):
        scale = min(max(s * (r.max() + r.min() - r[y]), s), 50) if per_class_scale else s
        z = [scale * r[j] * row[j] for j in range(len(row))]
        z[y] = scale * (r[y] * row[y] - m[y])
        total += logsumexp(z) - z[y]
    return total / len(labels)


def ref_ldam(cos, labels, counts, max_m, s, weight=None):
    n = np.asarray(counts, dtype=np.float64)
    delta = n**-0.25
    delta = delta * max_m / delta.max()
    num = den = 0.0
    for row, y in zip(cos, labels, strict=True):
        z = [s * row[j] for j in range(len(row))]
        z[y] = s * (row[y] - delta[y])
        w = 1.0 if weight is None else weight[y]
        num += w * (logsumexp(z) - z[y])
        den += w
    return num / den


def ref_ce(logits, labels):
    return sum(logsumexp(row) - row[y] for row, y in zip(logits, labels, strict=True)) / len(labels)


def random_batch(num_classes, batch=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cos = torch.rand(batch, num_classes, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.randint(num_classes, (batch,), generator=gen)
    labels[0] = 0
    return cos, labels


@pytest.mark.parametrize("name", COUNT_SETS)
@pytest.mark.parametrize("per_class_scale", [False, True])
def test_kps_matches_the_formula(name, per_class_scale):
    counts = COUNT_SETS[name]
    cos, labels = random_batch(len(counts))
    loss = KPSLoss(counts, max_m=0.35, s=15, per_class_scale=per_class_scale).double()
    expected = ref_kps(cos.tolist(), labels.tolist(), counts, 0.35, 15, per_class_scale)
    assert float(loss(cos, labels)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("name", COUNT_SETS)
def test_ldam_matches_the_formula_with_and_without_drw(name):
    counts = COUNT_SETS[name]
    cos, labels = random_batch(len(counts), seed=1)
    plain = LDAMLoss(counts, max_m=0.5, s=30).double()
    assert float(plain(cos, labels)) == pytest.approx(
        ref_ldam(cos.tolist(), labels.tolist(), counts, 0.5, 30), rel=1e-10
    )
    weights = class_balanced_weights(counts)
    weighted = LDAMLoss(counts, weight=weights).double()
    expected = ref_ldam(cos.tolist(), labels.tolist(), counts, 0.5, 30, weights.double().tolist())
    assert float(weighted(cos, labels)) == pytest.approx(expected, rel=1e-6)


def test_ce_matches_the_formula():
    logits, labels = random_batch(7, seed=2)
    logits = logits * 5
    assert float(CELoss(7).double()(logits, labels)) == pytest.approx(
        ref_ce(logits.tolist(), labels.tolist()), rel=1e-12
    )


def test_class_balanced_weights_formula():
    counts = COUNT_SETS["imagenet_lt_unsorted"]
    n = np.asarray(counts, dtype=np.float64)
    w = (1 - 0.9999) / (1 - 0.9999**n)
    w = w * len(n) / w.sum()
    assert np.allclose(class_balanced_weights(counts).numpy(), w, rtol=1e-6)
    assert float(class_balanced_weights(counts).sum()) == pytest.approx(1000, rel=1e-5)


@pytest.mark.parametrize(
    "make",
    [
        lambda c: CELoss(len(c)),
        lambda c: KPSLoss(c, max_m=0.2),
        lambda c: KPSLoss(c, max_m=0.2, per_class_scale=True),
        lambda c: LDAMLoss(c, weight=class_balanced_weights(c)),
        lambda c: FocalLoss(len(c), gamma=2.0),
        lambda c: LogitAdjustedLoss(c),
    ],
    ids=["ce", "kps", "kps_ga", "ldam_drw", "focal", "logit_adjusted"],
)
def test_mixup_targets_and_gradients(make):
    counts = [40, 17, 9, 3, 1]
    loss = make(counts).double()
    cos, y_a = random_batch(5, batch=6, seed=3)
    y_b = y_a.flip(0)
    lam = 0.3
    mixed = loss(cos, (y_a, y_b, lam))
    assert float(mixed) == pytest.approx(
        lam * float(loss(cos, y_a)) + (1 - lam) * float(loss(cos, y_b)), rel=1e-12
    )
    cos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, (y_a, y_b, lam)), (cos,))
    assert torch.autograd.gradcheck(lambda x: loss(x, y_a), (cos,))


def flip_construction(counts, max_m, s):
    """The authors' code: margins and GA scales from flip(r) over the class index."""
    n = np.asarray(counts, dtype=np.float64)
    r = np.log(50 * n / n.min()) / np.log(50)
    flipped = np.flip(r)
    return max_m * flipped / r.max(), np.clip(s * flipped, s, 50)


def test_kps_equals_the_flip_construction_on_sorted_cifar_counts():
    loss = KPSLoss(CIFAR10_LT, max_m=0.2, s=15)
    margins, scales = flip_construction(CIFAR10_LT, 0.2, 15)
    # equal up to the int() rounding of the exp profile's counts
    assert np.allclose(loss.margins.numpy(), margins, atol=2e-3)
    assert np.allclose(loss.class_scales.numpy(), scales, atol=0.05)
    assert float(loss.margins[-1]) == pytest.approx(0.2)  # the rarest class gets max_m
    assert float(loss.margins.argmax()) == 9 and float(loss.r.min()) == pytest.approx(1.0)


def test_kps_margins_follow_the_class_when_counts_are_shuffled():
    counts = np.asarray(COUNT_SETS["imagenet_lt_unsorted"])
    perm = np.random.default_rng(4).permutation(len(counts))
    base, shuffled = KPSLoss(counts.tolist(), 0.35), KPSLoss(counts[perm].tolist(), 0.35)
    assert torch.allclose(shuffled.margins, base.margins[perm])
    assert torch.allclose(shuffled.class_scales, base.class_scales[perm])
    assert torch.allclose(shuffled.r, base.r[perm])
    # the flip construction is not permutation-equivariant on unsorted counts
    flip_base, _ = flip_construction(counts, 0.35, 15)
    flip_shuffled, _ = flip_construction(counts[perm], 0.35, 15)
    assert not np.allclose(flip_shuffled, flip_base[perm], atol=1e-3)


def test_ldam_margins_depend_on_counts_only():
    counts = np.asarray(COUNT_SETS["imagenet_lt_unsorted"])
    perm = np.random.default_rng(5).permutation(len(counts))
    assert torch.allclose(ldam_margins(counts[perm].tolist(), 0.5), ldam_margins(counts.tolist(), 0.5)[perm])
    assert float(ldam_margins([1, 1000], 0.5).max()) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "counts, pattern",
    [
        ([], "non-empty"),
        ([10, 0, 3], r"class\(es\) \[1\] have 0 samples"),
        ([[1, 2]], "1-D"),
        ([2.5, 3], "integers"),
    ],
)
def test_bad_class_counts_are_refused(counts, pattern):
    for make in (
        lambda: KPSLoss(counts, 0.2),
        lambda: LDAMLoss(counts),
        lambda: class_balanced_weights(counts),
    ):
        with pytest.raises(FFNError, match=pattern):
            make()


def test_counts_of_one_are_fine():
    loss = KPSLoss([1, 1, 5], 0.5)
    assert torch.isfinite(loss(torch.zeros(2, 3), torch.tensor([0, 2])))
    assert torch.isfinite(LDAMLoss([1, 1])(torch.zeros(1, 2), torch.tensor([1])))


@pytest.mark.parametrize(
    "loss", [CELoss(3), KPSLoss([3, 2, 1], 0.2), LDAMLoss([3, 2, 1])], ids=["ce", "kps", "ldam"]
)
def test_labels_outside_the_classes_are_refused(loss):
    with pytest.raises(FFNError, match=r"label 3 outside the 3 classes \(expected 0..2\)"):
        loss(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(FFNError, match="label -1 outside"):
        loss(torch.zeros(2, 3), (torch.tensor([0, 1]), torch.tensor([-1, 1]), 0.5))
    with pytest.raises(FFNError, match="logits have 4 classes"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))


def ref_focal(logits, labels, gamma, weight=None):
    num = den = 0.0
    for row, y in zip(logits, labels, strict=True):
        nll = logsumexp(row) - row[y]
        w = 1.0 if weight is None else weight[y]
        num += w * (1.0 - math.exp(-nll)) ** gamma * nll
        den += w
    return num / den


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_matches_the_formula_and_is_cross_entropy_at_gamma_0(weighted):
    counts = CIFAR10_LT
    logits, labels = random_batch(len(counts), seed=3)
    logits = logits * 4
    weight = class_balanced_weights(counts) if weighted else None
    ref_weight = None if weight is None else weight.double().tolist()
    focal = FocalLoss(len(counts), gamma=2.0, weight=weight).double()
    assert float(focal(logits, labels)) == pytest.approx(
        ref_focal(logits.tolist(), labels.tolist(), 2.0, ref_weight), rel=1e-10
    )
    as_ce = FocalLoss(len(counts), gamma=0.0, weight=weight).double()(logits, labels)
    assert float(as_ce) == pytest.approx(float(CELoss(len(counts), weight=weight).double()(logits, labels)))


def test_logit_adjusted_loss_at_tau_1_is_balanced_softmax():
    counts = COUNT_SETS["imagenet_lt_unsorted"]
    logits, labels = random_batch(len(counts), seed=4)
    log_prior = np.log(np.asarray(counts, dtype=np.float64) / sum(counts))
    expected = ref_ce((logits.numpy() + 0.7 * log_prior).tolist(), labels.tolist())
    assert float(LogitAdjustedLoss(counts, tau=0.7).double()(logits, labels)) == pytest.approx(
        expected, rel=1e-10
    )
    log_counts = torch.log(torch.as_tensor(counts, dtype=torch.float64))
    assert float(LogitAdjustedLoss(counts, tau=1.0).double()(logits, labels)) == pytest.approx(
        float(balanced_softmax_loss(logits, labels, log_counts)), rel=1e-10
    )


class _Params:
    kps_max_m, kps_s, ldam_max_m, ldam_s = 0.2, 15.0, 0.5, 30.0
    focal_gamma, class_balanced_beta, logit_adjusted_tau, cosine_s = 2.0, 0.999, 0.5, 16.0


# every loss on every head it accepts (a margin loss on a linear head: refused, tests/test_config.py)
LOSS_HEADS = [(n, h) for n in LOSSES for h in ("linear", "cosine") if h == "cosine" or n not in MARGIN_LOSSES]


@pytest.mark.parametrize("name, head", LOSS_HEADS)
def test_every_registered_loss_is_built_as_its_formula_says(name, head):
    counts = CIFAR10_LT
    logits, labels = random_batch(len(counts), seed=5)
    p = _Params()
    loss = build_loss(name, counts, p, head).double()
    scale = p.cosine_s if head == "cosine" and name not in MARGIN_LOSSES else 1.0
    z = (logits * scale).tolist()
    log_prior = np.log(np.asarray(counts, dtype=np.float64) / sum(counts))
    expected = {
        "ce": lambda: ref_ce(z, labels.tolist()),
        "kps": lambda: ref_kps(logits.tolist(), labels.tolist(), counts, p.kps_max_m, p.kps_s, False),
        "ldam": lambda: ref_ldam(logits.tolist(), labels.tolist(), counts, p.ldam_max_m, p.ldam_s),
        "focal": lambda: ref_focal(z, labels.tolist(), p.focal_gamma),
        "class_balanced_ce": lambda: ref_ldam(
            (np.asarray(z) / 30.0).tolist(),  # LDAM with no margin and s = 30 is weighted CE
            labels.tolist(),
            counts,
            0.0,
            30.0,
            class_balanced_weights(counts, p.class_balanced_beta).double().tolist(),
        ),
        "balanced_softmax": lambda: ref_ce((np.asarray(z) + log_prior).tolist(), labels.tolist()),
        "logit_adjusted": lambda: ref_ce(
            (np.asarray(z) + p.logit_adjusted_tau * log_prior).tolist(), labels.tolist()
        ),
    }[name]()
    assert float(loss(logits, labels)) == pytest.approx(expected, rel=1e-8)
    probability = {"kps": p.kps_s, "ldam": p.ldam_s}.get(name, scale)
    assert probability_scale(name, head, p) == probability
