"""World and branch process groups, backend choice, and wrapping a model for its group.

FFN's stage 1 trains two backbones (CE and KPS) at once: the world is split into two
process groups, one per branch, each data-parallel on its own. With one process both
branches train in it, one after the other.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ffn_dist.errors import FFNError

BRANCHES = ("ce", "kps")


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


def init_world() -> World:
    """Join the job torchrun (or SLURM via the launcher) started, or form a world of one."""
    if "RANK" not in os.environ:  # a plain `ffn ...` without torchrun
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(
            backend,
            store=_attempt_store(rank, size),
            rank=rank,
            world_size=size,
            device_id=device if device.type == "cuda" else None,
        )
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


def branch_ranks(world_size: int, kps_ranks: int | None) -> dict[str, tuple[int, ...]]:
    """KPS gets the last `kps_ranks` ranks (default half), CE the rest; one process: both."""
    if world_size == 1:
        return {"ce": (0,), "kps": (0,)}
    kps = world_size // 2 if kps_ranks is None else kps_ranks
    if not 1 <= kps <= world_size - 1:
        raise FFNError(
            f"dist.kps_ranks: got {kps_ranks} with {world_size} processes; each branch needs "
            f"at least one rank, so expected 1..{world_size - 1}"
        )
    return {"ce": tuple(range(world_size - kps)), "kps": tuple(range(world_size - kps, world_size))}


def make_branches(world: World, kps_ranks: int | None) -> list[Branch]:
    """The branches this rank trains. Every rank creates every group, in the same order."""
    layout = branch_ranks(world.size, kps_ranks)
    groups = {name: dist.new_group(list(layout[name])) for name in BRANCHES}
    return [
        Branch(name, layout[name], groups[name], layout[name].index(world.rank))
        for name in BRANCHES
        if world.rank in layout[name]
    ]


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
