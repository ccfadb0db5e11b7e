"""The DeepSpeed engine for one branch's group (`dist.engine: deepspeed`).

`deepspeed.initialize` takes no process group; it takes an `mpu` whose data-parallel group
is the branch's group and whose model-parallel group is the rank alone (None would make
the gradient-norm all-reduce span the world). Weights and optimizer state stay fp32; on
CUDA the forward runs under the same bf16 autocast as the DDP engine. ZeRO stages 1-2
partition the optimizer state over the group: each rank then checkpoints its own shard.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ffn_dist.distributed import Branch, World
from ffn_dist.engines import Engine


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
    """One single-rank group per rank, created by every rank in the same order (a one-rank
    NCCL group is allowed even where processes share a GPU)."""
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    return [dist.new_group([r], backend=backend) for r in range(world.size)] if world.size > 1 else []


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, model, optimizer, branch: Branch, world: World):
        import deepspeed

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
        self.module, self.branch = model, branch
        self.sharded_optimizer = cfg.dist.zero_stage > 0
        if self.sharded_optimizer:
            from deepspeed.runtime.fp16.loss_scaler import LossScaler
            from deepspeed.runtime.zero.config import ZeroStageEnum
            from deepspeed.utils.tensor_fragment import fragment_address

            # Plain-data classes a ZeRO optimizer state holds; nothing else may be unpickled.
            self.safe_classes = (ZeroStageEnum, fragment_address, LossScaler)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def backward_step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def load_state(self, state: dict) -> None:
        if not self.sharded_optimizer:
            return super().load_state(state)
        # A ZeRO optimizer loads from the list of every rank's state and reads its own entry;
        # the model goes first, since it refreshes its fp32 partition from the weights.
        self.module.load_state_dict(state["model"])
        shards = [None] * self.branch.size
        shards[self.branch.rank] = state["optimizer"]
        self.optimizer.load_state_dict(shards)
