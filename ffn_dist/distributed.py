"""World and branch process groups, and averaging a model's buffers over a group.

FFN's stage 1 trains its branches' backbones at once: the world is split into one process
group per branch (`branches` of the config), each data-parallel on its own. With one process
every branch trains in it, one after the other. Which GPU each rank uses and which backend each
group gets is decided in `layout` (NCCL where a group's ranks hold distinct GPUs, gloo
otherwise); the world itself is on gloo, so processes may share GPUs.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ffn_dist.errors import FFNError
from ffn_dist.layout import Placement, branch_shares, gpu_for, plan_groups


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    device: torch.device


@dataclass(frozen=True)
class Branch:
    """One branch's process group, seen from one of its ranks."""

    name: str
    ranks: tuple[int, ...]
    group: object  # the torch.distributed ProcessGroup
    rank: int  # rank inside the group

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak memory so far: allocated on its GPU, else its resident size on the
    host (what a job's memory limit counts)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rank_device(local_rank: int, gpus: int) -> torch.device:
    """This process's device: GPU `local_rank % gpus` (shared when processes outnumber GPUs)."""
    gpu = gpu_for(local_rank, gpus)
    return torch.device("cpu") if gpu is None else torch.device("cuda", gpu)


def init_world() -> World:
    """Join the job torchrun (or SLURM via the launcher) started, or form a world of one."""
    if "RANK" not in os.environ:  # a plain `ffn ...` without torchrun
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = rank_device(local_rank, visible_gpus())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # gloo: world-level collectives are barriers and small objects, and NCCL would refuse
        # a world in which two processes share a GPU.
        dist.init_process_group("gloo", store=_attempt_store(rank, size), rank=rank, world_size=size)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def _attempt_store(rank: int, size: int) -> dist.Store:
    """The rendezvous store, its keys prefixed with torchrun's restart count.

    After `--max-restarts` restarts the workers, the agent's store still holds the
    addresses the killed workers published; without a per-attempt prefix a new worker can
    read a dead peer's address and fail or hang while connecting.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        size,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=datetime.timedelta(minutes=30),
        multi_tenant=True,
    )
    return dist.PrefixStore(f"ffn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def world_placements(world: World) -> list[Placement]:
    """Every rank's (host, GPU), as the ranks report them."""
    everyone = [None] * world.size
    dist.all_gather_object(everyone, Placement(socket.gethostname(), world.device.index))
    return everyone


def make_branches(world: World, cfg) -> list[Branch]:
    """The branches this rank trains. Every rank creates every group, in the same order."""
    plans = plan_groups(world_placements(world), branch_shares(cfg), cfg.dist.engine)
    groups = {name: dist.new_group(list(plan.ranks), backend=plan.backend) for name, plan in plans.items()}
    return [
        Branch(name, plan.ranks, groups[name], plan.ranks.index(world.rank))
        for name, plan in plans.items()
        if world.rank in plan.ranks
    ]


def rank0_decides(world: World, decide):
    """Run `decide()` on rank 0 and give every rank its result, or raise its user-facing
    error (the same exception) on every rank, so that no rank goes on alone or hangs."""
    box = [None]
    if world.rank == 0:
        try:
            box[0] = ("ok", decide())
        except FFNError as exc:
            box[0] = ("error", exc)
    if world.size > 1:
        dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def average_buffers(module: torch.nn.Module, branch: Branch) -> None:
    """Average float buffers (BatchNorm running statistics) over the group.

    Each replica's running statistics follow its own batches during an epoch; averaging
    them makes the replicas identical again before evaluation and checkpoints.
    """
    if branch.size == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=branch.group)
            buffer.div_(branch.size)
