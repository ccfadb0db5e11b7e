"""Data-parallel engines for one branch's process group: DDP or DeepSpeed, one interface.

Both average gradients only inside the branch's group. The trainer sees forward,
backward (one micro-batch's loss; the optimizer steps after the last of a step's
`accumulation` micro-batches), set_lr, state / load_state and the unwrapped `module`. A
state is the same on any number of ranks and under either engine: the module's weights and
a torch SGD optimizer state of whole tensors, so a run resumes on another process count.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ffn_dist.distributed import Branch, World
from ffn_dist.layout import BatchSplit


class Engine:
    """What both engines share: the unwrapped `module`, its optimizer, lr and state."""

    module: nn.Module
    optimizer: torch.optim.Optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        """Release what outlives the engine's last reference (nothing, for DDP)."""


def no_buffer_sync(ddp_class) -> dict:
    """The DDP argument that stops rank 0's buffers overwriting the others' at every forward:
    `forward_sync_buffers=False` where it exists (torch 2.14, which deprecates the other),
    else `broadcast_buffers=False` (every version). Chosen by the signature, not the version."""
    if "forward_sync_buffers" in inspect.signature(ddp_class.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


class DDPEngine(Engine):
    def __init__(self, model: nn.Module, optimizer, branch: Branch, world: World, accumulation: int):
        self.module, self.optimizer, self.accumulation = model, optimizer, accumulation
        self.model = model
        if branch.size > 1:  # a group of one would only copy gradients into buckets and back
            device_ids = [world.device.index] if world.device.type == "cuda" else None
            # BatchNorm statistics stay per replica during an epoch and are averaged at its end
            # (distributed.average_buffers), as under DeepSpeed.
            self.model = DistributedDataParallel(
                model,
                process_group=branch.group,
                device_ids=device_ids,
                **no_buffer_sync(DistributedDataParallel),
            )

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are all-reduced
        after the step's last one only."""
        return nullcontext() if last or self.model is self.module else self.model.no_sync()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        (loss / self.accumulation).backward()
        if last:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def wrap_for_training(cfg, model, optimizer, branch: Branch, world: World, split: BatchSplit):
    """The configured engine for a branch whose steps are `split` (its micro-batches)."""
    if cfg.dist.engine == "deepspeed":
        from ffn_dist.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, model, optimizer, branch, world, split)
    return DDPEngine(model, optimizer, branch, world, split.accumulation)
