"""The stage-2 methods: one registry of classifiers trained (or fitted) on the feature cache.

`stage2.method` names one; the classifier stage (classifier.py) trains it on the fused
embeddings at `stage2.fusion` (a weight of 1 on one branch: its features alone),
choosing its hyperparameters (`stage2.METHOD.*`, each a grid) on the val split. Every method
that trains runs the one loop of epochs.py on the stage-2 recipe (SGD with momentum, cosine
decay, stage2.epochs, stage2.lr), so they differ only in what their entry says. Each returns
its classifier as a LinearForm: one layer over z, what the report scores and `ffn export`
puts behind the backbones.

  ffn       FFN's cosine classifier: KPS-head init, LDAM, class-balanced (the paper's stage 2)
  erm       a linear classifier fit with instance-balanced cross-entropy on the frozen
            features: the joint classifier of frozen features, and the base of the
            post-hoc methods and of those that fine-tune it (its own classifier point,
            trained once and reused by each of them)
  crt       classifier re-training (Kang et al. 2020): a new linear classifier, randomly
            initialised, cross-entropy, class-balanced sampling
  lws       learnable weight scaling (Kang et al.): erm frozen, one scale per class learned
            with class-balanced sampling (logits x scale)
  tau_norm  tau-normalisation (Kang et al.): erm's w_c / ||w_c||^tau, no bias
  ncm       nearest class mean: cosine to the mean of each class's unit training features
  logit_adjustment  post-hoc logit adjustment (Menon et al. 2021): erm's logits - tau log pi
  balanced_softmax  Balanced Softmax (Ren et al. 2020): a new linear classifier trained with
            cross-entropy on logits + log n_y, instance-balanced; predicts with the logits
  weight_balancing  weight balancing's stage 2 (Alshammari et al. 2022): erm fine-tuned with
            the class-balanced loss (mean of w_y CE, Cui et al.'s weights), a tuned weight
            decay, and MaxNorm: after every step each class vector is projected to norm at
            most delta = min + max_norm (max - min) of erm's row norms
  mislas    MiSLAS's label-aware smoothing (Zhong et al. 2021): erm fine-tuned with
            class-balanced sampling against targets smoothed by epsilon_y, from the tail's
            value at the rarest class to the head's at the most frequent (concave). Its
            shifted batch norm re-estimates the backbone's statistics: it needs the
            backbone, so it has no place on a cache of frozen embeddings
  disalign  DisAlign (Zhang et al. 2021): erm frozen, a per-class magnitude and margin and a
            learned confidence gate (models.gated_logits), trained with its generalised
            re-weighting (cross-entropy weighted by (1 / r_c)^rho), instance-balanced
  ldam_drw  LDAM-DRW (Cao et al. 2019) on the frozen features: FFN's cosine classifier
            (KPS-head init, LDAM) sampled instance-balanced, with class-balanced loss
            weights from `stage2.ldam_drw.drw_from` of the epochs (epoch 160 of 200)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ffn_dist.cache.store import FeatureCache
from ffn_dist.config import Config
from ffn_dist.fusion import describe_fusion
from ffn_dist.losses import (
    LDAMLoss,
    balanced_softmax_loss,
    class_balanced_weights,
    deferred_epoch,
    label_aware_smoothing,
    reweighting_weights,
    smoothed_cross_entropy,
)
from ffn_dist.models.heads import CosineHead, LinearForm, gated_logits
from ffn_dist.registry import METHODS
from ffn_dist.stages.epochs import CachedEpochs, CosineStep, OptimizerStep, classifier_device, stage2_seed


class Fitting:
    """What a method's fit works with: the training rows of the cache at the config's fusion,
    their class counts, the device, the one loop; `point(method)` is another method's
    classifier at the same settings (erm, which several methods start from), trained or
    reused by the classifier stage; `initial_head` the stage-1 head weight FFN's classifier
    starts from (config.head_branch's)."""

    def __init__(self, cfg: Config, cache: FeatureCache, point: Callable, initial_head: Callable, verbose):
        self.cfg, self.cache, self.point, self.verbose = cfg, cache, point, verbose
        self.initial_head = initial_head
        self.train = cache.splits["train"]
        self.counts = np.bincount(
            self.train.labels[self.train.rows_of_view(0)], minlength=cfg.data.num_classes
        )
        self.device = classifier_device(cfg.stage2.device, cfg.data.num_classes * cache.dims)
        self.loop = CachedEpochs(cfg, self.train, self.device)
        self.name = f"classifier {cfg.stage2.method} at {describe_fusion(cfg.stage2.fusion)}"
        counts = torch.as_tensor(self.counts, dtype=torch.float32)
        self.log_prior = torch.log(counts / counts.sum()).to(self.device)
        self.log_counts = torch.log(counts).to(self.device)

    # -- training -----------------------------------------------------------------------
    def trained(self, parameters: list, loss_of, order: str, weight_decay=None, project=None) -> None:
        """The stage-2 recipe on `loss_of(features, labels)`, `order` 'shuffle' (instance-
        balanced) or 'balanced' (class-balanced), with torch's SGD."""
        s2 = self.cfg.stage2
        decay = s2.weight_decay if weight_decay is None else weight_decay
        step = OptimizerStep(parameters, loss_of, s2.momentum, decay, project)
        self.loop.train(step, order, self.name, progress=self.progress)

    def cosine_step(self, head: CosineHead, loss) -> CosineStep:
        """The written-out step of a cosine head on `loss` (FFN's, LDAM-DRW's)."""
        return CosineStep(head, loss, self.cfg.stage2.momentum, self.cfg.stage2.weight_decay)

    def progress(self, epoch: int, loss: float, seconds: float) -> None:
        epochs = self.cfg.stage2.epochs
        if self.verbose or epoch + 1 == epochs:
            rate = self.loop.images / seconds
            shown = f"loss {loss:.4f} {seconds:.2f} s ({rate:,.0f} rows/s)"
            print(f"[{self.name}] epoch {epoch + 1}/{epochs} {shown}", flush=True)

    def new_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A freshly initialised linear classifier (nn.Linear's init, seeded)."""
        torch.manual_seed(stage2_seed(self.cfg))
        layer = torch.nn.Linear(self.cache.dims, self.cfg.data.num_classes)
        return layer.weight.detach().to(self.device), layer.bias.detach().to(self.device)

    def linear(
        self, order: str, loss=F.cross_entropy, start=None, **step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear classifier trained from `start` (default: a fresh one) on
        `loss(logits, labels)`; `step['project'](weight)` runs after every step."""
        weight, bias = (p.clone().requires_grad_() for p in (start or self.new_linear()))
        project = step.pop("project", None)
        self.trained(
            [weight, bias],
            lambda z, y: loss(F.linear(z, weight, bias), y),
            order,
            step.get("weight_decay"),
            None if project is None else lambda: project(weight),
        )
        return weight.detach(), bias.detach()

    @functools.cached_property
    def erm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The erm classifier of these features (its own point: trained once, shared)."""
        form = self.point("erm").to(self.device)
        return form.weight, form.bias

    def cosine_head(self) -> CosineHead:
        """A cosine head initialised from config.head_branch's (FFN's and LDAM-DRW's start)."""
        head = CosineHead(self.cache.dims, self.cfg.data.num_classes)
        with torch.no_grad():
            head.weight.copy_(self.initial_head())
        return head.to(self.device)

    def ldam(self, weight=None) -> LDAMLoss:
        s2 = self.cfg.stage2
        # the cache's labels were written from validated splits
        return LDAMLoss(self.counts, s2.ldam_max_m, s2.ldam_s, weight).trusting_labels().to(self.device)


# ----------------------------------------------------------------------------- the methods
def fit_ffn(f: Fitting) -> LinearForm:
    head = f.cosine_head()
    f.loop.train(f.cosine_step(head, f.ldam()), "balanced", f.name, progress=f.progress)
    return LinearForm.cosine(head.weight)


def fit_erm(f: Fitting) -> LinearForm:
    return LinearForm(*f.linear("shuffle"))


def fit_crt(f: Fitting) -> LinearForm:
    return LinearForm(*f.linear("balanced"))


def fit_lws(f: Fitting) -> LinearForm:
    weight, bias = f.erm
    scales = torch.ones(f.cfg.data.num_classes, device=f.device, requires_grad=True)
    f.trained([scales], lambda z, y: F.cross_entropy(F.linear(z, weight, bias) * scales, y), "balanced")
    scales = scales.detach()
    return LinearForm(weight * scales[:, None], bias * scales)


def fit_tau_norm(f: Fitting, tau: float) -> LinearForm:
    weight, _ = f.erm
    return LinearForm(weight / weight.norm(dim=1, keepdim=True).pow(tau))


def fit_logit_adjustment(f: Fitting, tau: float) -> LinearForm:
    weight, bias = f.erm
    return LinearForm(weight, bias - tau * f.log_prior)


def fit_ncm(f: Fitting) -> LinearForm:
    sums = torch.zeros(f.cfg.data.num_classes, f.cache.dims)
    rows = f.train.rows_of_view(0)
    for begin in range(0, len(rows), 8192):
        picked = rows[begin : begin + 8192]
        features = f.train.fused(picked, f.loop.fusion)
        sums.index_add_(0, torch.from_numpy(f.train.labels[picked]), F.normalize(features, dim=1))
    return LinearForm(F.normalize(sums, dim=1).to(f.device), normalize_input=True)


def fit_balanced_softmax(f: Fitting) -> LinearForm:
    return LinearForm(*f.linear("shuffle", functools.partial(balanced_softmax_loss, log_counts=f.log_counts)))


def fit_weight_balancing(f: Fitting, weight_decay: float, max_norm: float) -> LinearForm:
    start = f.erm
    norms = start[0].norm(dim=1)
    delta = norms.min() + max_norm * (norms.max() - norms.min())
    weights = class_balanced_weights(f.counts).float().to(f.device)

    def loss(logits, labels):  # Cui et al.: the batch mean of w_y * CE
        return (weights[labels] * F.cross_entropy(logits, labels, reduction="none")).mean()

    def project(weight):  # MaxNorm: rows longer than delta scaled back onto the ball
        weight.mul_((delta / weight.norm(dim=1)).clamp(max=1.0)[:, None])

    return LinearForm(*f.linear("shuffle", loss, start, weight_decay=weight_decay, project=project))


def fit_mislas(f: Fitting, head: float, tail: float) -> LinearForm:
    epsilon = label_aware_smoothing(f.counts, head, tail).float().to(f.device)
    loss = functools.partial(smoothed_cross_entropy, epsilon=epsilon)
    return LinearForm(*f.linear("balanced", loss, f.erm))


def fit_disalign(f: Fitting, rho: float) -> LinearForm:
    weight, bias = f.erm
    torch.manual_seed(stage2_seed(f.cfg))
    gate = torch.nn.Linear(f.cache.dims, 1)  # the confidence layer, nn.Linear's init
    classes = f.cfg.data.num_classes
    parts = {
        "gate_weight": gate.weight.detach()[0],
        "gate_bias": gate.bias.detach()[0],
        "scale": torch.ones(classes),  # DisAlign's init: magnitude 1, margin 0
        "shift": torch.zeros(classes),
    }
    parts = {k: v.to(f.device).clone().requires_grad_() for k, v in parts.items()}
    class_weights = reweighting_weights(f.counts, rho).float().to(f.device)

    def loss(z, y):
        logits = gated_logits(F.linear(z, weight, bias), z, *parts.values())
        return F.cross_entropy(logits, y, weight=class_weights)

    f.trained(list(parts.values()), loss, "shuffle")
    return LinearForm(weight, bias, gate={k: v.detach() for k, v in parts.items()})


def fit_ldam_drw(f: Fitting) -> LinearForm:
    s2 = f.cfg.stage2
    head = f.cosine_head()
    deferred = deferred_epoch(s2.ldam_drw.drw_from, s2.epochs)
    step = f.cosine_step(head, f.ldam())
    f.loop.train(step, "shuffle", f.name, epochs=range(deferred), progress=f.progress)
    step.loss = f.ldam(class_balanced_weights(f.counts))  # DRW: class-balanced weights from here
    f.loop.train(step, "shuffle", f.name, epochs=range(deferred, s2.epochs), progress=f.progress)
    return LinearForm.cosine(head.weight)


# Each method of registry.METHODS: `fit(fitting, **hyperparameters)` returns its classifier.
FITS = {
    "ffn": fit_ffn,
    "erm": fit_erm,
    "crt": fit_crt,
    "lws": fit_lws,
    "tau_norm": fit_tau_norm,
    "ncm": fit_ncm,
    "logit_adjustment": fit_logit_adjustment,
    "balanced_softmax": fit_balanced_softmax,
    "weight_balancing": fit_weight_balancing,
    "mislas": fit_mislas,
    "disalign": fit_disalign,
    "ldam_drw": fit_ldam_drw,
}


def probability_scale(cfg: Config) -> float:
    """The configured classifier's probabilities are softmax(scale * logits): cosine logits
    were trained at LDAM's s, the others' logits are their softmax's own."""
    return cfg.stage2.ldam_s if METHODS[cfg.stage2.method].cosine else 1.0


def grid_of(cfg: Config, method: str) -> dict[str, list]:
    """The method's hyperparameter grids: the lists of its `stage2.METHOD` section."""
    section = getattr(cfg.stage2, method, None)
    if not dataclasses.is_dataclass(section):
        return {}
    return {k: v for k, v in dataclasses.asdict(section).items() if isinstance(v, list)}
