"""No training step reads a value back to the host, except at logging steps.

On a GPU every such read (`.item()`, `int(t)`, `bool(t)`, `nonzero`) waits for the queued
kernels, so one read a step keeps the GPU idle while Python prepares the next step. On the
CPU there is nothing to wait for, so the reads are caught as they are dispatched instead.
"""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import make_branches
from ffn_dist.losses import CELoss, LDAMLoss
from ffn_dist.models.heads import CosineHead
from ffn_dist.stages.backbones import BranchTrainer
from ffn_dist.stages.epochs import CosineStep, OptimizerStep
from tests.conftest import CONFIG, tiny_overrides

aten = torch.ops.aten
READS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero, aten.equal, aten.masked_select}


class HostReads(TorchDispatchMode):
    """Records every operator that hands a tensor's values to the host."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_the_label_check_that_stalled_every_gpu_step():
    logits, labels = torch.randn(8, 10), torch.randint(10, (8,))
    with HostReads() as reads:
        CELoss(10)(logits, labels)  # checks labels: int(labels.min()), int(labels.max())
    assert "aten._local_scalar_dense.default" in reads.seen
    with HostReads() as reads:
        CELoss(10).trusting_labels()(logits, labels)
    assert reads.seen == []


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_a_stage1_step_reads_nothing_back(world, tiny_root, tmp_path, engine):
    args = tiny_overrides(tiny_root, tmp_path / "run", "data.backend=torch", f"dist.engine={engine}")
    cfg = load_config(CONFIG, args)
    dataset = open_dataset(cfg.data)
    rng = np.random.default_rng(0)
    for branch in make_branches(world, cfg):
        trainer = BranchTrainer(cfg, world, branch, dataset)
        if branch.name == "kps":
            trainer.loss.per_class_scale = True  # the GA schedule's per-sample scales too
        batch = next(iter(trainer.train_loader))
        trainer.train_step(batch.images, batch.labels, rng, 0.01)  # first step: lazy set-up
        with HostReads() as reads:
            for _ in range(3):
                loss = trainer.train_step(batch.images, batch.labels, rng, 0.01)
        assert reads.seen == [], f"{branch.name}: a step reads {reads.seen} back to the host"
        assert torch.isfinite(loss)  # (the logging step may read it)


def test_a_stage2_step_reads_nothing_back():
    """Both steps of the cache loop: FFN's written out, and torch's SGD on autograd."""
    counts, dims = [50, 20, 8, 3], 16
    loss = LDAMLoss(counts).trusting_labels()
    features, labels = torch.randn(6, dims), torch.randint(len(counts), (6,))
    head = CosineHead(dims, len(counts))
    steps = [
        CosineStep(CosineHead(dims, len(counts)), loss, momentum=0.9, weight_decay=2e-4),
        OptimizerStep(list(head.parameters()), lambda z, y: loss(head(z, normalized=True), y), 0.9, 2e-4),
    ]
    for step in steps:
        with HostReads() as reads:
            for _ in range(3):
                step(features, labels, 0.1)
        assert reads.seen == [], type(step).__name__


def test_a_memory_backend_batch_reads_nothing_back(demo_root):
    from ffn_dist.data.loader import build_loader
    from ffn_dist.data.splits import read_split

    cfg = load_config(None, [f"data.root={demo_root}", "data.backend=memory", "data.color_jitter=0.4"])
    loader = build_loader(cfg.data, read_split(demo_root / "train.txt", demo_root, 10), train=True)
    batches = iter(loader)
    next(batches)
    with HostReads() as reads:
        next(batches)
    assert reads.seen == []
