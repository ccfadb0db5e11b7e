"""Every tensor of a step goes where the model is: checked on the `meta` device.

A step run with its model on `meta` fails at the first operation that mixes in a tensor left
on the CPU, which is what a CUDA run does with one left behind (`ffn bench stage2` once kept
its backbones on the CPU while the batch went to the GPU). No values are computed.
"""

import dataclasses

import numpy as np
import pytest
import torch

from ffn_dist.bench import stage2
from ffn_dist.config import load_config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import make_branches
from ffn_dist.stages.backbones import BranchTrainer
from tests.conftest import CONFIG, tiny_overrides

META = torch.device("meta")


@pytest.mark.parametrize("backend", ["torch", "memory"])
def test_a_stage1_step_keeps_every_tensor_on_the_models_device(world, tiny_root, tmp_path, backend):
    cfg = load_config(CONFIG, tiny_overrides(tiny_root, tmp_path / "run", f"data.backend={backend}"))
    dataset = open_dataset(cfg.data)
    on_meta = dataclasses.replace(world, device=META)
    for branch in make_branches(world, cfg):
        trainer = BranchTrainer(cfg, on_meta, branch, dataset)
        batch = next(iter(trainer.train_loader))  # as the loader delivers it: on the device
        assert batch.images.device == batch.labels.device == META
        loss = trainer.train_step(batch.images, batch.labels, np.random.default_rng(0), 0.01)
        assert loss.device == META
        assert all(p.device == META for p in trainer.engine.module.parameters())


def test_bench_stage2_runs_the_authors_way_on_the_classifiers_device(tiny_root, monkeypatch):
    monkeypatch.setattr(stage2, "default_device", lambda: META)
    cfg = load_config(CONFIG, [f"data.root={tiny_root}", "data.builtin=null", "data.backend=torch"])
    run, images = stage2._backbone_epoch_runner(cfg, timed_steps=1)  # its first step runs here
    assert images == 75 and run() > 0
