"""Where stage-1 ranks run and how each branch's process group communicates.

Pure logic, so that a layout is checked before anything is launched (`ffn run`, `ffn submit`)
and again, from the real placements, when the processes form their groups.

Ranks are numbered as torchrun and SLURM number them (rank = node x processes per node +
local rank). A rank uses GPU `local_rank % gpus` of its node, so processes that outnumber the
GPUs share them. NCCL refuses a communicator with two ranks on one GPU, so a branch's group
uses NCCL only when its ranks hold distinct GPUs, and gloo otherwise (it reduces CUDA tensors
through host memory), and under DDP a group of one rank uses gloo too; world-level
coordination (barriers, small objects) is always on gloo.

The recipe is global: a branch's batch (`data.batch_size`) is the batch of one optimizer step
of the whole group, split evenly over its ranks and, inside each rank, over
`stage1.accumulation` micro-batches. A layout that cannot split it evenly is refused, naming
the process counts that can, so the recipe never changes with the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass

from ffn_dist.errors import FFNError


@dataclass(frozen=True)
class Placement:
    """The host a rank runs on and the CUDA device it uses (None: the CPU)."""

    host: str
    gpu: int | None

    def __str__(self) -> str:
        return f"{self.host} cuda:{self.gpu}" if self.gpu is not None else f"{self.host} cpu"


@dataclass(frozen=True)
class GroupPlan:
    ranks: tuple[int, ...]
    backend: str  # "nccl" or "gloo"
    placements: tuple[Placement, ...]


def gpu_for(local_rank: int, gpus: int) -> int | None:
    """The GPU a process uses: local ranks beyond the GPU count share them, round-robin."""
    return local_rank % gpus if gpus > 0 else None


def planned_placements(nodes: int, procs_per_node: int, gpus_per_node: int) -> list[Placement]:
    """The placements a launch will produce, before it is launched."""
    return [
        Placement(f"node{node}", gpu_for(local, gpus_per_node))
        for node in range(nodes)
        for local in range(procs_per_node)
    ]


def branch_shares(cfg) -> dict[str, int | None]:
    """Each branch's processes as the config sets them (`branches.NAME.processes`), in rank order."""
    return {name: branch.processes for name, branch in cfg.branches.items()}


def branch_ranks(world_size: int, shares: dict[str, int | None]) -> dict[str, tuple[int, ...]]:
    """Consecutive ranks for each branch, in order: a set count as it is, the ranks left split
    evenly over the others (the earlier ones one more where they do not divide); one process
    trains every branch."""
    if world_size == 1:
        return {name: (0,) for name in shares}
    names = ", ".join(shares)
    if world_size < len(shares):
        raise FFNError(
            f"dist.nproc: {world_size} processes for {len(shares)} branches ({names}); each branch needs its "
            "own processes, so expected at least one a branch (or 1, which trains them in turn)"
        )
    free = [name for name, count in shares.items() if count is None]
    left = world_size - sum(count for count in shares.values() if count is not None)
    set_counts = ", ".join(f"branches.{n}.processes={c}" for n, c in shares.items() if c is not None)
    if (free and left < len(free)) or (not free and left != 0):
        need = f"{len(free)} more for {', '.join(free)}" if free else "exactly these"
        raise FFNError(
            f"{set_counts}: with {world_size} processes, {left} left ({need}); set them to leave "
            f"each branch at least one rank and to sum to the processes (dist.nproc, or SLURM tasks)"
        )
    counts = dict(shares)
    for i, name in enumerate(free):
        counts[name] = left // len(free) + (1 if i < left % len(free) else 0)
    ranks, start = {}, 0
    for name, count in counts.items():
        ranks[name] = tuple(range(start, start + count))
        start += count
    return ranks


@dataclass(frozen=True)
class BatchSplit:
    """One branch's global batch: `ranks` processes x `accumulation` micro-batches each."""

    global_batch: int
    ranks: int
    accumulation: int

    @property
    def per_process(self) -> int:
        return self.global_batch // self.ranks

    @property
    def micro_batch(self) -> int:
        return self.per_process // self.accumulation

    def __str__(self) -> str:
        text = f"global batch {self.global_batch} = {self.ranks} x {self.per_process}"
        if self.accumulation > 1:
            text += f" ({self.accumulation} x {self.micro_batch} accumulated)"
        return text


def _accumulation(global_batch: int, ranks: int, accumulation: int | None, max_micro: int) -> int | None:
    """Micro-batches per step that split the batch evenly (None: none does); `accumulation`
    None picks the fewest whose micro-batch is at most `max_micro`."""
    if global_batch % ranks:
        return None
    per_process = global_batch // ranks
    if accumulation is not None:
        return accumulation if per_process % accumulation == 0 else None
    fits = (a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= max_micro)
    return next(fits)


def _splits(global_batch, world_size, shares, accumulation, max_micro) -> dict[str, BatchSplit] | None:
    splits = {}
    for name, ranks in branch_ranks(world_size, shares).items():
        steps = _accumulation(global_batch, len(ranks), accumulation, max_micro)
        if steps is None:
            return None
        splits[name] = BatchSplit(global_batch, len(ranks), steps)
    return splits


def _layouts_that_keep(global_batch, shares, accumulation, max_micro, shown: int = 10) -> list[int]:
    """The first `shown` process counts (up to two per image of the batch) that keep the recipe."""
    counts = []
    for n in range(1, len(shares) * global_batch + 1):
        try:
            if _splits(global_batch, n, shares, accumulation, max_micro) is not None:
                counts.append(n)
        except FFNError:  # a count the branches' processes do not fit
            continue
        if len(counts) == shown:
            break
    return counts


def split_batches(cfg, world_size: int) -> dict[str, BatchSplit]:
    """Each branch's `BatchSplit` on `world_size` processes, from the config's recipe
    (`data.batch_size`, `stage1.accumulation`, `stage1.max_micro_batch`, the branches'
    processes); refuses a layout that would change the recipe, naming the process counts that
    keep it."""
    shares = branch_shares(cfg)
    recipe = (cfg.data.batch_size, shares, cfg.stage1.accumulation, cfg.stage1.max_micro_batch)
    global_batch, _, accumulation, max_micro = recipe
    splits = _splits(global_batch, world_size, shares, accumulation, max_micro)
    if splits is not None:
        return splits
    ranks = {name: len(r) for name, r in branch_ranks(world_size, shares).items()}
    groups = " and ".join(f"{n} {name.upper()}" for name, n in ranks.items())
    steps = f" x stage1.accumulation={accumulation} micro-batches" if (accumulation or 1) > 1 else ""
    keep = _layouts_that_keep(*recipe)
    listed = ", ".join(map(str, keep)) + (", ..." if len(keep) == 10 else "")
    fixed = ", ".join(f"branches.{n}.processes={c}" for n, c in shares.items() if c is not None)
    fixed = f" with {fixed}" if fixed else ""
    raise FFNError(
        f"data.batch_size: the recipe's global batch of {global_batch} a branch does not split evenly "
        f"over {world_size} process(es) ({groups} rank(s){steps}), and a different batch would change the "
        f"recipe; process counts (dist.nproc, or SLURM tasks) that keep it{fixed}: "
        f"{listed}"
    )


def group_backend(members: list[Placement]) -> str:
    """NCCL when every member has its own GPU, gloo otherwise (CPU ranks or a shared GPU)."""
    if any(p.gpu is None for p in members):
        return "gloo"
    return "nccl" if len(set(members)) == len(members) else "gloo"


def _sharing(ranks: tuple[int, ...], members: tuple[Placement, ...]) -> str:
    """'ranks 0 and 2 share node0 cuda:0': the first GPU that two ranks of a group share."""
    first = {}
    for rank, place in zip(ranks, members, strict=True):
        if place in first:
            return f"ranks {first[place]} and {rank} share {place}"
        first[place] = rank
    return ""


def plan_groups(
    placements: list[Placement], shares: dict[str, int | None], engine: str
) -> dict[str, GroupPlan]:
    """Each branch's ranks and backend (`shares`: `branch_shares`); refuses a layout that
    cannot work, saying what would."""
    plans = {}
    for name, ranks in branch_ranks(len(placements), shares).items():
        members = tuple(placements[r] for r in ranks)
        backend = group_backend(list(members))
        if len(members) == 1 and engine == "ddp":
            # One rank: no DDP and only a few flags cross the group, which gloo carries without
            # the GPU memory and start-up of an NCCL communicator. (DeepSpeed keeps NCCL.)
            backend = "gloo"
        if engine == "deepspeed" and backend == "gloo" and members[0].gpu is not None:
            gpus = len({p.gpu for p in placements if p.host == members[0].host})
            raise FFNError(
                f"dist.engine=deepspeed: in the {name} group {_sharing(ranks, members)}, and DeepSpeed "
                "needs one GPU per rank of a group (NCCL); use dist.engine=ddp (its group then "
                f"communicates over gloo), or at most {gpus} process(es) per node, one per GPU"
            )
        plans[name] = GroupPlan(ranks, backend, members)
    return plans


def describe_groups(plans: dict[str, GroupPlan], splits: dict[str, BatchSplit]) -> str:
    """'CE ranks 0-15 (16, nccl; global batch 64 = 16 x 4), KPS ranks 16-31 (...)', and where
    a group shares GPUs."""
    parts = []
    for name, plan in plans.items():
        ranks = plan.ranks
        text = f"{name.upper()} ranks {ranks[0]}-{ranks[-1]} ({len(ranks)}, {plan.backend}; {splits[name]})"
        shared = _sharing(ranks, plan.placements)
        parts.append(text + (f": {shared}" if shared else ""))
    return ", ".join(parts)
