"""The DeepSpeed engine for one branch's group (`dist.engine: deepspeed`).

`deepspeed.initialize` takes no process group; it takes an `mpu` whose data-parallel group
is the branch's group and whose model-parallel group is the rank alone (None would make
the gradient-norm all-reduce span the world). Weights and optimizer state stay fp32; on
CUDA the forward runs under the same bf16 autocast as the DDP engine. ZeRO stages 1-2
partition the optimizer state over the group; a checkpoint gathers it into whole tensors
(DeepSpeed's tensor-fragment API, a collective of the group) in torch SGD's format, so that
it is the same on any number of ranks, and loading cuts it into this group's partitions.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ffn_dist.distributed import Branch, World
from ffn_dist.engines import Engine
from ffn_dist.layout import BatchSplit


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
    return (
        [dist.new_group([r], backend=backend, timeout=world.timeout) for r in range(world.size)]
        if world.size > 1
        else []
    )


class DeepSpeedEngine(Engine):
    def __init__(self, cfg, model, optimizer, branch: Branch, world: World, split: BatchSplit):
        import deepspeed

        # Only used for inference all-reduce, and a 2-minute C++ build on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        config = {
            "train_micro_batch_size_per_gpu": split.micro_batch,
            "gradient_accumulation_steps": split.accumulation,
            "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; plain SGD has none
            "zero_optimization": {"stage": cfg.dist.zero_stage},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        # torch SGD's hyperparameters, before ZeRO replaces its parameters by flat partitions
        self.param_groups = optimizer.state_dict()["param_groups"]
        groups = _own_groups(world)
        mpu = _BranchMPU(branch, groups[world.rank] if groups else branch.group)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, mpu=mpu, dist_init_required=False
        )
        self.module = model
        self.partitioned = cfg.dist.zero_stage > 0
        self.momentum = cfg.stage1.momentum > 0  # SGD keeps a momentum buffer only then

    def close(self) -> None:
        """Remove ZeRO's gradient hooks and DeepSpeed's global mpu. They hold the engine and the
        branch's process groups (the hooks from autograd's C++ side, which the garbage
        collector cannot see), so without this they live until interpreter teardown, where
        destroying their gloo threads in arbitrary order can abort a process whose work is
        done (SIGABRT, "terminate called")."""
        from deepspeed.utils import groups

        self.engine.destroy()
        # deepspeed.initialize keeps the mpu, and through it the branch's groups, in a global.
        groups.mpu = None
        gc.collect()

    def micro_batch(self, last: bool):
        return nullcontext()  # DeepSpeed reduces at its accumulation boundary itself

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.engine(images)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
        self.engine.step()  # an optimizer step at the accumulation boundary only

    def _has_momentum(self) -> bool:
        """Whether ZeRO's base optimizer holds momentum yet: torch SGD creates it at its first step."""
        return self.momentum and any(
            "momentum_buffer" in state for state in self.optimizer.optimizer.state.values()
        )

    def state(self) -> dict:
        if not self.partitioned:
            return super().state()
        from deepspeed.utils import safe_get_full_optimizer_state

        whole = {}
        if self._has_momentum():
            for index, param in enumerate(self.module.parameters()):
                whole[index] = {"momentum_buffer": safe_get_full_optimizer_state(param, "momentum_buffer")}
        optimizer = {"state": whole, "param_groups": self.param_groups}
        return {"model": self.module.state_dict(), "optimizer": optimizer}

    def _create_momentum(self) -> None:
        """Give ZeRO's base optimizer the (zero) momentum buffers its first step would create,
        linked to the parameters' fragments as that step links them, so they can be set."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        zero = self.optimizer
        for params, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups, strict=True):
            zero.optimizer.state[flat]["momentum_buffer"] = torch.zeros_like(flat)
            lazy_init_hp_params_optimizer_state(params, flat, zero.optimizer.state)
        zero._hp_optimizer_states_linked = True

    def load_state(self, state: dict) -> None:
        if not self.partitioned:
            return super().load_state(state)
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        self.module.load_state_dict(state["model"])
        saved = state["optimizer"]["state"]
        if saved and not self._has_momentum():
            self._create_momentum()
        for index, param in enumerate(self.module.parameters()):
            safe_set_full_fp32_param(param, param.detach().float())  # ZeRO's fp32 partition
            if index in saved:
                momentum = saved[index]["momentum_buffer"].to(param.device)
                safe_set_full_optimizer_state(param, momentum, "momentum_buffer")
