"""The frozen config and the history of a run.

A run reads the user's YAML and overrides once, when it starts, and writes the resolved
config to `output_dir/config.yaml` before anything else; every process of the job (torchrun
children, SLURM jobs, requeued jobs) reads that file and nothing else. Each config a run
ever started with is kept in `output_dir/configs/ID.yaml`, and `output_dir/history.jsonl`
says which stage ran with which config, when, and how it ended.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ffn_dist.errors import FFNError
from ffn_dist.files import WriteFailed, write_text
from ffn_dist.run.paths import CONFIG_FILE, frozen_config_path, history_path, kept_config_path

if TYPE_CHECKING:
    from ffn_dist.config import Config


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def config_text(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def config_id(cfg: Config) -> str:
    return hashlib.sha256(config_text(cfg).encode()).hexdigest()[:12]


def freeze_config(cfg: Config) -> Path:
    """Write the run's config (`config.yaml`, and `configs/ID.yaml` for its history) unless
    it is already the one the run holds; returns the path every process of the job reads."""
    path = frozen_config_path(cfg)
    text = config_text(cfg)
    kept = kept_config_path(cfg, config_id(cfg))
    if not kept.is_file():
        write_text(kept, text)
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)
        log_event(cfg, None, "config")
    return path


def load_run_config(run_directory: str | Path) -> Config:
    """The config a run is frozen to (what a job reads; never the user's YAML)."""
    from ffn_dist.config import load_config

    path = Path(run_directory) / CONFIG_FILE
    if not path.is_file():
        raise FFNError(f"{path}: missing; the run was not started (`ffn run` or `ffn submit` write it)")
    return load_config(path)


def log_event(cfg: Config, stage: str | None, event: str, **fields) -> None:
    """One line of `history.jsonl`: appended whole (O_APPEND), so ranks may write at once."""
    line = {"time": now(), "stage": stage, "event": event, "config": config_id(cfg), **fields}
    path = history_path(cfg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
    except OSError as exc:
        raise WriteFailed(f"{path}: cannot be written: {exc.strerror or exc}") from None


def note_end(cfg: Config, stage: str, event: str, **fields) -> None:
    """Record why a stage ended early (any rank may; the first line after a start counts).
    Best effort: on a full disk the error itself is what the user must see."""
    try:
        log_event(cfg, stage, event, **fields)
    except WriteFailed:
        pass


def read_history(cfg: Config) -> list[dict]:
    path = history_path(cfg)
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a full disk
    return lines


def last_failure(cfg: Config, stage: str) -> str | None:
    """The first failure recorded for `stage` since it last started."""
    found = None
    for line in read_history(cfg):
        if line["stage"] != stage:
            continue
        if line["event"] == "started":
            found = None
        elif line["event"] == "failed" and found is None:
            found = line["error"]
    return found


def stage_seconds(cfg: Config, stage: str) -> tuple[float, bool] | None:
    """(wall seconds, still running) of the stage's latest outcome: every attempt since it
    last completed before (a stopped and requeued stage 1 counts each part), None if it
    never started."""
    total, began, done = 0.0, None, None
    for line in read_history(cfg):
        if line["stage"] != stage:
            continue
        if line["event"] == "placed":  # where the attempt runs, not its end
            continue
        time = datetime.datetime.fromisoformat(line["time"])
        if line["event"] == "started":
            began = time
        elif began is not None:
            total, began = total + (time - began).total_seconds(), None
            if line["event"] == "complete":
                done, total = total, 0.0
    if began is not None:
        return total + (datetime.datetime.now().astimezone() - began).total_seconds(), True
    if total:
        return total, False
    return (done, False) if done is not None else None


def placements(cfg: Config, stage: str) -> tuple[dict[str, list[int]] | None, list[str]]:
    """Where the stage's latest attempt ran ({host: ranks}), and a line per host lost in an
    attempt: the host a failed collective named (`lost_host`), else one that ran an attempt
    and was absent from the next."""
    hosts, placed_at, lost, named = None, None, [], set()
    for line in read_history(cfg):
        if line["stage"] != stage:
            continue
        if line["event"] == "placed":
            for host in hosts or {}:
                if host not in line["hosts"] and host not in named:
                    lost.append(f"host {host} lost: in the attempt placed at {placed_at}, not in the next")
            hosts, placed_at, named = line["hosts"], line["time"], set()
        elif line["event"] == "failed" and line.get("lost_host") and line["lost_host"] not in named:
            named.add(line["lost_host"])
            ranks = ", ".join(map(str, line.get("lost_ranks", [])))
            lost.append(f"host {line['lost_host']} lost at {line['time']} (ranks {ranks})")
    return hosts, lost
