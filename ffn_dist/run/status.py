"""`ffn status`: a line per stage of a run, judged by the config the run is frozen to."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING

from ffn_dist.config import describe_branch
from ffn_dist.progress import format_duration
from ffn_dist.run.history import config_id, load_run_config, placements, stage_seconds
from ffn_dist.run.paths import frozen_config_path, plan_path, run_dir
from ffn_dist.run.stages import STAGES, describe_changes, flatten, stage_state

if TYPE_CHECKING:
    from ffn_dist.config import Config


def run_status(cfg: Config, verify: bool = False) -> tuple[list[str], bool]:
    """A line per stage of the run in `cfg.output_dir`, and whether a stage failed.
    `verify`: read every output whole (the cache's shards hashed), not only its metadata."""
    frozen = load_run_config(run_dir(cfg)) if frozen_config_path(cfg).is_file() else cfg
    lines = [f"run {run_dir(cfg)}: config {config_id(frozen)} ({frozen_config_path(cfg)})"]
    lines.append("branches: " + "; ".join(f"{n} ({describe_branch(b)})" for n, b in frozen.branches.items()))
    if config_id(frozen) != config_id(cfg):
        ours, theirs = flatten(dataclasses.asdict(frozen)), flatten(dataclasses.asdict(cfg))
        lines.append("the config given differs: " + "; ".join(describe_changes(ours, theirs)))
    failed = False
    planned = _planned_seconds(frozen)
    for stage in STAGES:
        state, detail = stage_state(frozen, stage.name, verify)
        failed = failed or state == "failed"
        timing = _timing(frozen, stage.label(frozen), planned.get(stage.name))
        lines.append(f"{stage.label(frozen):<11} {state}" + (f": {detail}" if detail else "") + timing)
        lines += _placement_lines(frozen, stage.label(frozen))
    return lines, failed


def _placement_lines(cfg: Config, label: str) -> list[str]:
    """Where a stage of several processes ran (its latest attempt), and the hosts it lost."""
    hosts, lost = placements(cfg, label)
    if not hosts:
        return []
    where = ", ".join(f"{host} ranks {','.join(map(str, ranks))}" for host, ranks in hosts.items())
    return [f"{'':<11} ran on {where}", *(f"{'':<11} {line}" for line in lost)]


def _planned_seconds(cfg: Config) -> dict[str, float]:
    """`ffn plan`'s prediction per stage, where the run has one."""
    try:
        return {
            name: stage["seconds"] for name, stage in json.loads(plan_path(cfg).read_text())["stages"].items()
        }
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _timing(cfg: Config, label: str, planned: float | None) -> str:
    """' (took 3 min 41 s, planned 3 min 20 s)': the wall time of its latest outcome against the plan."""
    taken = stage_seconds(cfg, label)
    parts = []
    if taken is not None:
        seconds, running = taken
        parts.append(f"{'running for' if running else 'took'} {format_duration(seconds)}")
    if planned is not None:
        parts.append(f"planned {format_duration(planned)}")
    return f" ({', '.join(parts)})" if parts else ""
