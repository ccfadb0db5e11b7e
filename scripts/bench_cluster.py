"""The demo across hosts of our own (launchers/local_slurm.sh start DIR --nodes 2), on demand.

    python scripts/bench_cluster.py [--work DIR]

Prints, as JSON: the demo's wall time by `ffn run dist.nproc=4` on one host and by
`ffn submit dist.nproc=2 --nodes 2 --wait` on 2 hosts of 2 tasks; stage 1's median step time
without and with `tc netem delay 10ms` on every link (where the kernel has netem); and the time
from a host killed in stage 1 to the requeued job's first step on the host left. Needs root
(namespaces, SLURM). Every host is a namespace of this one machine: the 2-host figures share its
cores, so they measure what crossing hosts costs, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launchers" / "local_slurm.sh"
CONFIG = REPO / "configs" / "demo.yaml"


def sh(*cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, cwd=kwargs.pop("cwd", REPO), **kwargs
    )


def ffn(*args, env=None, cwd=None) -> float:
    started = time.perf_counter()
    done = sh(sys.executable, "-m", "ffn_dist.cli", *args, env=env, cwd=cwd)
    if done.returncode != 0:
        raise SystemExit(
            f"ffn {' '.join(map(str, args))} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return time.perf_counter() - started


def step_seconds(run: Path) -> float:
    """The median gap between stage 1's logged steps (stage1.log_every=1), every branch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gaps = []
    for events in (run / "tensorboard").rglob("events.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.endswith("/loss"):
                times = [e.wall_time for e in acc.Scalars(tag)][3:]
                gaps += [b - a for a, b in zip(times, times[1:], strict=False)]
    gaps.sort()
    return gaps[len(gaps) // 2] if gaps else float("nan")


def torchrun_on_hosts(directory: Path, port: int, *ffn_args) -> None:
    procs = [
        subprocess.Popen(
            [
                "bash",
                SCRIPT,
                "exec",
                directory,
                str(r),
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={r}",
                "--master-addr=ffn-h0",
                f"--master-port={port}",
                "--nproc-per-node=2",
                "-m",
                "ffn_dist.cli",
                *map(str, ffn_args),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in (0, 1)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("stage 1 across the hosts failed")


def netem(directory: Path, delay: str | None) -> bool:
    for link in sh("bash", SCRIPT, "links", directory).stdout.split():
        action = (
            ["add", "dev", link, "root", "netem", "delay", delay] if delay else ["del", "dev", link, "root"]
        )
        if sh("tc", "qdisc", *action).returncode != 0 and delay:
            return False
    return True


def lost_host_to_first_step(directory: Path, env: dict, data: list[str], work: Path) -> float:
    out = work / "lost"
    args = [
        CONFIG,
        *data,
        f"output_dir={out}",
        "stage1.epochs=6",
        "stage1.checkpoint_every=1",
        "stage1.log_every=1",
        "stage2.epochs=2",
        "dist.nproc=2",
        "launch.min_nodes=1",
    ]
    chain = subprocess.Popen(
        [sys.executable, "-m", "ffn_dist.cli", "submit", *map(str, args), "--nodes", "2", "--wait"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not list((out / "stage1" / "kps").glob("epoch_*.pt")):
        time.sleep(0.1)
    sh("bash", SCRIPT, "kill-host", directory, 1)
    lost = time.perf_counter()
    # the requeued attempt: a task that resumed a branch and logged a step after it
    resumed = re.compile(r"resuming from[^\n]*\n(?:[^\n]*\n)*?[^\n]*step \d+/")
    try:
        while True:
            if any(resumed.search(p.read_text()) for p in (out / "slurm" / "stage1").glob("*_log.out")):
                return time.perf_counter() - lost
            if chain.poll() is not None:
                raise SystemExit("the chain ended before stage 1 resumed")
            time.sleep(0.2)
    finally:
        chain.wait()
        sh("bash", SCRIPT, "start-host", directory, 1)


class Figures(dict):
    """Each figure printed as it is measured (a later step may fail), then all as JSON."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        print(f"{key}: {value}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=None)
    work = (parser.parse_args().work or Path(tempfile.mkdtemp(prefix="ffn-bench-cluster-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o711)
    directory = work / "cluster"
    started = sh("bash", SCRIPT, "start", directory, "--nodes", 2)
    if started.returncode != 0:
        raise SystemExit(f"no cluster: {started.stderr.strip()}")
    env = dict(os.environ)
    env.update(line.split("=", 1) for line in started.stdout.splitlines() if "=" in line)
    figures = Figures()
    try:
        data = [f"data.root={work / 'data'}"]  # the built-in demo data, written once, read by both
        figures["demo_1_host_4_processes_s"] = round(
            ffn("run", CONFIG, *data, f"output_dir={work / 'one'}", "dist.nproc=4"), 1
        )
        figures["demo_2_hosts_2_tasks_each_s"] = round(
            ffn(
                "submit",
                CONFIG,
                *data,
                f"output_dir={work / 'two'}",
                "dist.nproc=2",
                "--nodes",
                2,
                "--wait",
                env=env,
            ),
            1,
        )
        short = [*data, "stage1.epochs=2", "stage1.log_every=1"]
        torchrun_on_hosts(directory, 29701, "train-backbones", CONFIG, *short, f"output_dir={work / 'plain'}")
        figures["stage1_step_2_hosts_s"] = round(step_seconds(work / "plain"), 4)
        if netem(directory, "10ms"):
            try:
                torchrun_on_hosts(
                    directory, 29702, "train-backbones", CONFIG, *short, f"output_dir={work / 'delayed'}"
                )
            finally:
                netem(directory, None)
            figures["stage1_step_2_hosts_10ms_s"] = round(step_seconds(work / "delayed"), 4)
        else:
            figures["stage1_step_2_hosts_10ms_s"] = "tc netem is not available in this kernel"
        figures["lost_host_to_first_resumed_step_s"] = round(
            lost_host_to_first_step(directory, env, data, work), 1
        )
    finally:
        sh("bash", SCRIPT, "stop", directory)
    print(json.dumps({"machine": os.uname().nodename, "cores": os.cpu_count(), **figures}, indent=2))


if __name__ == "__main__":
    main()
