"""`ffn bench`: every benchmark in one go, one JSON with each figure, the machine and versions."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from ffn_dist.config import load_config
from ffn_dist.files import write_json


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),  # what a container or SLURM leaves this process
        "torch_threads": torch.get_num_threads(),
        # the torch loader's workers hand batches over in shared memory: a 64 MB /dev/shm (a
        # container's default) cannot hold one 256 x 3 x 224 x 224 fp32 batch (154 MB)
        "dev_shm_bytes": shutil.disk_usage("/dev/shm").total if Path("/dev/shm").is_dir() else None,
        "gpu": None,
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpus=torch.cuda.device_count(),
            gpu_memory_bytes=properties.total_memory,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return info


def _driver_version() -> str | None:
    """The NVIDIA driver, as nvidia-smi reports it (torch does not say)."""
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found.stdout.strip().splitlines()[0] if found.returncode == 0 and found.stdout.strip() else None


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
    write_json(path, figures)
    print(f"\nall figures: {path}", flush=True)
