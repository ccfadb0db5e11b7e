"""A feature cache of random unit embeddings with the shapes of a real one: what `ffn plan`
times a classifier epoch on, and the benchmarks' caches (values do not change timings)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ffn_dist.cache.shards import write_shard
from ffn_dist.cache.store import FeatureCache, open_cache, write_manifest


def write_synthetic_cache(
    directory: Path,
    branches,
    rows: int,
    dims: int,
    classes: int,
    test_rows: int = 1024,
    shard_rows: int = 16384,
) -> FeatureCache:
    """Random unit embeddings of each of `branches`, `rows` training and `test_rows` test rows."""
    gen = torch.Generator().manual_seed(0)
    splits = {}
    for name, count in (("train", rows), ("test", test_rows)):
        parts = []
        for number, start in enumerate(range(0, count, shard_rows)):
            n = min(shard_rows, count - start)
            tensors = {b: F.normalize(torch.randn(n, dims, generator=gen), dim=1).half() for b in branches}
            tensors["labels"] = torch.arange(start, start + n) % classes
            tensors["indices"] = torch.arange(start, start + n)
            file = f"{name}/view0/part{number:05d}.safetensors"
            info = write_shard(directory / file, tensors, {"split": name, "view": "0", "part": str(number)})
            parts.append({**info, "file": file, "view": 0})
        splits[name] = {"rows": count, "parts": parts}
    write_manifest(directory, {"store": "normalized", "dtype": "fp16", "dims": dims, "splits": splits})
    return open_cache(directory, verify=False)
