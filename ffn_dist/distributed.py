"""World and branch process groups, and averaging a model's buffers over a group.

FFN's stage 1 trains its branches' backbones at once: the world is split into one process
group per branch (`branches` of the config), each data-parallel on its own. With one process
every branch trains in it, one after the other. Which GPU each rank uses and which backend each
group gets is decided in `layout` (NCCL where a group's ranks hold distinct GPUs, gloo
otherwise); the world itself is on gloo, so processes may share GPUs.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import re
import socket
from contextlib import contextmanager
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
    timeout: datetime.timedelta  # of the store and of every process group (dist.timeout_s)
    threads: int  # torch's intra-op threads in this process
    placements: tuple[Placement, ...] = ()  # every rank's host and GPU, by rank
    addresses: tuple[str, ...] = ()  # every rank's address, as its host resolves its own name

    def ranks_on(self, host: str) -> tuple[int, ...]:
        return tuple(r for r, p in enumerate(self.placements) if p.host == host)

    def describe(self) -> str:
        """'4 processes on 2 hosts: ffn-h0 ranks 0-1, ffn-h1 ranks 2-3; 1 thread a process (...)'."""
        hosts = dict.fromkeys(p.host for p in self.placements)
        where = ", ".join(f"{h} {describe_ranks(self.ranks_on(h))}" for h in hosts)
        one_each = cpu_threads(self.device, self.size) == 1
        why = "a CPU world of several processes: the same arithmetic on any number of hosts"
        why = why if one_each else "torch's default"
        return (
            f"{self.size} process(es) on {len(hosts)} host(s): {where}; "
            f"{self.threads} thread(s) a process ({why})"
        )


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


def cpu_threads(device: torch.device, world_size: int) -> int | None:
    """The intra-op threads a process takes, None: torch's default (every core).

    On the CPU the kernels' rounding depends on how many threads split a sum, so a CPU world
    of several processes runs one thread a process, whatever the hosts: torchrun sets
    OMP_NUM_THREADS=1 only where it starts several processes on one host, and a job of one
    process a host would otherwise compute other weights than the same job on one host."""
    return 1 if device.type == "cpu" and world_size > 1 else None


def init_world(timeout_s: float) -> World:
    """Join the job torchrun (or SLURM via the launcher) started, or form a world of one.
    `timeout_s` (dist.timeout_s) bounds the rendezvous and every collective: a lost peer ends
    the job in that time, not in torch's default half hour."""
    if "RANK" not in os.environ:  # a plain `ffn ...` without torchrun
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = rank_device(local_rank, visible_gpus())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cpu_threads(device, size)
    if threads is not None:
        torch.set_num_threads(threads)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        if int(os.environ.get("LOCAL_WORLD_SIZE", size)) < size:  # the world spans hosts
            check_own_address()
        # gloo: world-level collectives are barriers and small objects, and NCCL would refuse
        # a world in which two processes share a GPU.
        store = _attempt_store(rank, size, timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=size, timeout=timeout)
    world = World(
        dist.get_rank(), dist.get_world_size(), local_rank, device, timeout, torch.get_num_threads()
    )
    everyone = [None] * world.size
    dist.all_gather_object(everyone, (Placement(socket.gethostname(), device.index), own_address()))
    return dataclasses.replace(
        world, placements=tuple(p for p, _ in everyone), addresses=tuple(a for _, a in everyone)
    )


def own_address() -> str:
    """This host's address as its own name resolves (where gloo listens), '' if it does not."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def check_own_address() -> None:
    """Refuse a host whose name resolves to loopback (Debian's 127.0.1.1 line, say), or not at
    all: gloo would listen there, and the other hosts could not reach it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return
    host, address = socket.gethostname(), own_address()
    fix = (
        "set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the interface the hosts share, "
        f"or map {host} to that interface's address"
    )
    if not address:
        raise FFNError(
            f"dist: this host's name {host} does not resolve here, so the other hosts cannot reach it: {fix}"
        )
    if ipaddress.ip_address(address).is_loopback:
        raise FFNError(
            f"dist: this host's name {host} resolves to {address}, a loopback address, where the other "
            f"hosts cannot reach it: {fix}"
        )


def _attempt_store(rank: int, size: int, timeout: datetime.timedelta) -> dist.Store:
    """The rendezvous store, its keys prefixed with torchrun's restart count.

    After `--max-restarts` restarts the workers, the agent's store still holds the
    addresses the killed workers published; without a per-attempt prefix a new worker can
    read a dead peer's address and fail or hang while connecting. A host that cannot reach the
    store fails in one line naming it, within the timeout.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    here = f"rank {rank} on {socket.gethostname()}"
    try:
        socket.getaddrinfo(host, port)
    except socket.gaierror as exc:
        raise FFNError(
            f"dist: the rendezvous host {host} (MASTER_ADDR, port {port}) does not resolve on {here}: "
            f"{exc.strerror}; every host must resolve it the same way"
        ) from None
    try:
        store = dist.TCPStore(
            host,
            port,
            size,
            is_master=rank == 0 and not agent_hosts_store,
            timeout=timeout,
            multi_tenant=True,
        )
    except (RuntimeError, dist.DistError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FFNError(
            f"dist: {here} could not reach the rendezvous at {host}:{port} within dist.timeout_s="
            f"{timeout.total_seconds():g} s ({reason}); is the port open on {host}, and its first process "
            "started?"
        ) from None
    return dist.PrefixStore(f"ffn/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def describe_ranks(ranks: tuple[int, ...]) -> str:
    """'rank 3', 'ranks 0-1', 'ranks 0, 2'."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    if list(ranks) == list(range(ranks[0], ranks[-1] + 1)):
        return f"ranks {ranks[0]}-{ranks[-1]}"
    return "ranks " + ", ".join(map(str, ranks))


# How gloo says a peer went away when it raises a plain RuntimeError (a DDP hook's all-reduce).
PEER_ERROR = re.compile(r"gloo/transport|Connection (closed|reset) by peer|Timed out waiting|timed out after")


class PeerLost(FFNError):
    """A collective failed because a process of another host (or of this one) went away."""

    def __init__(self, message: str, host: str | None, ranks: tuple[int, ...]):
        super().__init__(message)
        self.host, self.ranks = host, ranks


@contextmanager
def naming_lost_peers(world: World):
    """A collective that fails because a peer went away (killed, its host down or cut off, or
    silent past dist.timeout_s) raises PeerLost naming the peer's host where the error names
    its address."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if world.size == 1 or not (isinstance(exc, dist.DistError) or PEER_ERROR.search(str(exc))):
            raise
        raise lost_peer(world, str(exc)) from exc


def lost_peer(world: World, error: str) -> PeerLost:
    first = next((line.strip() for line in error.splitlines() if line.strip()), "")
    addresses = re.findall(r"\[?(\d+\.\d+\.\d+\.\d+)\]?:\d+", error)
    for address in addresses:
        ranks = tuple(r for r, a in enumerate(world.addresses) if a == address and r != world.rank)
        if ranks:
            host = world.placements[ranks[0]].host
            return PeerLost(
                f"lost host {host} ({describe_ranks(world.ranks_on(host))}) seen from rank {world.rank} "
                f"on {world.placements[world.rank].host}: {first[:300]}",
                host,
                world.ranks_on(host),
            )
    return PeerLost(f"lost a peer of rank {world.rank} (within dist.timeout_s): {first[:300]}", None, ())


def make_branches(world: World, cfg) -> list[Branch]:
    """The branches this rank trains. Every rank creates every group, in the same order."""
    plans = plan_groups(list(world.placements), branch_shares(cfg), cfg.dist.engine)
    groups = {
        name: dist.new_group(list(plan.ranks), backend=plan.backend, timeout=world.timeout)
        for name, plan in plans.items()
    }
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
