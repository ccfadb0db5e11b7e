"""A run: its directory's layout, the config it is frozen to, its stages and their record.

Everything a stage needs to know about the run it belongs to lives here, and nothing about
how a stage does its work:

- **Files.** Where each output goes (`branch_dir`, `cache_dir`, ...), and `writing`, the one
  way a file of the run is written: to a temporary name, renamed when complete; an OS error
  (disk full, permission) becomes one line naming the file, and the temporary file goes.
- **The frozen config.** A run reads the user's YAML and overrides once, when it starts, and
  writes the resolved config to `output_dir/config.yaml` before anything else; every process
  of the job (torchrun children, SLURM jobs, requeued jobs) reads that file and nothing else.
  Each config a run ever started with is kept in `output_dir/configs/ID.yaml`, and
  `output_dir/history.jsonl` says which stage ran with which config, when, and how it ended.
- **The stages.** `STAGES` is the one list `ffn run`, `ffn submit` and `ffn status` read: for
  each stage its name, the function that runs it, how many processes, what it depends on and
  how to tell that it is complete. A stage's identity is a hash of what it depends on: the
  config settings it declares, the *contents* of the split files it reads, and the outputs
  of the stages it reads from. A stage is complete when its record holds its current
  identity and the outputs it recorded are still on disk, unchanged.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import io
import json
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ffn_dist.errors import FFNError

if TYPE_CHECKING:
    from ffn_dist.config import Config

BRANCHES = ("ce", "kps")
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"


class WriteFailed(FFNError):
    """A file of the run could not be written (disk full, permission, ...)."""

    exit_status = 1


class StageFailed(FFNError):
    """A stage stopped on a result it must not pass on (a non-finite loss or embedding)."""

    exit_status = 1


# ----------------------------------------------------------------------------- writing files
@contextmanager
def writing(path: str | Path):
    """Yields a temporary path to write `path` through; renamed to `path` when the block
    ends, removed when it fails. An OSError is raised as WriteFailed naming `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteFailed(f"{path}: cannot be written: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes | memoryview, sync: bool = False) -> Path:
    """`sync`: on disk before the rename, for files a rerun resumes from."""
    with writing(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        if sync:
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, body) -> Path:
    return write_text(path, json.dumps(body, indent=1))


def save_torch(path: str | Path, state) -> Path:
    """torch.save, atomically and on disk. Serialised in memory first: torch's own writer
    reports a full disk as a RuntimeError that names neither the file nor the cause."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_bytes(path, buffer.getbuffer(), sync=True)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def digest(value) -> str:
    """A short identity of a JSON-able value (stages, methods)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- paths
def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir)


def checkpoint_path(directory: Path, epoch: int) -> Path:
    return Path(directory) / f"epoch_{epoch:04d}.pt"


def branch_dir(cfg: Config, branch: str) -> Path:
    return run_dir(cfg) / "stage1" / branch


def final_checkpoint(cfg: Config, branch: str) -> Path:
    return checkpoint_path(branch_dir(cfg, branch), cfg.stage1.epochs)


def cache_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "cache"


def classifier_dir(cfg: Config, w1: float) -> Path:
    return run_dir(cfg) / "classifier" / f"w1_{w1:.2f}"


def methods_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "classifier" / "methods"


def report_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "report"


def slurm_dir(cfg: Config) -> Path:
    return run_dir(cfg).resolve() / "slurm"


def split_file(cfg: Config, name: str) -> Path | None:
    """The file of split `name` (train, val, test), None where the config has none."""
    value = getattr(cfg.data, f"{name}_split")
    if value is None:
        return None
    path = Path(value)
    return path if path.is_absolute() else Path(cfg.data.root) / path


# ----------------------------------------------------------------------------- the stages
# Settings no stage's outputs depend on: how fast it goes, how often it logs, where it runs.
# The split files' paths are here too: their contents count instead (Stage.splits).
NOT_INPUTS = (
    "name",
    "output_dir",
    "launch",
    "data.train_split",
    "data.val_split",
    "data.test_split",
    "data.num_threads",
    "data.memory_limit_gb",
    "cache.batch_size",
    "stage1.log_every",
    "stage1.keep_checkpoints",
)


def _cache_settings(cfg: Config) -> tuple[str, ...]:
    """A fused cache stores z for one w1: the fusion weights are then part of it."""
    fused = ("stage2.w1", "stage2.w2") if cfg.cache.store == "fused" else ()
    return ("seed", "data", "model", "cache", *fused)


@dataclass(frozen=True)
class Stage:
    name: str
    command: str  # the `ffn` command that runs it alone
    run: str  # "module:function", called with the frozen config and `options`
    processes: str  # "all": every process of the job (torchrun, SLURM tasks); "one": one
    settings: tuple[str, ...] | Callable  # config sections or keys its outputs depend on
    splits: tuple[str, ...] = ()  # split files it reads, by their contents
    after: tuple[str, ...] = ()  # stages whose outputs it reads
    always: bool = False  # cheap and part of every run (checks, reports): never skipped
    check: str | None = None  # "module:function" raising FFNError where the outputs are damaged
    options: tuple = ()  # keyword arguments when run as part of a run or chain
    minutes: str = ""  # the launch.* setting that limits its SLURM job

    def settings_of(self, cfg: Config) -> tuple[str, ...]:
        return self.settings(cfg) if callable(self.settings) else self.settings

    def function(self) -> Callable:
        return _resolve(self.run)


STAGES = (
    Stage(
        "data",
        "run",
        "ffn_dist.stages.prepare:prepare",
        "one",
        ("data",),
        ("train", "val", "test"),
        always=True,
        minutes="data_minutes",
    ),
    Stage(
        "stage1",
        "train-backbones",
        "ffn_dist.stages.backbones:train_backbones",
        "all",
        ("seed", "data", "model", "stage1", "dist"),
        ("train", "test"),
        minutes="stage1_minutes",
    ),
    Stage(
        "cache",
        "cache-features",
        "ffn_dist.stages.cache:cache_features",
        "all",
        _cache_settings,
        ("train", "val", "test"),
        after=("stage1",),
        check="ffn_dist.stages.cache:open_run_cache",
        # In a run, a cache of older backbones or settings is replaced: they changed on purpose.
        options=(("rebuild", True),),
        minutes="cache_minutes",
    ),
    Stage(
        "classifier",
        "train-classifier",
        "ffn_dist.stages.classifier:train_classifier",
        "one",
        ("seed", "stage2"),
        after=("cache",),
        minutes="classifier_minutes",
    ),
    Stage(
        "evaluate",
        "evaluate",
        "ffn_dist.stages.evaluate:evaluate_run",
        "one",
        (),
        after=("stage1", "classifier"),
        always=True,
        minutes="classifier_minutes",
    ),
)


def _resolve(reference: str) -> Callable:
    """A function named "module:function", imported when it is needed (run.py imports no stage)."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise FFNError(f"{name}: no such stage; the stages are {', '.join(s.name for s in STAGES)}")


def _flatten(node: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(_flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def _selected(key: str, names: tuple[str, ...]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in names)


def stage_inputs(cfg: Config, name: str, upstream: dict | None = None) -> dict:
    """What stage `name`'s outputs are made from: its settings, the sha256 of each split
    file it reads, and the outputs of the stages it reads from: as recorded, or as given in
    `upstream` by a caller that holds them (an opened cache knows its contents' identity)."""
    upstream = upstream or {}
    stage = stage_named(name)
    settings = _flatten(dataclasses.asdict(cfg))
    inputs = {
        key: value
        for key, value in settings.items()
        if _selected(key, stage.settings_of(cfg)) and not _selected(key, NOT_INPUTS)
    }
    for split in stage.splits:
        path = split_file(cfg, split)
        if path is not None:
            key = f"data.{split}_split ({path.name}) sha256"
            inputs[key] = sha256_file(path)[:16] if path.is_file() else "missing"
    for before in stage.after:
        if before in upstream:
            inputs[f"{before} outputs"] = upstream[before]
            continue
        for path, sha in stage_outputs(cfg, before).items():
            inputs[f"{before} output {path}"] = sha
    return inputs


def stage_identity(cfg: Config, name: str, inputs: dict | None = None) -> str:
    return digest(inputs if inputs is not None else stage_inputs(cfg, name))


def describe_changes(recorded: dict, current: dict, then: str = "in the run") -> list[str]:
    """'stage1.lr: 0.1 in the run, 0.05 now' for every input that differs."""
    keys = list(dict.fromkeys([*current, *recorded]))
    return [
        f"{key}: {recorded.get(key)!r} {then}, {current.get(key)!r} now"
        for key in keys
        if recorded.get(key) != current.get(key)
    ]


# ----------------------------------------------------------------------------- stage records
def record_path(cfg: Config, name: str) -> Path:
    return run_dir(cfg) / "stages" / f"{name}.json"


def read_record(cfg: Config, name: str) -> dict | None:
    path = record_path(cfg, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise FFNError(f"{path}: unreadable stage record ({exc}); delete it to run the stage again") from None


def stage_outputs(cfg: Config, name: str) -> dict[str, str]:
    """{file: sha256} of what a completed stage wrote, as the files are now: a replaced
    checkpoint changes the inputs of every stage that reads it."""
    record = read_record(cfg, name)
    if record is None or record.get("status") != "complete":
        raise FFNError(
            f"{record_path(cfg, name)}: stage {name} has not completed; "
            f"run `ffn {stage_named(name).command}` (or `ffn run`) first"
        )
    root = run_dir(cfg)
    return {
        relative: sha256_file(root / relative)[:16] if (root / relative).is_file() else "missing"
        for relative in record["outputs"]
    }


def refuse_other_stage1(cfg: Config) -> None:
    """Stage 1 resumes from its checkpoints: once it has written one, a config that changes
    what it depends on is refused, for both branches at once, naming what differs."""
    record = read_record(cfg, "stage1")
    started = any(path.suffix == ".pt" for b in BRANCHES for path in _files(branch_dir(cfg, b)))
    if not (started and record):
        return
    changes = describe_changes(record["inputs"], stage_inputs(cfg, "stage1"))
    if changes:
        from ffn_dist.checkpoint import ConfigMismatch

        raise ConfigMismatch(
            f"{cfg.output_dir}: its stage-1 checkpoints come from another config: {'; '.join(changes)}. "
            f"Use another output_dir, or the config the run was started with ({frozen_config_path(cfg)})"
        )


def _files(directory: Path) -> list[Path]:
    return list(directory.iterdir()) if directory.is_dir() else []


def start_run(cfg: Config) -> Path:
    """Before anything is written: refuse what stage 1 cannot resume from, then freeze the
    config; returns the frozen config's path."""
    refuse_other_stage1(cfg)
    return freeze_config(cfg)


def begin_stage(cfg: Config, name: str) -> dict:
    """Record that stage `name` starts with this config (the run started with it, if it
    was not); returns the stage's inputs."""
    start_run(cfg)
    inputs = stage_inputs(cfg, name)
    record = {
        "stage": name,
        "status": "running",
        "identity": stage_identity(cfg, name, inputs),
        "inputs": inputs,
        "config": config_id(cfg),
        "started": _now(),
    }
    write_json(record_path(cfg, name), record)
    log_event(cfg, name, "started", identity=record["identity"])
    return inputs


def finish_stage(cfg: Config, name: str, outputs: list[Path]) -> None:
    """Record stage `name` complete: the sha256 of each output, which later stages read."""
    record = read_record(cfg, name) or {}
    inputs = record.get("inputs") or stage_inputs(cfg, name)
    root = run_dir(cfg)
    record.update(
        stage=name,
        status="complete",
        identity=stage_identity(cfg, name, inputs),
        inputs=inputs,
        config=config_id(cfg),
        outputs={str(Path(p).relative_to(root)): sha256_file(Path(p))[:16] for p in outputs},
        finished=_now(),
    )
    write_json(record_path(cfg, name), record)
    log_event(cfg, name, "complete", identity=record["identity"])


def note_end(cfg: Config, name: str, event: str, **fields) -> None:
    """Record why stage `name` ended early (any rank may; the first line after a start
    counts). Best effort: on a full disk the error itself is what the user must see."""
    try:
        log_event(cfg, name, event, **fields)
    except WriteFailed:
        pass


@contextmanager
def recorded(cfg: Config, name: str):
    """Whatever stops the block is recorded as stage `name`'s end: a stop request as a stop,
    an error with its message (`ffn status` shows it)."""
    from ffn_dist.stopping import StopRequested, Terminated

    try:
        yield
    except (StopRequested, Terminated) as stop:
        note_end(cfg, name, "stopped", reason=str(stop) or type(stop).__name__)
        raise
    except Exception as exc:
        error = str(exc) if isinstance(exc, FFNError) else f"{type(exc).__name__}: {exc}"
        note_end(cfg, name, "failed", error=error)
        raise


def stage_state(cfg: Config, name: str) -> tuple[str, str]:
    """(state, detail) of a stage: complete, stale (what changed), failed (why), running,
    not started."""
    stage = stage_named(name)
    record = read_record(cfg, name)
    if record is None:
        return "not started", ""
    if record.get("status") != "complete":
        failure = last_failure(cfg, name)
        return ("failed", failure) if failure else ("incomplete", "started, not finished")
    try:
        inputs = stage_inputs(cfg, name)
    except FFNError as exc:
        return "stale", str(exc)
    changes = describe_changes(record["inputs"], inputs, then="when it ran")
    if changes:
        return "stale", "; ".join(changes)
    for relative, sha in stage_outputs(cfg, name).items():
        if sha != record["outputs"][relative]:
            change = "is missing" if sha == "missing" else "changed since the stage wrote it"
            return "stale", f"{run_dir(cfg) / relative} {change}"
    if stage.check:
        try:
            _resolve(stage.check)(cfg)
        except FFNError as exc:
            return "stale", str(exc)
    return "complete", ""


def run_status(cfg: Config) -> tuple[list[str], bool]:
    """A line per stage of the run in `cfg.output_dir`, judged by the config the run is
    frozen to; and whether a stage failed."""
    frozen = load_run_config(run_dir(cfg)) if frozen_config_path(cfg).is_file() else cfg
    lines = [f"run {run_dir(cfg)}: config {config_id(frozen)} ({frozen_config_path(cfg)})"]
    if config_id(frozen) != config_id(cfg):
        ours, theirs = _flatten(dataclasses.asdict(frozen)), _flatten(dataclasses.asdict(cfg))
        lines.append("the config given differs: " + "; ".join(describe_changes(ours, theirs)))
    failed = False
    for stage in STAGES:
        state, detail = stage_state(frozen, stage.name)
        failed = failed or state == "failed"
        lines.append(f"{stage.name:<11} {state}" + (f": {detail}" if detail else ""))
    return lines, failed


def run_stage(cfg: Config, name: str) -> None:
    """Stage `name` of a run, with the options it takes in a run (the same on one machine
    and on SLURM)."""
    stage = stage_named(name)
    stage.function()(cfg, **dict(stage.options))


# ----------------------------------------------------------------------------- frozen config
def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def config_text(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def config_id(cfg: Config) -> str:
    return hashlib.sha256(config_text(cfg).encode()).hexdigest()[:12]


def frozen_config_path(cfg: Config) -> Path:
    return run_dir(cfg) / CONFIG_FILE


def freeze_config(cfg: Config) -> Path:
    """Write the run's config (`config.yaml`, and `configs/ID.yaml` for its history) unless
    it is already the one the run holds; returns the path every process of the job reads."""
    path = frozen_config_path(cfg)
    text = config_text(cfg)
    kept = run_dir(cfg) / "configs" / f"{config_id(cfg)}.yaml"
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
    line = {"time": _now(), "stage": stage, "event": event, "config": config_id(cfg), **fields}
    path = run_dir(cfg) / HISTORY_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(line) + "\n")
    except OSError as exc:
        raise WriteFailed(f"{path}: cannot be written: {exc.strerror or exc}") from None


def read_history(cfg: Config) -> list[dict]:
    path = run_dir(cfg) / HISTORY_FILE
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a full disk
    return lines


def last_failure(cfg: Config, name: str) -> str | None:
    """The first failure recorded for stage `name` since it last started."""
    found = None
    for line in read_history(cfg):
        if line["stage"] != name:
            continue
        if line["event"] == "started":
            found = None
        elif line["event"] == "failed" and found is None:
            found = line["error"]
    return found
