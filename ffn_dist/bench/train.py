"""`ffn bench train`: the stage-1 step against a bare PyTorch loop, and end to end with the loader.

In one process (a world of one, the engine still wrapping the model for its group):
- bare: the same network and batch, `F.cross_entropy`, backward, `SGD.step`, nothing else;
- stage-1 step: `BranchTrainer.train_step` on the same batch (mixup, KPS loss, engine);
- end to end: `train_step` fed by the configured loader (DALI by default);
- loader alone: the same loader drained without training.
Rounds are interleaved and the medians reported, with the ratios the issue sets goals on.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from ffn_dist.bench.timing import endless_batches, interleaved_medians, markdown_table
from ffn_dist.config import Config
from ffn_dist.data.dataset import open_dataset
from ffn_dist.distributed import init_world, make_branches
from ffn_dist.models.precision import autocast, place_images
from ffn_dist.stages.backbones import BranchTrainer, build_network


def _timed(step, batch_size: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch_size * steps / (time.perf_counter() - start)


def bench_train(cfg: Config, steps: int, rounds: int) -> dict:
    world = init_world()
    dataset = open_dataset(cfg.data)
    branch = next(b for b in make_branches(world, None) if b.name == "kps")
    trainer = BranchTrainer(cfg, world, branch, dataset)
    size, batch = cfg.data.batch_size, cfg.data.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, batch, batch, generator=gen)
    labels = torch.randint(cfg.data.num_classes, (size,), generator=gen)
    rng = np.random.default_rng(0)

    bare_net = build_network(cfg, "kps").to(world.device)
    bare_opt = torch.optim.SGD(
        bare_net.parameters(), lr=0.01, momentum=0.9, weight_decay=cfg.stage1.weight_decay
    )
    bare_images, bare_labels = place_images(images, world.device), labels.to(world.device)

    def bare_step():
        with autocast(world.device, cfg.model.precision):
            loss = F.cross_entropy(bare_net(bare_images), bare_labels)
        bare_opt.zero_grad(set_to_none=True)
        loss.backward()
        bare_opt.step()

    def stage1_step():
        trainer.train_step(images, labels, rng, 0.01)

    fed = endless_batches(trainer.train_loader)

    def end_to_end_step():
        batch = next(fed)
        trainer.train_step(batch.images, batch.labels, rng, 0.01)

    drained = endless_batches(trainer.train_loader)

    def loader_step():
        next(drained)

    runners = {
        "bare PyTorch loop": lambda: _timed(bare_step, size, steps),
        "stage-1 step (mixup, KPS, engine)": lambda: _timed(stage1_step, size, steps),
        f"end to end ({cfg.data.backend} loader)": lambda: _timed(end_to_end_step, size, steps),
        f"{cfg.data.backend} loader alone": lambda: _timed(loader_step, size, steps * 4),
    }
    medians = interleaved_medians(runners, rounds)
    bare = medians["bare PyTorch loop"]
    names = list(runners)
    print(
        f"{cfg.model.arch}, batch {size}, {cfg.data.image_size}px, {world.device}, {cfg.dist.engine}, "
        f"{torch.get_num_threads()} threads, median of {rounds} interleaved rounds of {steps} steps"
    )
    print(
        markdown_table(
            ["loop", "img/s", "vs bare"],
            [[n, f"{medians[n]:,.1f}", f"{medians[n] / bare:.3f}"] for n in names],
        )
    )
    torch.distributed.destroy_process_group()
    return {
        "arch": cfg.model.arch,
        "batch_size": size,
        "device": str(world.device),
        "engine": cfg.dist.engine,
        "images_per_s": medians,
        "stage1_vs_bare": medians[names[1]] / bare,
        "end_to_end_vs_bare": medians[names[2]] / bare,
        "loader_vs_end_to_end": medians[names[3]] / medians[names[2]],
    }
