"""`ffn bench freshness`: what deciding "is this run complete?" costs on a large cache.

Builds a run whose stages are all complete, as their records say, around a synthetic cache
of `--cache-gb` (random unit embeddings of `--dims` dims, the shapes of a real cache; stage
1's checkpoints hold only the KPS head the classifier starts from), then times, as a user
runs them, `ffn status` (file metadata and records), `ffn status --verify` (every shard
hashed) and `ffn run` on the complete run (the data check and the report run again; every
other stage is skipped).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import torch

from ffn_dist.bench.timing import interleaved_runs, medians
from ffn_dist.cache.store import MANIFEST
from ffn_dist.cache.synthetic import write_synthetic_cache
from ffn_dist.checkpoint import checkpoint_state, save_checkpoint
from ffn_dist.config import load_config, save_config
from ffn_dist.data.dataset import write_builtin
from ffn_dist.files import write_json
from ffn_dist.run.paths import branch_dir, branch_report, cache_dir, final_checkpoint
from ffn_dist.run.stages import begin_stage, finish_stage, stage_identity
from ffn_dist.stages.classifier import fit_classifier
from ffn_dist.stages.evaluate import evaluate_run
from ffn_dist.tables import markdown_table

SHARD_ROWS = 16384


def build_run(work: Path, cache_gb: float, dims: int) -> Path:
    """A complete run in `work/run` (its config in `work/config.yaml`); returns the config."""
    config = work / "config.yaml"
    overrides = [
        f"output_dir={work / 'run'}",
        f"data.root={work / 'data'}",
        "stage1.epochs=1",
        "stage2.epochs=1",
    ]
    cfg = load_config("demo", overrides)
    write_builtin(cfg.data)
    save_config(cfg, config)
    classes = cfg.data.num_classes
    begin_stage(cfg, "stage1")
    reports = []
    for branch in cfg.branches:
        state = checkpoint_state({"head.weight": torch.randn(classes, dims)}, stage_identity(cfg, "stage1"))
        save_checkpoint(branch_dir(cfg, branch), cfg.stage1.epochs, state, keep=1)
        test = {"top1": 0.0, "top5": 0.0, "per_class": [0.0] * classes}
        report = {"branch": branch, "train_counts": [1] * classes, "test": test}
        reports.append(write_json(branch_report(cfg, branch), report))
    finish_stage(cfg, "stage1", [*(final_checkpoint(cfg, b) for b in cfg.branches), *reports])
    rows = int(cache_gb * 1e9 / (len(cfg.branches) * dims * 2)) // SHARD_ROWS * SHARD_ROWS
    print(f"writing a synthetic cache: {rows:,} rows x {len(cfg.branches)} x {dims} fp16 ...", flush=True)
    begin_stage(cfg, "cache")
    write_synthetic_cache(cache_dir(cfg), cfg.branches, rows, dims, classes, shard_rows=SHARD_ROWS)
    finish_stage(cfg, "cache", [cache_dir(cfg) / MANIFEST])
    fit_classifier(cfg)
    evaluate_run(cfg)
    return config


def _timed(*command: str):
    def run() -> float:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "ffn_dist.cli", *command], capture_output=True, text=True
        )
        seconds = time.perf_counter() - start
        if result.returncode != 0 or "stale" in result.stdout or "runs again" in result.stdout:
            said = f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            raise RuntimeError(f"ffn {' '.join(command)}: not a complete run:\n{said}")
        return seconds

    return run


def bench_freshness(cache_gb: float, dims: int, rounds: int, work_dir: str) -> dict:
    work = Path(work_dir).resolve()
    config = work / "config.yaml"
    if not (work / "run" / "stages" / "evaluate.json").is_file():
        config = build_run(work, cache_gb, dims)
    size = sum(p.stat().st_size for p in (work / "run" / "cache").rglob("*.safetensors"))
    runs = interleaved_runs(
        {
            "ffn status": _timed("status", str(config)),
            "ffn status --verify": _timed("status", str(config), "--verify"),
            "ffn run (complete run)": _timed("run", str(config)),
        },
        rounds,
        warmup=1,
    )
    seconds = medians(runs)
    rows = [[name, f"{value:.2f}"] for name, value in seconds.items()]
    print(
        f"\nrun with a {size / 1e9:.2f} GB cache, median of {rounds} rounds (warm page cache)\n"
        + markdown_table(["command", "seconds"], rows),
        flush=True,
    )
    return {"cache_bytes": size, "dims": dims, "rounds": runs, "seconds": seconds}
