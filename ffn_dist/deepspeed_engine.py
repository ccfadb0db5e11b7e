"""The DeepSpeed engine for one branch's group (`dist.engine: deepspeed`).

`deepspeed.initialize` takes no process group; it takes an `mpu` whose data-parallel group
is the branch's group and whose model-parallel group is the rank alone (None would make
the gradient-norm all-reduce span the world). Weights and optimizer state stay fp32; on
CUDA the forward runs under the same bf16 autocast as the DDP engine. Checkpoints are the
trainer's own (full state dicts), so ZeRO is limited to stages that keep a full optimizer
state on each rank: ZeRO stage 0 (stages 1-2, which partition it, are refused for now).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ffn_dist.distributed import Branch, World
from ffn_dist.errors import FFNError


class _BranchMPU:
    """What DeepSpeed asks of a model-parallel unit, for a data-parallel-only branch."""

    def __init__(self, branch: Branch, own_group):
        self.branch, self.own = branch, own_group

    def get_data_parallel_group(self):
        return self.branch.group

    def get_data_parallel_world_size(self):
        return self.branch.size

    def get_data_parallel_rank(self):
        return self.branch.rank

    def get_data_parallel_group_ranks(self):
        return list(self.branch.ranks)

    def get_model_parallel_group(self):
        return self.own

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


def _own_groups(world: World) -> list:
    """One single-rank group per rank, created by every rank in the same order."""
    return [dist.new_group([r]) for r in range(world.size)] if world.size > 1 else []


class DeepSpeedEngine:
    def __init__(self, cfg, model, optimizer, branch: Branch, world: World):
        import deepspeed

        if cfg.dist.zero_stage > 0:
            raise FFNError(
                f"dist.zero_stage: got {cfg.dist.zero_stage}; this release checkpoints full "
                "optimizer states, so the deepspeed engine runs ZeRO stage 0 (expected 0)"
            )
        # Only used for inference all-reduce, and a 2-minute C++ build on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = {
            "train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; plain SGD has none
            "zero_optimization": {"stage": cfg.dist.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        groups = _own_groups(world)
        mpu = _BranchMPU(branch, groups[world.rank] if groups else branch.group)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, mpu=mpu, dist_init_required=False
        )
        self.module = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state(self) -> dict:
        return {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
