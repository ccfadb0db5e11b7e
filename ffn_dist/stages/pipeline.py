"""`ffn run CONFIG`: the stages in order, each skipped when its outputs are complete.

Stage 1 runs under torchrun with `dist.nproc` processes, started here, so that one command
on one machine does what the SLURM launcher does across nodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ffn_dist.checkpoint import list_checkpoints
from ffn_dist.config import Config
from ffn_dist.distributed import BRANCHES
from ffn_dist.errors import FFNError
from ffn_dist.stages.backbones import branch_dir
from ffn_dist.stages.prepare import prepare


def stage1_complete(cfg: Config) -> bool:
    for branch in BRANCHES:
        found = list_checkpoints(branch_dir(cfg, branch))
        if (
            not found
            or found[-1][0] < cfg.stage1.epochs
            or not (branch_dir(cfg, branch) / "report.json").is_file()
        ):
            return False
    return True


def run_stage1(cfg: Config, config_path: str, overrides: list[str]) -> None:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={cfg.dist.nproc}",
        "-m",
        "ffn_dist.cli",
        "train-backbones",
        config_path,
        *overrides,
    ]
    print(f"stage 1: {' '.join(cmd[2:])}", flush=True)
    if subprocess.run(cmd).returncode != 0:  # argument list, no shell: nothing is interpolated
        raise FFNError(
            f"stage 1 failed; its output is above, checkpoints in {Path(cfg.output_dir) / 'stage1'}"
        )


def stage1_table(cfg: Config) -> str:
    rows = ["| branch | top-1 | top-5 | many | medium | few |", "|---|---|---|---|---|---|"]
    for branch in BRANCHES:
        test = json.loads((branch_dir(cfg, branch) / "report.json").read_text())["test"]
        cells = [
            "-" if test[k] is None else f"{test[k]:.2f}" for k in ("top1", "top5", "many", "medium", "few")
        ]
        rows.append(f"| {branch.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def run_pipeline(cfg: Config, config_path: str, overrides: list[str]) -> None:
    prepare(cfg)
    if stage1_complete(cfg):
        print(f"stage 1: complete in {Path(cfg.output_dir) / 'stage1'}, skipped")
    else:
        run_stage1(cfg, config_path, overrides)
    print("\nstage 1, test accuracy (%) of each branch's own head:")
    print(stage1_table(cfg))
