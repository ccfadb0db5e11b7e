"""`ffn status`: a line per stage of a run, judged by the config the run is frozen to."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ffn_dist.run.history import config_id, load_run_config
from ffn_dist.run.paths import frozen_config_path, run_dir
from ffn_dist.run.stages import STAGES, describe_changes, flatten, stage_state

if TYPE_CHECKING:
    from ffn_dist.config import Config


def run_status(cfg: Config, verify: bool = False) -> tuple[list[str], bool]:
    """A line per stage of the run in `cfg.output_dir`, and whether a stage failed.
    `verify`: read every output whole (the cache's shards hashed), not only its metadata."""
    frozen = load_run_config(run_dir(cfg)) if frozen_config_path(cfg).is_file() else cfg
    lines = [f"run {run_dir(cfg)}: config {config_id(frozen)} ({frozen_config_path(cfg)})"]
    if config_id(frozen) != config_id(cfg):
        ours, theirs = flatten(dataclasses.asdict(frozen)), flatten(dataclasses.asdict(cfg))
        lines.append("the config given differs: " + "; ".join(describe_changes(ours, theirs)))
    failed = False
    for stage in STAGES:
        state, detail = stage_state(frozen, stage.name, verify)
        failed = failed or state == "failed"
        lines.append(f"{stage.label(frozen):<11} {state}" + (f": {detail}" if detail else ""))
    return lines, failed
