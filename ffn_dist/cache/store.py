"""A feature cache on disk: `manifest.json` and shards per split and view, read as one table.

The manifest is written last, so its presence means every shard it lists was complete; it
lists each shard's rows, size, time and sha256. Whether the cache is the current one for a
run (its backbones, its settings) is the cache stage's record's to say (run/stages.py); a
reader checks the shards themselves: by their metadata, or hashed (`verify`, before it
trains on them). A shard found damaged is set aside and named, and the cache stage rewrites
it alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ffn_dist.cache.shards import CacheError, MappedShard, set_aside, shard_problem
from ffn_dist.files import write_json
from ffn_dist.fusion import describe_fusion, weighed

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"


def read_manifest(directory: Path) -> dict | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path}: not valid JSON ({exc}); delete the cache directory and rebuild") from None


def write_manifest(directory: Path, body: dict) -> Path:
    return write_json(Path(directory) / MANIFEST, body)


class CachedSplit:
    """All rows of one split (every view), gathered from memory-mapped shards on demand."""

    def __init__(self, name: str, shards: list[MappedShard], store: str, fusion: dict | None):
        self.name, self.shards, self.store, self.fusion = name, shards, store, fusion
        sizes = np.array([s.rows for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(shards) else np.zeros(0, np.int64)
        self.labels = np.concatenate([np.asarray(s["labels"]) for s in shards])
        self.indices = np.concatenate([np.asarray(s["indices"]) for s in shards])
        self.views = np.concatenate([np.full(s.rows, int(s.metadata["view"])) for s in shards])

    def __len__(self) -> int:
        return len(self.labels)

    def rows_of_view(self, view: int) -> np.ndarray:
        return np.flatnonzero(self.views == view)

    @property
    def keys(self) -> tuple[str, ...]:
        """The embeddings a row holds: each branch's unit embedding by name, or `fused`."""
        return tuple(name for name in self.shards[0].arrays if name not in ("labels", "indices"))

    def gather(self, rows: np.ndarray, keys: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The stored (fp16 by default) embeddings of `rows`, in that order."""
        import torch  # imported by a reader of rows, not by a check of the shards (`ffn status`)

        rows = np.asarray(rows, dtype=np.int64)
        owner = np.searchsorted(self.starts, rows, side="right") - 1
        picks = [(shard, np.flatnonzero(owner == shard)) for shard in np.unique(owner)]
        out = {}
        for key in keys or self.keys:
            first = self.shards[0][key]
            values = np.empty((len(rows), *first.shape[1:]), first.dtype)
            for shard, picked in picks:
                values[picked] = self.shards[shard][key][rows[picked] - self.starts[shard]]
            out[key] = torch.from_numpy(values)
        return out

    def fuse(self, stored: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
        """z = sum_b w_b f̂_b in the order of `weights`, float32, from gathered rows (which it
        may overwrite: they are the caller's copies). A branch of weight 0 is left out of the
        sum, which is exact (w f̂ + 0 f̂' = w f̂): a fusion that weighs a branch 0 is the fusion
        of the others alone.

        Callers gather many rows at once and fuse a batch at a time: converting and mixing
        a small batch stays in the CPU's cache, a 4096-row block does not (measured 3x)."""
        if self.store == "fused":
            if set(self.fusion) != set(weights) or not all(
                np.isclose(self.fusion[name], w) for name, w in weights.items()
            ):
                raise CacheError(
                    f"this cache stores only z for {describe_fusion(self.fusion)} (cache.store=fused), "
                    f"not {describe_fusion(weights)}; rebuild it with cache.store=normalized to change "
                    "the fusion weights or sweep them"
                )
            return stored["fused"].float()
        (first, weight), *rest = weighed(weights).items()
        fused = stored[first].float().mul_(weight)
        for name, weight in rest:
            fused.add_(stored[name], alpha=weight)
        return fused

    def needed(self, weights: dict[str, float]) -> tuple[str, ...]:
        """The stored embeddings `fuse` reads at `weights`: a branch of weight 0 is not read."""
        return ("fused",) if self.store == "fused" else tuple(weighed(weights))

    def fused(self, rows: np.ndarray, weights: dict[str, float]) -> torch.Tensor:
        return self.fuse(self.gather(rows, self.needed(weights)), weights)

    def branch(self, rows: np.ndarray, name: str) -> torch.Tensor:
        """One branch's unit embeddings (only a `normalized` cache has them)."""
        if self.store == "fused":
            raise CacheError("this cache stores only the fused embedding (cache.store=fused)")
        return self.gather(rows, (name,))[name].float()


@dataclass
class FeatureCache:
    directory: Path
    manifest: dict
    splits: dict[str, CachedSplit]

    @property
    def dims(self) -> int:
        return int(self.manifest["dims"])


def check_shards(directory: Path, manifest: dict, verify: bool = False, reader: bool = False) -> None:
    """Every shard the manifest lists, present and unchanged (by metadata; hashed with
    `verify`). A `reader` (about to train on them, not `ffn status`, which changes nothing)
    sets a damaged one aside, so that the cache stage sees it missing and rewrites it alone."""
    for entry in manifest["splits"].values():
        for part in entry["parts"]:
            path = Path(directory) / part["file"]
            problem = shard_problem(path, part, verify)
            if problem is None:
                continue
            if reader and problem != "missing":
                set_aside(path)
            raise CacheError(
                f"{path}: {problem}; `ffn run` (or `ffn cache-features`) rewrites this shard alone"
            )


def open_cache(directory: Path, verify: bool = True) -> FeatureCache:
    """Open a complete cache; `verify`: every shard hashed against the manifest first (the
    shards are read anyway: this reads each once more, in order, and warms the page cache)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise CacheError(f"{directory}: no complete feature cache (no {MANIFEST}); run `ffn cache-features`")
    check_shards(directory, manifest, verify, reader=True)
    splits = {
        name: CachedSplit(
            name,
            [MappedShard(directory / part["file"]) for part in entry["parts"]],
            manifest["store"],
            manifest.get("fusion"),
        )
        for name, entry in manifest["splits"].items()
    }
    return FeatureCache(directory, manifest, splits)
