"""`ffn train-classifier CONFIG [--sweep w1=0:1:0.1]`: stage 2 of FFN on the feature cache.

A cosine classifier initialised from the KPS head, trained with the LDAM loss on the fused
embeddings z = w1*f̂_kps + w2*f̂_ce read from the cache, class-balanced re-sampling, SGD and
cosine decay (docs/method.md, stage 2). One classifier per fusion weight, each in its own
directory; a finished one (same settings, same cache) is not trained again, so a sweep
that was interrupted resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ffn_dist.cache.store import CachedSplit, FeatureCache
from ffn_dist.checkpoint import load_checkpoint
from ffn_dist.config import Config
from ffn_dist.data.loader import to_device
from ffn_dist.data.sampling import epoch_order
from ffn_dist.errors import FFNError
from ffn_dist.losses import LDAMLoss
from ffn_dist.metrics import accuracy_report, top_k
from ffn_dist.models import CosineHead
from ffn_dist.models.heads import check_fusion_weights, cosine_and_norms, weight_gradient_terms
from ffn_dist.plots import figure
from ffn_dist.run import (
    StageFailed,
    begin_stage,
    classifier_dir,
    final_checkpoint,
    finish_stage,
    recorded,
    save_torch,
    stage_identity,
    stage_inputs,
    write_json,
    write_text,
)
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.tables import accuracy_cells, column_names, markdown_table, number

SWEEP_COLUMNS = ("top1", "top5", "many", "medium", "few")
GATHER_BATCHES = 64  # batches gathered from the cache at once: fewer, larger reads
# A step is a few dozen small operations: for a small classifier (CIFAR-10: 10 x 64) it is
# launch-bound on a GPU (some 30 kernels, ~0.2 ms) and takes 62 us on one CPU core here;
# ImageNet-LT's 1000 x 2048 takes 3.8 ms on that core and is a GPU's work.
GPU_MIN_WEIGHTS = 2**16


def classifier_device(setting: str, weights: int, cuda: bool | None = None) -> torch.device:
    """`stage2.device`: auto picks a GPU (if any) for classifiers of GPU_MIN_WEIGHTS or more."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if setting == "cuda" and not cuda:
        raise FFNError("stage2.device=cuda: no CUDA device is visible; use stage2.device=auto or cpu")
    if setting == "cuda" or (setting == "auto" and cuda and weights >= GPU_MIN_WEIGHTS):
        return torch.device("cuda")  # the current one
    return torch.device("cpu")


class ClassifierStep:
    """One SGD step of the cosine head on fused embeddings with the LDAM loss, written out.

    It computes what CosineHead + LDAMLoss + torch.optim.SGD(momentum, weight_decay) compute
    (test_classifier checks them step by step), with the weight gradient S^T z - r W folded
    into the momentum update: buf = momentum * buf + S^T z + (weight_decay - r) * W, then
    W -= lr * buf. Why: on ImageNet-LT (a 1000 x 2048 weight, batch 64) the step is two
    matrix products and a few passes over 8 MB; the separate gradient that the autograd path
    allocates, writes and reads again, and the per-step bookkeeping of autograd and
    torch.optim, added about a fifth to the epoch (`ffn bench stage2`, README).
    """

    def __init__(self, head: CosineHead, loss: LDAMLoss, momentum: float, weight_decay: float):
        self.weight = head.weight  # updated in place
        self.loss, self.momentum, self.weight_decay = loss, momentum, weight_decay
        self.buffer = torch.zeros_like(head.weight)  # zeros: the first step gives buf = gradient

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, labels: torch.Tensor, lr: float) -> torch.Tensor:
        """Features are fused (or unit) embeddings; returns the batch's loss."""
        cosine, norms = cosine_and_norms(features, self.weight)
        loss, grad_cosine = self.loss.value_and_grad(cosine, labels)
        scaled, radial = weight_gradient_terms(grad_cosine, cosine, norms)
        self.buffer.addmm_(scaled.t(), features, beta=self.momentum)
        self.buffer.addcmul_(self.weight, (self.weight_decay - radial)[:, None])
        self.weight.add_(self.buffer, alpha=-lr)
        return loss


def parse_sweep(text: str) -> list[float]:
    """`w1=START:STOP:STEP` (both ends included) or `w1=A,B,C`, each in [0, 1]."""
    key, _, spec = text.partition("=")
    if key.strip() != "w1" or not spec:
        raise FFNError(f"--sweep {text!r}: expected w1=START:STOP:STEP or w1=A,B,C")
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            values = list(np.arange(start, stop + step / 2, step))
        else:
            values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise FFNError(
            f"--sweep {text!r}: expected w1=START:STOP:STEP (STEP > 0, STOP >= START) or w1=A,B,C"
        ) from None
    values = sorted({round(float(v), 6) for v in values})  # floats: a numpy scalar fails weights_only loads
    if not all(0.0 <= v <= 1.0 for v in values):
        raise FFNError(f"--sweep {text!r}: every w1 must be in [0, 1], got {values}")
    return values


def kps_head_weight(cfg: Config) -> torch.Tensor:
    """The stage-2 classifier starts from the KPS branch's cosine head."""
    state = load_checkpoint(final_checkpoint(cfg, "kps"), stage_identity(cfg, "stage1"))
    return state["model"]["head.weight"]


def cosine_lr(base: float, step: int, total: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * step / total))


def at_w1(cfg: Config, w1: float) -> Config:
    """The config with the fusion weights (w1, 1 - w1): a sweep's classifiers each have their own."""
    return dataclasses.replace(cfg, stage2=dataclasses.replace(cfg.stage2, w1=w1, w2=round(1.0 - w1, 6)))


def evaluate_cached(
    logits_of, split: CachedSplit, w1: float, train_counts, device, chunk: int = 8192
) -> dict:
    """Accuracy of a classifier (fused features at w1 -> logits) on view 0 of a cached split."""
    rows = split.rows_of_view(0)
    predictions = []
    with torch.no_grad():
        for begin in range(0, len(rows), chunk):
            features = split.fused(rows[begin : begin + chunk], w1, round(1.0 - w1, 6)).to(device)
            predictions.append(top_k(logits_of(features)).cpu())
    return accuracy_report(split.labels[rows], torch.cat(predictions).numpy(), train_counts)


class CachedEpochs:
    """The epoch loop of every classifier trained on the cache, FFN's and the methods' alike.

    An epoch draws as many rows as there are training images, from every cached view,
    class-balanced ('balanced') or instance-balanced ('shuffle'); gathers them a chunk of
    GATHER_BATCHES batches at a time and moves the chunk to the device in one (pinned)
    copy; and calls `step(features, labels, lr)` on each batch of fused embeddings at the
    cosine-decayed learning rate. A step returns the batch's loss as a tensor: it is summed
    on the device and read once an epoch, so a GPU step never waits on the host.
    """

    def __init__(self, cfg: Config, split: CachedSplit, device: torch.device):
        self.cfg, self.split, self.device = cfg, split, device
        self.images = len(split.rows_of_view(0))
        self.labels = torch.from_numpy(split.labels)

    @property
    def steps(self) -> int:
        return math.ceil(self.images / self.cfg.stage2.batch_size)

    def epoch(self, step, epoch: int, w1: float, order: str = "balanced") -> torch.Tensor:
        """One epoch; returns its mean loss as a tensor on the device (reading it waits)."""
        s2, steps, w2 = self.cfg.stage2, self.steps, round(1.0 - w1, 6)
        draws = epoch_order(self.split.labels, order, self.cfg.seed, epoch)[: self.images]
        total, chunk = torch.zeros((), device=self.device), s2.batch_size * GATHER_BATCHES
        for begin in range(0, len(draws), chunk):
            rows = draws[begin : begin + chunk]
            stored = {k: to_device(v, self.device) for k, v in self.split.gather(rows).items()}
            targets = to_device(self.labels[rows], self.device)
            for offset in range(0, len(rows), s2.batch_size):
                index = epoch * steps + (begin + offset) // s2.batch_size
                batch = {k: v[offset : offset + s2.batch_size] for k, v in stored.items()}
                lr = cosine_lr(s2.lr, index, s2.epochs * steps)
                total += step(self.split.fuse(batch, w1, w2), targets[offset : offset + s2.batch_size], lr)
        return total / steps

    def train(self, step, w1: float, order: str, name: str, epochs=None, progress=None) -> None:
        """`epochs` (default: all of stage2.epochs) of `step`; stops on a non-finite loss.
        `progress(epoch, loss, seconds)` is called after each epoch."""
        for epoch in epochs if epochs is not None else range(self.cfg.stage2.epochs):
            tick = time.perf_counter()
            loss = self.epoch(step, epoch, w1, order).item()  # once an epoch, for the progress line anyway
            if not math.isfinite(loss):
                raise StageFailed(
                    f"[{name}] the loss is {loss:g} at epoch {epoch + 1}: training diverged "
                    f"(stage2.lr {self.cfg.stage2.lr:g}); nothing was written"
                )
            if progress:
                progress(epoch, loss, time.perf_counter() - tick)


class SGDStep:
    """One autograd step of SGD with momentum on `loss_of(features, labels)`, then an optional
    `project()` of the parameters (weight balancing's MaxNorm): the step of every method
    trained on the cache but FFN's, whose step is written out (ClassifierStep)."""

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


class ClassifierTrainer:
    """FFN's classifier (stage 2) for any w1, each written to `root`/w1_X.XX (default: the
    run's classifier/ folder; another seed's go elsewhere, so the stage's own stays)."""

    def __init__(
        self, cfg: Config, cache: FeatureCache, initial_weight: torch.Tensor, writer=None, root=None
    ):
        self.cfg, self.cache, self.initial_weight, self.writer = cfg, cache, initial_weight, writer
        self.root = root
        self.train = cache.splits["train"]
        self.images = self.train.rows_of_view(0)  # one row per training image
        self.counts = np.bincount(self.train.labels[self.images], minlength=cfg.data.num_classes)
        self.device = classifier_device(cfg.stage2.device, cfg.data.num_classes * cache.dims)
        self.epochs = CachedEpochs(cfg, self.train, self.device)

    def directory(self, w1: float) -> Path:
        return classifier_dir(self.cfg, w1) if self.root is None else Path(self.root) / f"w1_{w1:.2f}"

    def fit(self, w1: float) -> dict:
        """Train (or reuse) the classifier for fusion weight w1; returns its report."""
        s2 = self.cfg.stage2
        w2 = round(1.0 - w1, 6)
        check_fusion_weights(w1, w2)
        out = self.directory(w1)
        inputs = stage_inputs(at_w1(self.cfg, w1), "classifier", upstream={"cache": self.cache.cache_id})
        identity = stage_identity(self.cfg, "classifier", inputs)
        done = out / "report.json"
        if done.is_file() and json.loads(done.read_text()).get("identity") == identity:
            print(f"classifier w1={w1:.2f}: complete in {out}, skipped", flush=True)
            return json.loads(done.read_text())
        head, train_step = self.new_classifier()

        def progress(epoch: int, loss: float, seconds: float) -> None:
            lr = cosine_lr(s2.lr, (epoch + 1) * self.epochs.steps, s2.epochs * self.epochs.steps)
            print(
                f"[classifier w1={w1:.2f}] epoch {epoch + 1}/{s2.epochs} loss {loss:.4f} "
                f"lr {lr:.4g} {seconds:.2f} s ({len(self.images) / seconds:,.0f} rows/s)",
                flush=True,
            )
            if self.writer:
                self.writer.add_scalar(f"classifier_w1_{w1:.2f}/loss", loss, epoch + 1)

        self.epochs.train(train_step, w1, "balanced", f"classifier w1={w1:.2f}", progress=progress)
        report = {
            "identity": identity,
            "w1": w1,
            "w2": w2,
            "epochs": s2.epochs,
            "train_counts": self.counts.tolist(),
        }
        for name in ("test", "val"):
            if name in self.cache.splits:
                report[name] = evaluate_cached(
                    lambda z: head(z, normalized=True), self.cache.splits[name], w1, self.counts, self.device
                )
        self._save(out, head, report)
        test = report["test"]
        print(f"[classifier w1={w1:.2f}] test top-1 {test['top1']:.2f} top-5 {test['top5']:.2f}", flush=True)
        return report

    def new_classifier(self) -> tuple[CosineHead, ClassifierStep]:
        """A cosine head initialised from the KPS head, and its training step."""
        s2 = self.cfg.stage2
        head = CosineHead(self.cache.dims, self.cfg.data.num_classes)
        with torch.no_grad():
            head.weight.copy_(self.initial_weight)
        head = head.to(self.device)
        # the cache's labels were written from validated splits (the fingerprint holds num_classes)
        loss_fn = LDAMLoss(self.counts, max_m=s2.ldam_max_m, s=s2.ldam_s).trusting_labels().to(self.device)
        return head, ClassifierStep(head, loss_fn, s2.momentum, s2.weight_decay)

    def _save(self, out: Path, head: CosineHead, report: dict) -> None:
        weight = head.weight.detach().cpu().clone()
        save_torch(out / "classifier.pt", {"weight": weight, "w1": report["w1"], "w2": report["w2"]})
        write_json(out / "report.json", report)  # written last: its identity marks it complete


def val_choice(reports: list[dict]) -> dict | None:
    """The sweep's classifier with the best val top-1 (None without a val split)."""
    with_val = [r for r in reports if r.get("val")]
    return max(with_val, key=lambda r: r["val"]["top1"]) if with_val else None


def sweep_table(reports: list[dict]) -> str:
    chosen = val_choice(reports)
    rows = [
        [f"{r['w1']:.1f}" + (" (chosen on val)" if r is chosen else ""), f"{r['w2']:.1f}"]
        + [number((r.get("val") or {}).get("top1"))]
        + accuracy_cells(r["test"], SWEEP_COLUMNS)
        for r in reports
    ]
    return markdown_table(["w1 (KPS)", "w2 (CE)", "val top-1", *column_names(SWEEP_COLUMNS)], rows)


def plot_sweep(reports: list[dict], path: Path, title: str) -> None:
    with figure(path, figsize=(5, 3.5)) as (_, ax):
        w1 = [r["w1"] for r in reports]
        ax.plot(w1, [r["test"]["top1"] for r in reports], "o-", label="top-1")
        for group in ("many", "medium", "few"):
            values = [r["test"][group] for r in reports]
            if all(v is not None for v in values):
                ax.plot(w1, values, ".--", alpha=0.6, label=group)
        ax.set_xlabel("w1 (KPS weight); w2 = 1 - w1")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)


def _fit_all(cfg: Config, trainer: ClassifierTrainer, sweep: list[float] | None) -> list[dict]:
    """The sweep's reports; the configured w1 is trained too where the sweep leaves it out."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(Path(cfg.output_dir) / "tensorboard" / "classifier")) as writer:
        trainer.writer = writer
        reports = [trainer.fit(w1) for w1 in sweep or []]
        if cfg.stage2.w1 not in (sweep or []):
            configured = trainer.fit(cfg.stage2.w1)
            reports = reports or [configured]
    return reports


@holds_run_dir
def train_classifier(cfg: Config, sweep: list[float] | None = None) -> list[dict]:
    """The configured classifier (the stage), and one per w1 of `sweep` (plus its table and
    plot)."""
    with recorded(cfg, "classifier"):
        begin_stage(cfg, "classifier")
        cache = open_run_cache(cfg)
        reports = _fit_all(cfg, ClassifierTrainer(cfg, cache, kps_head_weight(cfg)), sweep)
        out = classifier_dir(cfg, cfg.stage2.w1)
        finish_stage(cfg, "classifier", [out / "classifier.pt", out / "report.json"])
    if sweep:
        out = Path(cfg.output_dir) / "classifier"
        table = sweep_table(reports)
        write_text(out / "sweep.md", table + "\n")
        write_json(out / "sweep.json", [{k: r.get(k) for k in ("w1", "w2", "val", "test")} for r in reports])
        plot_sweep(reports, out / "sweep.png", f"{cfg.name}: fusion sweep")
        print(f"\nfusion sweep, test accuracy (%):\n{table}\n(table, JSON and plot in {out})", flush=True)
    return reports
