"""`ffn cache-features CONFIG`: every frozen backbone runs once; their embeddings go to shards.

Under torchrun with any number of processes. The work is cut into parts of
`cache.shard_rows` consecutive samples of one split and one view, independent of the
number of processes; the parts still missing (or damaged) are dealt round-robin to the
ranks, so a rerun, or a requeued job with a different size, completes only what is left.
View 0 of every split uses the eval transform; training views 1..V-1 the stage-1 train
transform (no mixup), because the method's stage 2 trains on augmented crops. The training
views are stored in `cache.dtype`; the val and test splits are computed and stored in fp32,
without autocast: the numbers the exported model computes from the same pixels, so that the
report and `ffn predict` agree (docs/export.md says to what rule).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ffn_dist.cache.shards import CacheError, shard_problem, sidecar_path, write_shard
from ffn_dist.cache.store import FeatureCache, open_cache, read_manifest, write_manifest
from ffn_dist.checkpoint import load_checkpoint
from ffn_dist.config import Config, config_to_dict
from ffn_dist.data.dataset import open_dataset
from ffn_dist.data.loader import build_loader
from ffn_dist.data.splits import Split
from ffn_dist.distributed import World, init_world, rank0_decides
from ffn_dist.fusion import weighted_sum
from ffn_dist.models.backbones import backbone_entry
from ffn_dist.models.precision import autocast, place_images, place_model
from ffn_dist.progress import progress
from ffn_dist.run.paths import cache_dir, final_checkpoint, stage1_dir
from ffn_dist.run.stages import (
    StageFailed,
    begin_stage,
    describe_changes,
    finish_stage,
    read_record,
    recorded,
    stage_identity,
    stage_inputs,
    stage_state,
)
from ffn_dist.rundir import holding
from ffn_dist.stages.backbones import Network, build_network

STORED_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
EVAL_DTYPE = "fp32"  # val and test: what the export computes


def stored_dtype(cfg: Config, split: str) -> str:
    return cfg.cache.dtype if split == "train" else EVAL_DTYPE


def open_run_cache(cfg: Config, verify: bool = True) -> FeatureCache:
    """The run's cache, refused unless the cache stage is complete for the current config
    and checkpoints; `verify`: its shards hashed before use (a reader's check)."""
    state, detail = stage_state(cfg, "cache")
    if state != "complete":
        raise CacheError(
            f"{cache_dir(cfg)}: the feature cache is {state}{f' ({detail})' if detail else ''}; "
            "run `ffn cache-features` (or `ffn run`)"
        )
    return open_cache(cache_dir(cfg), verify)


@dataclass(frozen=True)
class Part:
    split: str
    view: int
    number: int
    start: int  # first and one-past-last sample index of the split
    stop: int

    @property
    def file(self) -> str:
        return f"{self.split}/view{self.view}/part{self.number:05d}.safetensors"


def plan_parts(splits: dict[str, Split], cfg: Config) -> list[Part]:
    rows = cfg.cache.shard_rows
    parts = []
    for name, split in splits.items():
        for view in range(cfg.cache.train_views if name == "train" else 1):
            for number, start in enumerate(range(0, len(split), rows)):
                parts.append(Part(name, view, number, start, min(start + rows, len(split))))
    return parts


def load_frozen(cfg: Config, branch: str, device: torch.device) -> Network:
    state = load_checkpoint(final_checkpoint(cfg, branch), stage_identity(cfg, "stage1"))
    network = build_network(cfg, branch)
    network.load_state_dict(state["model"])
    network.requires_grad_(False)
    return place_model(network, device).eval()


class _PartWriter:
    """Collects one rank's rows of one (split, view) in sample order and writes each part
    as soon as the rows have moved past it."""

    def __init__(self, directory: Path, parts: list[Part], cfg: Config, dims: int):
        self.directory, self.parts, self.cfg, self.dims = directory, parts, cfg, dims
        self.stops = np.array([p.stop for p in parts])
        self.pending: list[dict[str, torch.Tensor]] = []
        self.current = 0
        self.written = 0

    def add(self, rows: dict[str, torch.Tensor]) -> None:
        owner = np.searchsorted(self.stops, rows["indices"].numpy(), side="right")
        for part in np.unique(owner):
            while self.current < part:
                self._flush()
            mask = torch.from_numpy(owner == part)
            self.pending.append({k: v[mask] for k, v in rows.items()})

    def close(self) -> None:
        while self.current < len(self.parts):
            self._flush()

    def _flush(self) -> None:
        part = self.parts[self.current]
        keys = stored_keys(self.cfg)
        if self.pending:
            tensors = {k: torch.cat([p[k] for p in self.pending]) for k in (*keys, "labels", "indices")}
        else:  # every image of the part was excluded as unreadable
            dtype = STORED_DTYPES[stored_dtype(self.cfg, part.split)]
            tensors = {k: torch.zeros(0, self.dims, dtype=dtype) for k in keys}
            tensors.update(labels=torch.zeros(0, dtype=torch.long), indices=torch.zeros(0, dtype=torch.long))
        metadata = {"split": part.split, "view": str(part.view), "part": str(part.number)}
        write_shard(self.directory / part.file, tensors, metadata)
        self.pending, self.current, self.written = [], self.current + 1, self.written + 1


def stored_keys(cfg: Config) -> tuple[str, ...]:
    """What a cache row holds: each branch's unit embedding, or (cache.store=fused) only z."""
    return ("fused",) if cfg.cache.store == "fused" else tuple(cfg.branches)


def _embed(networks: dict[str, Network], images: torch.Tensor, cfg: Config, world: World, split: str) -> dict:
    stored = STORED_DTYPES[stored_dtype(cfg, split)]
    precision = cfg.model.precision if split == "train" else "fp32"
    with torch.no_grad(), autocast(world.device, precision):
        images = place_images(images, world.device)
        unit = {b: F.normalize(networks[b].embed(images).float(), dim=1) for b in cfg.branches}
    rows = {"fused": weighted_sum(unit, cfg.stage2.fusion)} if cfg.cache.store == "fused" else unit
    return {key: value.to(stored).cpu() for key, value in rows.items()}


def _refuse_non_finite(rows: dict, where: str, cfg: Config) -> None:
    """Embeddings are checked as they are written (on the host copy the write needs anyway)."""
    for key in stored_keys(cfg):
        if not bool(torch.isfinite(rows[key]).all()):
            raise StageFailed(
                f"{where}: the {key} embeddings are not finite; the backbones "
                f"({stage1_dir(cfg)}) or cache.dtype={cfg.cache.dtype} "
                "cannot make a cache. Nothing of this part was written"
            )


def _extract(cfg: Config, world: World, split: Split, view: int, parts: list[Part], networks, directory):
    """Run the backbones over this rank's parts of one (split, view) and write them."""
    split_name = parts[0].split
    wanted = np.concatenate([np.arange(p.start, p.stop) for p in parts])
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.cache.batch_size)
    subset = split.subset(wanted)
    loader = build_loader(
        data_cfg,
        subset,
        train=view > 0,
        order="sequential",
        seed=cfg.seed,
        device=world.device,
        run_dir=cfg.output_dir,
    )
    loader.set_epoch(view)  # each augmented view draws its own crops
    writer = _PartWriter(directory, parts, cfg, backbone_entry(cfg.model.arch).embedding_dim)
    label = f"[cache rank {world.rank}] {parts[0].split} view {view}"
    bar = progress(desc=label, total=len(subset), disable=world.rank != 0)
    for batch in loader:
        # Loader positions -> sample indices of the full split (bad images may have been dropped).
        lines = loader.split.lines[batch.indices.numpy()]
        indices = torch.from_numpy(np.searchsorted(split.lines, lines))
        rows = _embed(networks, batch.images, cfg, world, split_name)
        _refuse_non_finite(rows, f"cache {parts[0].split} view {view} images {int(indices[0])}..", cfg)
        rows.update(labels=batch.labels.cpu().long(), indices=indices)
        writer.add(rows)
        bar.update(len(indices))
    bar.close()
    writer.close()
    return writer.written


def _begin(cfg: Config, rebuild: bool, parts: list[Part]) -> list[Part]:
    """Rank 0: record the stage's start; a cache begun (or made) from other inputs, as its
    record says, is refused or, with `rebuild`, cleared; returns the parts still to write."""
    directory = cache_dir(cfg)
    previous = read_record(cfg, "cache")
    inputs = stage_inputs(cfg, "cache")
    changes = describe_changes(previous["inputs"], inputs, then="when cached") if previous else []
    if changes and directory.exists() and not rebuild:  # refused before the record is touched
        raise CacheError(
            f"{directory}: this cache was made from other backbones or settings: "
            + "; ".join(changes)
            + ". Rerun with --rebuild to replace it, or use another output_dir"
        )
    begin_stage(cfg, "cache")
    if changes and directory.exists():
        print(f"cache: replacing {directory}: {'; '.join(changes)}", flush=True)
        shutil.rmtree(directory)
    missing = []
    for part in parts:
        problem = shard_problem(directory / part.file)
        if problem is None:
            continue
        if problem != "missing":
            print(f"cache: {directory / part.file}: {problem}; rewriting it", flush=True)
        missing.append(part)
    print(f"cache: {len(parts) - len(missing)} of {len(parts)} shards already complete", flush=True)
    return missing


def _write_final_manifest(cfg: Config, parts: list[Part], dims: int) -> Path:
    directory = cache_dir(cfg)
    splits: dict[str, dict] = {}
    for part in parts:
        record = json.loads(sidecar_path(directory / part.file).read_text())
        entry = splits.setdefault(part.split, {"rows": 0, "parts": []})
        entry["rows"] += record["rows"]
        entry["parts"].append({**record, "file": part.file, "view": part.view})
    body = {
        "format": 2,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "store": cfg.cache.store,
        "dtype": {"train": cfg.cache.dtype, "val": EVAL_DTYPE, "test": EVAL_DTYPE},
        "dims": dims,
        "train_views": cfg.cache.train_views,
        "fusion": dict(cfg.stage2.fusion) if cfg.cache.store == "fused" else None,
        "config": config_to_dict(cfg),
        "splits": splits,
    }
    manifest = write_manifest(directory, body)
    finish_stage(cfg, "cache", [manifest])
    return manifest


def cache_features(cfg: Config, rebuild: bool = False) -> Path:
    """Write (or complete) the run's feature cache; returns the manifest's path."""
    world = init_world(cfg.dist.timeout_s)
    try:
        with holding(cfg.output_dir, world), recorded(cfg, "cache", world):
            manifest = _cache_features(cfg, world, rebuild)
        # Every rank past its last collective before any tears its process group down: a rank
        # that exits while its peer's gloo threads still talk to it was seen to abort at exit
        # ("terminate called without an active exception"), which SLURM counts as a failure.
        dist.barrier()
        return manifest
    finally:
        dist.destroy_process_group()


def _cache_features(cfg: Config, world: World, rebuild: bool) -> Path:
    dataset = open_dataset(cfg.data)
    splits = dataset.splits()
    parts = plan_parts(splits, cfg)
    missing = rank0_decides(world, lambda: _begin(cfg, rebuild, parts))
    mine = missing[world.rank :: world.size]
    written = 0
    if mine:
        networks = {b: load_frozen(cfg, b, world.device) for b in cfg.branches}
        for split_name, view in dict.fromkeys((p.split, p.view) for p in mine):
            group = [p for p in mine if (p.split, p.view) == (split_name, view)]
            written += _extract(cfg, world, splits[split_name], view, group, networks, cache_dir(cfg))
    print(f"[cache rank {world.rank}] wrote {written} shard(s)", flush=True)
    dist.barrier()
    dims = backbone_entry(cfg.model.arch).embedding_dim
    manifest = rank0_decides(world, lambda: _write_final_manifest(cfg, parts, dims))
    if world.rank == 0:
        summary = read_manifest(cache_dir(cfg))
        rows = ", ".join(f"{name} {entry['rows']} rows" for name, entry in summary["splits"].items())
        print(f"cache: complete, {manifest} ({rows})", flush=True)
    return manifest
