"""Stage 1 of FFN: the branches' backbones (`branches`: the paper's CE and KPS), trained
concurrently on a process group each.

`ffn train-backbones CONFIG` under torchrun (any number of processes, including 1) or the
SLURM launcher. Each rank trains the branch its group owns (with one process, every branch,
one after the other); a branch's loss, head, sampler and mixup are its settings. Gradients
are averaged only inside the branch's group. A rerun with the same output directory resumes
each branch from its latest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ffn_dist.checkpoint import (
    CheckpointError,
    ConfigMismatch,
    checkpoint_path,
    checkpoint_state,
    clear_interrupted,
    interrupted_path,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    save_checkpoint,
)
from ffn_dist.config import Config, describe_branch
from ffn_dist.data.dataset import Dataset, open_dataset
from ffn_dist.data.loader import build_loader
from ffn_dist.data.mixup import mixup
from ffn_dist.distributed import (
    Branch,
    World,
    average_buffers,
    init_world,
    make_branches,
    peak_memory_gb,
    rank0_decides,
)
from ffn_dist.engines import wrap_for_training
from ffn_dist.errors import FFNError
from ffn_dist.files import save_torch, write_json
from ffn_dist.layout import split_batches
from ffn_dist.losses import KPSLoss, build_loss, class_balanced_weights, deferred_epoch, probability_scale
from ffn_dist.metrics import accuracy_report, gather_predictions, prediction_scores, top_k
from ffn_dist.models.backbones import build_backbone, load_pretrained
from ffn_dist.models.heads import HEAD_CLASSES
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.registry import SAMPLERS
from ffn_dist.run.paths import branch_dir, branch_report, final_checkpoint, tensorboard_dir
from ffn_dist.run.stages import StageFailed, begin_stage, finish_stage, recorded, stage_identity
from ffn_dist.rundir import holding
from ffn_dist.stopping import StopRequested, request_stop, stop_on, stop_requested
from ffn_dist.tables import SHOT_COLUMNS


class Network(nn.Module):
    """A trunk and its head; `embed` gives the trunk's pooled embedding alone."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_network(cfg: Config, branch: str, pretrained: bool = False) -> Network:
    """The branch's trunk and head (`branches.NAME.head`). Seeded per branch, so a group's
    replicas start equal; with `pretrained`, the trunk from `model.pretrained` where the config
    names a file (stage 1's start; a trained network is loaded from its checkpoint, which needs
    no such file)."""
    names = list(cfg.branches)
    torch.manual_seed(cfg.seed * len(names) + names.index(branch))
    backbone = build_backbone(cfg.model.arch)
    if pretrained and cfg.model.pretrained:
        load_pretrained(backbone, cfg.model.pretrained, cfg.model.arch)
    head_cls = HEAD_CLASSES[cfg.branches[branch].head]
    return Network(backbone, head_cls(backbone.embedding_dim, cfg.data.num_classes))


def branch_loss(cfg: Config, branch: str, class_counts: np.ndarray) -> nn.Module:
    spec = cfg.branches[branch]
    return build_loss(spec.loss, class_counts, cfg.stage1, spec.head)


def branch_probability_scale(cfg: Config, branch: str) -> float:
    """The branch's probabilities are softmax(scale * head logits) (losses.probability_scale)."""
    spec = cfg.branches[branch]
    return probability_scale(spec.loss, spec.head, cfg.stage1)


def lr_factor(cfg: Config, epoch_progress: float) -> float:
    """Linear warm-up over `warmup_epochs`, then the step factors from their milestones, or
    (`schedule: cosine`) half a cosine from 1 after the warm-up to 0 at the last epoch."""
    s1 = cfg.stage1
    if epoch_progress < s1.warmup_epochs:
        return (epoch_progress + 1e-8) / s1.warmup_epochs
    if s1.schedule == "cosine":
        done = (epoch_progress - s1.warmup_epochs) / max(s1.epochs - s1.warmup_epochs, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    factor = 1.0
    for milestone, milestone_factor in zip(s1.lr_milestones, s1.lr_factors, strict=True):
        if epoch_progress >= milestone:
            factor = milestone_factor
    return factor


def base_lr(cfg: Config) -> float:
    """The recipe's `stage1.lr`, or with `lr_reference_batch` (the linear scaling rule) that
    lr scaled from its reference batch to `data.batch_size`; the same on any process count."""
    reference = cfg.stage1.lr_reference_batch
    return cfg.stage1.lr * (cfg.data.batch_size / reference if reference else 1.0)


def recipe(cfg: Config) -> dict:
    """What each branch trains with, as the reports state it."""
    s1, batch = cfg.stage1, cfg.data.batch_size
    scaled = f"{s1.lr:g} x {batch} / {s1.lr_reference_batch}" if s1.lr_reference_batch else None
    return {"global_batch": batch, "lr": base_lr(cfg), "linear_scaling": scaled}


def evaluate(model: nn.Module, loader, branch: Branch, world: World, cfg: Config, counts) -> dict:
    """Top-1/top-5/per-class/shot-group accuracy and calibration of the branch's own head."""
    model.eval()
    indices, labels, topk, scores = [], [], [], []
    scale = branch_probability_scale(cfg, branch.name)
    with torch.no_grad(), autocast(world.device, cfg.model.precision):
        for batch in loader:
            logits = model(place_images(batch.images, world.device)).float()
            batch_labels = batch.labels.to(world.device)
            indices.append(batch.indices.to(world.device))
            labels.append(batch_labels)
            topk.append(top_k(logits))
            scores.append(prediction_scores(scale * logits, batch_labels))
    model.train()
    gathered_labels, gathered_topk, gathered_scores = gather_predictions(
        torch.cat(indices), torch.cat(labels), torch.cat(topk), torch.cat(scores), branch.group, branch.size
    )
    return accuracy_report(gathered_labels, gathered_topk, counts, gathered_scores)


class _Console:
    """Progress lines on the group's first rank: loss, lr, images/s, ETA."""

    def __init__(self, branch: Branch, total_steps: int, done_steps: int):
        self.branch, self.total = branch, total_steps
        self.done = self.start_done = done_steps  # a resumed run's ETA counts from its start
        self.start = time.perf_counter()

    def advance(self) -> None:
        self.done += 1

    def report(self, epoch: int, epochs: int, step: int, steps: int, loss: float, lr: float, rate: float):
        if not self.branch.is_first:
            return
        elapsed = time.perf_counter() - self.start
        per_step = elapsed / max(self.done - self.start_done, 1)
        eta = datetime.timedelta(seconds=round(per_step * (self.total - self.done)))
        print(
            f"[{self.branch.name}] epoch {epoch + 1}/{epochs} step {step + 1}/{steps} "
            f"loss {loss:.4f} lr {lr:.4g} {rate:,.0f} img/s eta {eta}",
            flush=True,
        )


class BranchTrainer:
    def __init__(
        self, cfg: Config, world: World, branch: Branch, dataset: Dataset, max_steps: int | None = None
    ):
        self.cfg, self.world, self.branch = cfg, world, branch
        self.max_steps = max_steps  # stop (checkpointed) after this many steps of this run
        split = self.split = split_batches(cfg, world.size)[branch.name]
        self.counts = dataset.train.class_counts()
        self.dir = branch_dir(cfg, branch.name)
        self.hash = stage_identity(cfg, "stage1")
        net = place_model(build_network(cfg, branch.name, pretrained=True), world.device)
        # labels come from the training split, validated when it was read
        self.spec = cfg.branches[branch.name]
        self.loss = branch_loss(cfg, branch.name, self.counts).trusting_labels().to(world.device)
        self.lr = base_lr(cfg)
        optimizer = torch.optim.SGD(
            net.parameters(), lr=self.lr, momentum=cfg.stage1.momentum, weight_decay=cfg.stage1.weight_decay
        )
        self.engine = wrap_for_training(cfg, net, optimizer, branch, world, split)
        loader_args = dict(
            rank=branch.rank,
            size=branch.size,
            seed=cfg.seed,
            group=branch.group,
            device=world.device,
            run_dir=cfg.output_dir,
        )
        share = dataclasses.replace(cfg.data, batch_size=split.per_process)
        order = SAMPLERS[self.spec.sampler].order
        self.train_loader = build_loader(
            share, dataset.train, train=True, whole_steps=True, order=order, **loader_args
        )
        self.test_loader = build_loader(share, dataset.test, train=False, **loader_args)
        self.writer = None
        if branch.is_first:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir(cfg, branch.name)))

    # ------------------------------------------------------------------ checkpoints
    def _path(self, epoch: int, step: int) -> Path:
        """The checkpoint at (epoch, step)."""
        return checkpoint_path(self.dir, epoch) if step == 0 else interrupted_path(self.dir)

    def _newest_position(self) -> tuple[tuple[int, int], dict | None]:
        """First rank: the newest loadable (epoch, step) and its state; an interrupted
        checkpoint counts when it is ahead of the newest epoch checkpoint."""
        latest = load_latest(self.dir, self.hash)
        position, state = ((latest[0], 0), latest[1]) if latest else ((0, 0), None)
        if interrupted_path(self.dir).is_file():
            try:
                mid = load_checkpoint(interrupted_path(self.dir), self.hash)
            except ConfigMismatch:
                raise
            except CheckpointError as exc:
                print(f"warning: skipping {exc}")
            else:
                if (mid["epoch"], mid["step"]) > position:
                    position, state = (mid["epoch"], mid["step"]), mid
        return position, state

    def _resume(self) -> tuple[int, int]:
        """Load the newest checkpoint the group's first rank can load: (epoch, step) to start at.
        A step is the recipe's global batch on any process count, so the position holds."""
        position, state = self._newest_position() if self.branch.is_first else ((0, 0), None)
        chosen = [position]
        dist.broadcast_object_list(chosen, src=self.branch.ranks[0], group=self.branch.group)
        epoch, step = chosen[0]
        if (epoch, step) == (0, 0):
            return 0, 0
        main = self._path(epoch, step)
        state = state if state is not None else load_checkpoint(main, self.hash)
        self.engine.load_state(state)
        torch.set_rng_state(state["rng"]["torch"])
        if self.branch.is_first:
            where = f"epoch {epoch + 1}, step {step + 1}" if step else f"epoch {epoch + 1}"
            print(f"[{self.branch.name}] resuming from {main} at {where}", flush=True)
        return epoch, step

    def _checkpoint(self, epoch: int, step: int = 0) -> None:
        """A checkpoint after `epoch` epochs (step 0), or `step` steps into the next one;
        never of weights that are not finite (one read per checkpoint, not per step)."""
        weights = [p.detach() for p in self.engine.module.parameters()]
        if not bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()):
            self._diverged("the weights are not finite", epoch if step == 0 else epoch + 1, step)
        trained = self.engine.state()
        state = checkpoint_state(
            trained["model"],
            self.hash,
            optimizer=trained["optimizer"],
            epoch=epoch,
            step=step,
            branch=self.branch.name,
            rng={"torch": torch.get_rng_state()},
        )
        if self.branch.is_first:
            if step == 0:
                save_checkpoint(self.dir, epoch, state, self.cfg.stage1.keep_checkpoints)
                clear_interrupted(self.dir)
            else:
                save_torch(self._path(epoch, step), state)

    def _agreed(self, diverged: bool, images: int) -> tuple[bool, bool, int]:
        """(stop requested, loss not finite), true on every rank of the group once on any, and
        the images of the step over the group (its global batch, as trained)."""
        flags = torch.tensor([float(stop_requested()), float(diverged), images], device=self.world.device)
        dist.all_reduce(flags, group=self.branch.group)
        stop, diverged, images = flags.tolist()
        return stop > 0, diverged > 0, round(images)

    def _diverged(self, what: str, epoch: int, step: int):
        """Stop the job: nothing after a non-finite loss is worth keeping. The newest
        checkpoint (every one written was checked finite) stays the one a rerun resumes from."""
        found = list_checkpoints(self.dir)
        if interrupted_path(self.dir).is_file():
            last = f"{interrupted_path(self.dir)}, which a rerun resumes from"
        elif found:
            last = f"{found[-1][1]}, which a rerun resumes from"
        else:
            last = "none yet: a rerun starts from scratch"
        raise StageFailed(
            f"[{self.branch.name}] {what} at epoch {epoch}, step {step}: training diverged "
            f"(stage1.lr {self.cfg.stage1.lr:g}; try a lower one in another output_dir). "
            f"Last checkpoint with finite weights: {last}"
        )

    # ------------------------------------------------------------------ training
    def train_step(
        self, images: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, lr: float
    ) -> torch.Tensor:
        """One optimisation step of the branch: mixup over the process's share of the batch,
        then forward and backward of each of its equal micro-batches, then the update. Returns
        the share's mean loss."""
        self.engine.set_lr(lr)
        images = place_images(images, self.world.device)
        labels = labels.to(self.world.device, non_blocking=True)  # a blocking copy waits for the GPU
        alpha = self.cfg.stage1.mixup_alpha if self.spec.mixup else 0.0
        images, y_a, y_b, lam = mixup(images, labels, alpha, rng)
        micro = self.split.accumulation
        losses = []
        pieces = (t.tensor_split(micro) for t in (images, y_a, y_b))
        for i, (x, a, b) in enumerate(zip(*pieces, strict=True)):
            last = i == micro - 1
            with self.engine.micro_batch(last):
                with autocast(self.world.device, self.cfg.model.precision):
                    logits = self.engine.forward(x)
                loss = self.loss(logits, (a, b, lam))
                self.engine.backward(loss, last)
            losses.append(loss.detach())
        return torch.stack(losses).mean()

    def run(self) -> dict | None:
        s1, name = self.cfg.stage1, self.branch.name
        start, start_step = self._resume()
        steps = len(self.train_loader)
        console = _Console(self.branch, s1.epochs * steps, start * steps + start_step)
        if self.branch.is_first:
            print(
                f"[{name}] {describe_branch(self.spec)}; {self.split} on {self.branch.size} process(es), "
                f"lr {self.lr:g}",
                flush=True,
            )
        report = None
        for epoch in range(start, s1.epochs):
            self._epoch_rules(epoch)
            first = start_step if epoch == start else 0
            self.train_loader.set_epoch(epoch, first)
            resumed = [first] if first else []  # a mid-epoch resume draws a fresh mixup stream
            rng = np.random.default_rng(
                [self.cfg.seed, list(self.cfg.branches).index(name), epoch, self.branch.rank, *resumed]
            )
            tick = time.perf_counter()
            for step, batch in enumerate(self.train_loader, start=first):
                lr = self.lr * lr_factor(self.cfg, epoch + step / steps)
                loss = self.train_step(batch.images, batch.labels, rng, lr)
                console.advance()
                at_limit = self.max_steps is not None and console.done - console.start_done >= self.max_steps
                if at_limit:
                    request_stop()  # every rank of the group is at the same step: the stop path below
                if (step + 1) % s1.log_every == 0 or step + 1 == steps or at_limit:
                    value = loss.item()  # the logging step's read: the checks below ride on it
                    stop, diverged, global_batch = self._agreed(not math.isfinite(value), len(batch.labels))
                    rate = global_batch * (step + 1 - first) / (time.perf_counter() - tick)
                    console.report(epoch, s1.epochs, step, steps, value, lr, rate)
                    scalars = {"loss": value, "lr": lr, "images_per_s": rate, "global_batch": global_batch}
                    scalars["peak_memory_gb"] = peak_memory_gb(self.world.device)
                    self._scalars(scalars, epoch * steps + step + 1)
                    if diverged:
                        self._diverged(f"the loss is {value:g}", epoch + 1, step + 1)
                    if stop:
                        self._checkpoint(epoch, step + 1)
                        if self.branch.is_first:
                            print(
                                f"[{name}] stop requested: checkpointed at epoch {epoch + 1}, step {step + 1}"
                            )
                        if self.writer:
                            self.writer.close()  # its buffered steps are part of the run's log
                        raise StopRequested(name)
            average_buffers(self.engine.module, self.branch)
            last = epoch + 1 == s1.epochs
            if (epoch + 1) % s1.eval_every == 0 or last:
                report = evaluate(
                    self.engine.module, self.test_loader, self.branch, self.world, self.cfg, self.counts
                )
                self._log_eval(epoch + 1, report)
            if (epoch + 1) % s1.checkpoint_every == 0 or last:
                self._checkpoint(epoch + 1)
        if report is None:  # already complete: evaluate the final weights for the report
            report = evaluate(
                self.engine.module, self.test_loader, self.branch, self.world, self.cfg, self.counts
            )
        self._write_report(report)
        if self.writer:
            self.writer.close()
        return report

    def _epoch_rules(self, epoch: int) -> None:
        """What a loss changes at an epoch: KPS's per-class scales from `stage1.kps_ga_epoch`,
        a `drw` branch's class-balanced weights from `stage1.drw_from` of the epochs."""
        s1 = self.cfg.stage1
        if isinstance(self.loss, KPSLoss):
            self.loss.per_class_scale = epoch >= s1.kps_ga_epoch
        if self.spec.drw:
            deferred = epoch >= deferred_epoch(s1.drw_from, s1.epochs)
            self.loss.weight = class_balanced_weights(self.counts).to(self.world.device) if deferred else None

    def _scalars(self, values: dict, step: int) -> None:
        if self.writer:
            for key, value in values.items():
                if value is not None:
                    self.writer.add_scalar(f"{self.branch.name}/{key}", value, step)

    def _log_eval(self, epoch: int, report: dict) -> None:
        groups = {k: report[k] for k in SHOT_COLUMNS}
        self._scalars({f"test/{k}": v for k, v in groups.items()}, epoch)
        if self.branch.is_first:
            shown = " ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in groups.items())
            print(f"[{self.branch.name}] epoch {epoch} test: {shown}", flush=True)

    def _write_report(self, report: dict) -> None:
        if not self.branch.is_first:
            return
        body = {
            "branch": self.branch.name,
            "settings": dataclasses.asdict(self.spec),
            "epochs": self.cfg.stage1.epochs,
            "recipe": recipe(self.cfg),
            "train_counts": self.counts.tolist(),
            "test": report,
        }
        write_json(branch_report(self.cfg, self.branch.name), body)


def _begin(cfg: Config) -> Config:
    begin_stage(cfg, "stage1")
    return cfg


def _finish(cfg: Config) -> None:
    """Stage 1 is complete once every branch has its final checkpoint and report."""
    outputs = [p for b in cfg.branches for p in (final_checkpoint(cfg, b), branch_report(cfg, b))]
    if all(p.is_file() for p in outputs):
        finish_stage(cfg, "stage1", outputs)


def train_backbones(cfg: Config, only: str | None = None, max_steps: int | None = None) -> dict[str, dict]:
    """Every branch, or `only` one of them. SIGUSR2 (SLURM's pre-emption warning) or
    SIGTERM makes every group checkpoint mid-epoch and raise StopRequested; the next run
    resumes there. `max_steps`: the same stop after that many steps of a branch (a smoke
    test, and `ffn plan`'s probe); with one process, the first branch's."""
    if only is not None and only not in cfg.branches:
        raise FFNError(f"--branch {only}: not a branch of this config (branches: {', '.join(cfg.branches)})")
    world = init_world(cfg.dist.timeout_s)
    previous = {signum: stop_on(signum) for signum in (signal.SIGUSR2, signal.SIGTERM)}
    reports = {}
    try:
        with holding(cfg.output_dir, world):
            # The splits are read (built-in data written) before the record is begun, so that
            # it holds their contents as this stage reads them; a config the run's checkpoints
            # do not come from is refused before its record (or history) is touched.
            dataset = open_dataset(cfg.data)
            cfg = rank0_decides(world, lambda: _begin(cfg))  # every rank trains from rank 0's
            with recorded(cfg, "stage1", world):
                try:
                    for branch in make_branches(world, cfg):
                        if only in (None, branch.name):
                            trainer = BranchTrainer(cfg, world, branch, dataset, max_steps)
                            try:
                                reports[branch.name] = trainer.run()
                            finally:
                                trainer.engine.close()
                    dist.barrier()
                except StopRequested:
                    # Matches the other ranks' barrier (stopped or finished): when it returns
                    # every rank has checkpointed, so the caller may requeue the job.
                    dist.barrier()
                    raise
                rank0_decides(world, lambda: _finish(cfg))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        dist.destroy_process_group()
    return reports
