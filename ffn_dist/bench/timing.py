"""Timing helpers shared by the benchmarks: interleaved rounds and medians."""

from __future__ import annotations

import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timing covers it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(batches, num_images: int, warmup_batches: int = 2) -> float:
    """Drain `batches` (an iterator of tensors-with-len) until `num_images` are timed."""
    for _ in range(warmup_batches):
        next(batches)
    seen, start = 0, time.perf_counter()
    while seen < num_images:
        seen += len(next(batches))
    return seen / (time.perf_counter() - start)


def endless_batches(loader):
    """A loader's batches, epoch after epoch, for timing a fixed number of steps."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def interleaved_runs(runners: dict, rounds: int, warmup: int = 0) -> dict[str, list[float]]:
    """Run every runner once per round, alternating, so machine noise hits all alike; after
    `warmup` untimed rounds, so that none pays alone for first calls (workers starting, cuDNN
    choosing its kernels, caches filling)."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    results = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            results[name].append(run())
    return results


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in runs.items()}


def interleaved_medians(runners: dict, rounds: int, warmup: int = 0) -> dict[str, float]:
    return medians(interleaved_runs(runners, rounds, warmup))


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of per-round ratios: each pair ran back to back, under the same load."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
