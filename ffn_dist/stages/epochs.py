"""The one training loop of every classifier trained on the feature cache, FFN's included.

An epoch draws as many rows as there are training images, from every cached view,
class-balanced ('balanced') or instance-balanced ('shuffle'); gathers them a chunk of
GATHER_BATCHES batches at a time and moves the chunk to the device in one (pinned) copy;
fuses each batch (z = sum_b w_b f̂_b, stage2.fusion) and takes one step on it at the cosine-decayed
learning rate of the stage-2 recipe. The losses are summed on the device and read once an
epoch, so a GPU step never waits on the host.

A step is SGD with momentum and weight decay. `OptimizerStep` is torch's (autograd and
`torch.optim.SGD`), every method's. `CosineStep` is the same for a cosine head (FFN's
classifier, LDAM-DRW's) written out, because it was measured to matter: at ImageNet-LT's
shapes the separate gradient torch's step needs, allocated, written and read again every
step, made the epoch about a fifth longer (docs/benchmarks.md). It folds the head's weight
gradient (`heads.cosine_weight_gradient`, the one gradient written out, shared with the
head's autograd function) into the momentum buffer; the loss's gradient is autograd's.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from ffn_dist.cache.store import CachedSplit
from ffn_dist.config import Config
from ffn_dist.data.loader import to_device
from ffn_dist.data.sampling import epoch_order
from ffn_dist.errors import FFNError
from ffn_dist.metrics import logits_report
from ffn_dist.models.heads import CosineHead, cosine_weight_gradient
from ffn_dist.run.stages import StageFailed

GATHER_BATCHES = 64  # batches gathered from the cache at once: fewer, larger reads
# A step is a few dozen small operations: for a small classifier (CIFAR-10: 10 x 64) it is
# launch-bound on a GPU, and a GPU's work only for large ones (ImageNet-LT's 1000 x 2048).
GPU_MIN_WEIGHTS = 2**16


def classifier_device(setting: str, weights: int, cuda: bool | None = None) -> torch.device:
    """`stage2.device`: auto picks a GPU (if any) for classifiers of GPU_MIN_WEIGHTS or more."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if setting == "cuda" and not cuda:
        raise FFNError("stage2.device=cuda: no CUDA device is visible; use stage2.device=auto or cpu")
    if setting == "cuda" or (setting == "auto" and cuda and weights >= GPU_MIN_WEIGHTS):
        return torch.device("cuda")  # the current one
    return torch.device("cpu")


def stage2_seed(cfg: Config) -> int:
    """Stage 2 draws from `stage2.seed`, or the run's seed where it is null."""
    return cfg.seed if cfg.stage2.seed is None else cfg.stage2.seed


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / total))


class CachedEpochs:
    """Epochs of the stage-2 recipe over the training rows of a cache, fused at `cfg.stage2.fusion`."""

    def __init__(self, cfg: Config, split: CachedSplit, device: torch.device):
        self.cfg, self.split, self.device = cfg, split, device
        self.fusion = cfg.stage2.fusion
        self.seed = stage2_seed(cfg)
        self.images = len(split.rows_of_view(0))
        self.labels = torch.from_numpy(split.labels)

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.cfg.stage2.batch_size)

    def epoch(self, step, epoch: int, order: str) -> torch.Tensor:
        """One epoch of `step(features, labels, lr)`; returns the mean loss as a tensor on the device."""
        s2, steps = self.cfg.stage2, self.steps
        draws = epoch_order(self.split.labels, order, self.seed, epoch)[: self.images]
        total, chunk = torch.zeros((), device=self.device), s2.batch_size * GATHER_BATCHES
        for begin in range(0, len(draws), chunk):
            rows = draws[begin : begin + chunk]
            gathered = self.split.gather(rows, self.split.needed(self.fusion))
            stored = {k: to_device(v, self.device) for k, v in gathered.items()}
            targets = to_device(self.labels[rows], self.device)
            for offset in range(0, len(rows), s2.batch_size):
                lr = cosine_lr(s2.lr, epoch * steps + (begin + offset) // s2.batch_size, s2.epochs * steps)
                batch = {k: v[offset : offset + s2.batch_size] for k, v in stored.items()}
                total += step(
                    self.split.fuse(batch, self.fusion), targets[offset : offset + s2.batch_size], lr
                )
        return total / steps

    def train(self, step, order: str, name: str, epochs=None, progress=None) -> None:
        """`epochs` (default: all of stage2.epochs); stops on a non-finite loss.
        `progress(epoch, loss, seconds)` is called after each epoch."""
        for epoch in epochs if epochs is not None else range(self.cfg.stage2.epochs):
            tick = time.perf_counter()
            loss = self.epoch(step, epoch, order).item()  # once an epoch
            if not math.isfinite(loss):
                raise StageFailed(
                    f"[{name}] the loss is {loss:g} at epoch {epoch + 1}: training diverged "
                    f"(stage2.lr {self.cfg.stage2.lr:g}); nothing was written"
                )
            if progress:
                progress(epoch, loss, time.perf_counter() - tick)


class OptimizerStep:
    """A step of torch's SGD on `loss_of(features, labels)` (autograd), then an optional
    `project()` of the parameters (weight balancing's MaxNorm)."""

    def __init__(self, parameters: list, loss_of, momentum: float, weight_decay: float, project=None):
        self.optimizer = torch.optim.SGD(parameters, lr=0.0, momentum=momentum, weight_decay=weight_decay)
        self.loss_of, self.project = loss_of, project

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss_of(features, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.project is not None:
            with torch.no_grad():
                self.project()
        return loss.detach()


class CosineStep:
    """The step of torch's SGD (momentum, weight decay) for a cosine head on `loss(cosines,
    labels)`, written out: buf = momentum buf + S^T z + (weight_decay - r) W, W -= lr buf, with
    (S, r) the head's weight gradient terms. Equal to CosineHead + the loss + torch.optim.SGD
    (tests/test_classifier.py); `loss` may be replaced between epochs (DRW)."""

    def __init__(self, head: CosineHead, loss, momentum: float, weight_decay: float):
        self.weight = head.weight  # updated in place
        self.loss, self.momentum, self.weight_decay = loss, momentum, weight_decay
        self.buffer = torch.zeros_like(head.weight)  # zeros: the first step gives buf = gradient

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        with torch.no_grad():
            norms = torch.linalg.vector_norm(self.weight, dim=1)
            cosine = (features @ self.weight.t()).div_(norms)
        cosine.requires_grad_(True)
        loss = self.loss(cosine, labels)
        (grad_cosine,) = torch.autograd.grad(loss, cosine)  # the loss's gradient: autograd's
        with torch.no_grad():
            scaled, radial = cosine_weight_gradient(grad_cosine, cosine, norms)
            self.buffer.addmm_(scaled.t(), features, beta=self.momentum)
            self.buffer.addcmul_(self.weight, (self.weight_decay - radial)[:, None])
            self.weight.add_(self.buffer, alpha=-lr)
        return loss.detach()


def cached_logits(logits_of, split: CachedSplit, fusion: dict[str, float], device, chunk: int = 8192):
    """A classifier's logits (features fused at `fusion` -> logits) on view 0 of a cached
    split, on the CPU in fp32, and the split's labels."""
    rows = split.rows_of_view(0)
    logits = []
    with torch.no_grad():
        for begin in range(0, len(rows), chunk):
            features = split.fused(rows[begin : begin + chunk], fusion).to(device)
            logits.append(logits_of(features).float().cpu())
    return torch.cat(logits), torch.as_tensor(split.labels[rows])


def evaluate_cached(
    logits_of, split: CachedSplit, fusion: dict, train_counts, device, scale: float = 1.0, temperature=None
) -> dict:
    """The report of a classifier on view 0 of a cached split; its probabilities are
    softmax(scale * logits), calibrated by `temperature` where one is given."""
    logits, labels = cached_logits(logits_of, split, fusion, device)
    return logits_report(logits, labels, np.asarray(train_counts), scale, temperature)
