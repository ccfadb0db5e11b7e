"""The completeness checks of stages' outputs that `run/stages.Stage.check` names: `ffn
status` runs them on every complete stage, so they read files and metadata and import none of
the stages' training code (no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ffn_dist.cache.shards import CacheError
from ffn_dist.cache.store import check_shards, read_manifest
from ffn_dist.run.paths import cache_dir

if TYPE_CHECKING:
    from ffn_dist.config import Config


def check_run_cache(cfg: Config, verify: bool = False) -> None:
    """The cache stage's completeness check: the manifest and every shard it lists, by
    metadata (hashed with `verify`: `ffn status --verify`)."""
    manifest = read_manifest(cache_dir(cfg))
    if manifest is None:
        raise CacheError(f"{cache_dir(cfg)}: no manifest.json; the cache is not complete")
    check_shards(cache_dir(cfg), manifest, verify)
