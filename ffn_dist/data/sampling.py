"""Which samples each rank of a process group reads in an epoch.

Every rank of a group computes the same global order for an epoch (from the seed and the
epoch), then takes its strided share. Shares are padded by wrapping around the order to
ceil(N / group_size), so every rank runs the same number of steps and none hangs a
collective; the few padded samples repeat real ones and carry their real index, which is
how evaluation drops them again. Training pads the order to whole steps of the group's batch
instead (`multiple`), so that every step is the recipe's global batch: with strided shares
and per-rank batches of global / ranks, step k reads positions k x global .. (k+1) x global - 1
of the epoch's order on any number of ranks, which is what lets a run resume on another count.
"""

from __future__ import annotations

import math

import numpy as np

ORDERS = ("sequential", "shuffle", "balanced", "sqrt")


def epoch_order(labels: np.ndarray, order: str, seed: int, epoch: int) -> np.ndarray:
    """The group-wide sample order of one epoch; `balanced` draws classes uniformly, `sqrt`
    a class with probability proportional to the square root of its count (Mahajan et al.
    2018), both N draws with replacement."""
    n = len(labels)
    if order == "sequential":
        return np.arange(n)
    rng = np.random.default_rng([seed, epoch])
    if order == "shuffle":
        return rng.permutation(n)
    if order in ("balanced", "sqrt"):
        # A class drawn from its probability, then a uniform member of it; N draws.
        by_class = np.argsort(labels, kind="stable")
        sizes = np.bincount(labels)
        starts = np.cumsum(sizes) - sizes
        if order == "balanced":
            present = np.flatnonzero(sizes)
            picked = present[rng.integers(len(present), size=n)]
        else:
            weights = np.sqrt(sizes)
            picked = rng.choice(len(sizes), size=n, p=weights / weights.sum())
        within = (rng.random(n) * sizes[picked]).astype(np.int64)
        return by_class[starts[picked] + within]
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def shard(order: np.ndarray, rank: int, size: int, multiple: int | None = None) -> np.ndarray:
    """Rank `rank`'s share of `order`: strided, the order padded by wrapping to a multiple
    of `multiple` (a multiple of `size`; default `size`)."""
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside a group of size {size}")
    multiple = multiple or size
    if multiple % size:
        raise ValueError(f"the padding multiple {multiple} is not a multiple of the group size {size}")
    padded = np.resize(order, math.ceil(len(order) / multiple) * multiple)  # repeats from the start
    return padded[rank::size]


class ShardSampler:
    """The indices one rank of a group reads in each epoch; `multiple`: see `shard`."""

    def __init__(
        self,
        labels: np.ndarray,
        order: str,
        rank: int = 0,
        size: int = 1,
        seed: int = 0,
        multiple: int | None = None,
    ):
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        self.labels, self.order, self.rank, self.size, self.seed = labels, order, rank, size, seed
        self.multiple = multiple or size

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.multiple) * self.multiple // self.size

    def indices(self, epoch: int) -> np.ndarray:
        order = epoch_order(self.labels, self.order, self.seed, epoch)
        return shard(order, self.rank, self.size, self.multiple)
