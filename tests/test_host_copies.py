"""No training step copies from the host synchronously, and the loops copy once a chunk or
an epoch, not once a step: checked on the `meta` device, where a copy from the CPU is
dispatched as it would be to a GPU (on the CPU a copy to the CPU is no copy at all).

A blocking copy to a GPU waits for the kernels queued before it; a "non-blocking" one from
pageable memory is staged synchronously by the driver, so what a GPU loop copies per step
is what it waits on per step.
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import to_device
from ffn_dist.distributed import make_branches
from ffn_dist.stages.backbones import BranchTrainer
from ffn_dist.stages.epochs import CachedEpochs
from tests.conftest import CONFIG, tiny_overrides
from tests.test_methods import write_cache

META = torch.device("meta")
aten = torch.ops.aten


class HostCopies(TorchDispatchMode):
    """Records every copy from the CPU to another device, and whether it was non-blocking."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is aten._to_copy and args[0].device.type == "cpu":
            target = kwargs.get("device")
            if target is not None and torch.device(target).type != "cpu":
                self.seen.append(bool(kwargs.get("non_blocking", False)))
        return func(*args, **kwargs)


@pytest.fixture
def branches_on_meta(world, tiny_root, tmp_path):
    def make(backend):
        cfg = load_config(CONFIG, tiny_overrides(tiny_root, tmp_path / backend, f"data.backend={backend}"))
        dataset, on_meta = open_dataset(cfg.data), dataclasses.replace(world, device=META)
        return [BranchTrainer(cfg, on_meta, branch, dataset) for branch in make_branches(world, cfg)]

    return make


def test_a_stage1_step_copies_only_non_blocking(branches_on_meta):
    """Images, labels and mixup's permutation: the labels' copy once blocked every step."""
    for trainer in branches_on_meta("torch"):
        images, labels = torch.randn(6, 3, 28, 28), torch.randint(10, (6,))  # as a host loader hands them
        with HostCopies() as copies:
            trainer.train_step(images, labels, np.random.default_rng(0), 0.01)
        assert copies.seen == [True, True, True], f"{trainer.branch.name}: {copies.seen}"


def test_the_memory_backend_copies_once_an_epoch(branches_on_meta):
    """The epoch's order goes to the device once; a batch's positions are a slice of it."""
    loader = branches_on_meta("memory")[0].train_loader
    with HostCopies() as copies:
        batches = sum(1 for _ in loader)
    assert batches > 1 and copies.seen == [True]


def test_the_classifier_loop_copies_once_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("ffn_dist.stages.epochs.GATHER_BATCHES", 8)
    cache = write_cache(tmp_path / "cache")  # 484 training images, two stored branches
    cfg = load_config(None, [f"output_dir={tmp_path}", "data.num_classes=8", "stage2.batch_size=16"])
    epochs = CachedEpochs(cfg, cache.splits["train"], META)
    shapes = []

    def step(features, labels, lr):
        shapes.append((features.device, features.shape[0], labels.shape[0]))
        return features.sum() * 0

    with HostCopies() as copies:
        mean = epochs.epoch(step, 0, "balanced")
    assert mean.device == META and len(shapes) == epochs.steps == 31
    assert all(device == META for device, *_ in shapes)
    chunks = -(-484 // (16 * 8))  # 4 chunks of up to 128 rows
    assert copies.seen == [True] * (3 * chunks)  # kps, ce and the labels, once a chunk


def test_copies_to_a_gpu_are_pinned_first(monkeypatch):
    """to_device's CUDA branch, on the CPU: pin, then copy without blocking."""
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append(("to", a, k)) or self)
    to_device(torch.ones(3), torch.device("cuda"))
    assert calls == ["pin", ("to", (torch.device("cuda"),), {"non_blocking": True})]
    calls.clear()
    to_device(torch.ones(3), torch.device("cpu"))
    assert calls == [("to", (torch.device("cpu"),), {"non_blocking": True})]  # no pinning off CUDA
