"""`ffn bench`: every benchmark in one go, one JSON with each figure, the machine and versions."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from ffn_dist.config import load_config


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("ffn-dist", "torch", "torchvision", "nvidia-dali-cuda120", "deepspeed", "submitit"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        )
        found["commit"] = commit.stdout.strip() or None
    except OSError:
        found["commit"] = None
    return found


def bench_all(
    config: str, overrides: list[str], rounds: int, cifar_split: str | None, cifar_root: str | None
):
    from ffn_dist.bench.cache import bench_cache
    from ffn_dist.bench.loader import bench_loader
    from ffn_dist.bench.stage2 import bench_stage2
    from ffn_dist.bench.train import bench_train

    cfg = load_config(config, overrides)
    figures = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(),
        "config": config,
    }
    print("== loader", flush=True)
    figures["loader"] = bench_loader(cifar_split, cifar_root, 2, 64, 6400, rounds, 512)
    print("\n== stage-1 step", flush=True)
    figures["train"] = bench_train(cfg, 10, rounds)
    print("\n== feature cache", flush=True)
    figures["cache"] = bench_cache(load_config(config, overrides), rounds)
    print("\n== stage 2", flush=True)
    figures["stage2"] = bench_stage2(cfg, 115846, 2048, 1000, rounds, 20, None)
    return figures


def write(figures: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2))
    print(f"\nall figures: {path}", flush=True)
