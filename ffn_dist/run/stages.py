"""The stages of a run, what each depends on, and their records: one answer to "is it current?".

`STAGES` is the one list `ffn run`, `ffn submit` and `ffn status` read: for each stage its
name, the function that runs it, how many processes, what it depends on and how to tell
that it is complete. A stage's identity is a hash of what it depends on: the config
settings it declares, the *contents* of the split files it reads, and the outputs of the
stages it reads from. A stage is complete when its record (`stages/NAME.json`) holds its
current identity and the outputs it recorded are unchanged. Deciding that costs file
metadata: an output whose size and modification time are those recorded is not read again
(`files.current_sha`); a stage's `check` may look deeper (the cache: every shard present,
and with `verify` hashed).

The classifier stage has variants: one record per classifier (method, fusion weight, seed;
`paths.classifier_variant`), so the drivers (`--sweep`, `--methods`, `--seeds`) run that one
stage under overrides and each point is a record like any other.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ffn_dist.data.dataset import split_path
from ffn_dist.errors import FFNError
from ffn_dist.files import current_sha, digest, file_record, sha256_file, write_json
from ffn_dist.run.history import config_id, freeze_config, last_failure, log_event, note_end, now
from ffn_dist.run.paths import branch_dir, classifier_variant, frozen_config_path, record_path, run_dir

if TYPE_CHECKING:
    from ffn_dist.config import Config


class StageFailed(FFNError):
    """A stage stopped on a result it must not pass on (a non-finite loss or embedding)."""

    exit_status = 1


# Settings no stage's outputs depend on: how fast it goes, how often it logs, where it runs.
# The split files' paths are here too, and other input files': their contents count instead
# (Stage.splits, Stage.files).
NOT_INPUTS = (
    "name",
    "output_dir",
    "launch",
    "data.train_split",
    "data.val_split",
    "data.test_split",
    "model.pretrained",
    "data.num_threads",
    "data.memory_limit_gb",
    "cache.batch_size",
    "stage1.log_every",
    "stage1.keep_checkpoints",
    # the layout: the recipe (global batch, lr) is the same on any number of processes
    "dist.nproc",
    "dist.timeout_s",  # how long a rank waits for its peers, not what it computes
    "branches.*.processes",
    "stage1.accumulation",
    "stage1.max_micro_batch",
)


def _cache_settings(cfg: Config) -> tuple[str, ...]:
    """A fused cache stores z for one fusion: its weights are then part of it."""
    fused = ("stage2.fusion",) if cfg.cache.store == "fused" else ()
    return ("seed", "data", "model", "cache", *fused)


def _classifier_settings(cfg: Config) -> tuple[str, ...]:
    """Stage 2's settings, with the hyperparameters of the configured method only: another
    method's grid does not change this classifier."""
    own = [
        f"stage2.{f.name}"
        for f in dataclasses.fields(cfg.stage2)
        if not dataclasses.is_dataclass(getattr(cfg.stage2, f.name)) or f.name == cfg.stage2.method
    ]
    return ("seed", *own)


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
    check: str | None = None  # "module:function(cfg, verify)" raising FFNError where outputs are damaged
    options: tuple = ()  # keyword arguments when run as part of a run or chain
    minutes: str = ""  # the launch.* setting that limits its SLURM job
    variant: Callable | None = None  # cfg -> which of the stage's records (None: it has one)
    files: tuple[str, ...] = ()  # settings naming a file it reads (by its contents), when set
    # what its outputs hold, raised when a release adds to them: an older record is then stale
    outputs_version: int = 1

    def settings_of(self, cfg: Config) -> tuple[str, ...]:
        return self.settings(cfg) if callable(self.settings) else self.settings

    def variant_of(self, cfg: Config) -> str | None:
        return self.variant(cfg) if self.variant else None

    def label(self, cfg: Config) -> str:
        """How history and `ffn status` name it: `classifier ffn/kps0.50_ce0.50` for a variant."""
        variant = self.variant_of(cfg)
        return self.name if variant is None else f"{self.name} {variant}"

    def function(self) -> Callable:
        return resolve(self.run)


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
        ("seed", "data", "model", "stage1", "branches", "dist"),
        ("train", "test"),
        minutes="stage1_minutes",
        files=("model.pretrained",),
    ),
    Stage(
        "cache",
        "cache-features",
        "ffn_dist.stages.cache:cache_features",
        "all",
        _cache_settings,
        ("train", "val", "test"),
        after=("stage1",),
        check="ffn_dist.stages.outputs:check_run_cache",
        # In a run, a cache of older backbones or settings is replaced: they changed on purpose.
        options=(("rebuild", True),),
        minutes="cache_minutes",
    ),
    Stage(
        "classifier",
        "train-classifier",
        "ffn_dist.stages.classifier:train_classifier",
        "one",
        _classifier_settings,
        after=("stage1", "cache"),
        options=(("announce", False),),  # `ffn run` says why it skips or reruns it
        outputs_version=2,  # 2: calibration and the temperature fitted on val in result.json
        minutes="classifier_minutes",
        variant=classifier_variant,
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


def resolve(reference: str) -> Callable:
    """A function named "module:function", imported when it is needed (the run machinery
    imports no stage)."""
    module, name = reference.split(":")
    return getattr(importlib.import_module(module), name)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise FFNError(f"{name}: no such stage; the stages are {', '.join(s.name for s in STAGES)}")


def flatten(node: dict, prefix: str = "") -> dict:
    items = {}
    for key, value in node.items():
        if isinstance(value, dict):
            items.update(flatten(value, f"{prefix}{key}."))
        else:
            items[f"{prefix}{key}"] = value
    return items


def _selected(key: str, names: tuple[str, ...]) -> bool:
    """`key` is one of `names` or inside one; a `*` stands for one name (`branches.*.processes`)."""
    parts = key.split(".")
    return any(
        len(parts) >= len(pattern) and all(p in ("*", k) for p, k in zip(pattern, parts, strict=False))
        for pattern in (name.split(".") for name in names)
    )


def split_digest(cfg: Config, split: str) -> str | None:
    """The sha256 (16 digits) of a split file as the stage reads it now; None where the
    config has no such split. A split that is missing is an error naming it: a record
    describes the inputs a stage read, never a file that was not there."""
    path = split_path(cfg.data, split)
    if path is None:
        return None
    if not path.is_file():
        raise FFNError(f"{path}: split file not found (data.{split}_split)")
    return sha256_file(path)[:16]


def stage_inputs(cfg: Config, name: str) -> dict:
    """What stage `name`'s outputs are made from: its settings, the sha256 of each split
    file it reads, and the outputs of the stages it reads from, as recorded."""
    stage = stage_named(name)
    settings = flatten(dataclasses.asdict(cfg))
    inputs = {
        key: value
        for key, value in settings.items()
        if _selected(key, stage.settings_of(cfg)) and not _selected(key, NOT_INPUTS)
    }
    if stage.outputs_version > 1:  # version 1 adds nothing: identities recorded before stay valid
        inputs["outputs version"] = stage.outputs_version
    for split in stage.splits:
        sha = split_digest(cfg, split)
        if sha is not None:
            inputs[f"data.{split}_split ({split_path(cfg.data, split).name}) sha256"] = sha
    for key in stage.files:
        value = settings[key]
        if value is not None:
            if not Path(value).is_file():
                raise FFNError(f"{value}: file not found ({key})")
            inputs[f"{key} ({Path(value).name}) sha256"] = sha256_file(value)[:16]
    for before in stage.after:
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


# ----------------------------------------------------------------------------- records
def stage_record_path(cfg: Config, name: str) -> Path:
    return record_path(cfg, name, stage_named(name).variant_of(cfg))


def read_record(cfg: Config, name: str) -> dict | None:
    path = stage_record_path(cfg, name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise FFNError(f"{path}: unreadable stage record ({exc}); delete it to run the stage again") from None


def stage_outputs(cfg: Config, name: str) -> dict[str, str]:
    """{file: sha256} of what a completed stage wrote, as the files are now (a file whose
    size and time are as recorded is not read): a replaced checkpoint changes the inputs of
    every stage that reads it."""
    record = read_record(cfg, name)
    if record is None or record.get("status") != "complete":
        stage = stage_named(name)
        raise FFNError(
            f"{stage_record_path(cfg, name)}: stage {stage.label(cfg)} has not completed; "
            f"run `ffn {stage.command}` (or `ffn run`) first"
        )
    root = run_dir(cfg)
    return {
        relative: current_sha(root / relative, recorded if isinstance(recorded, dict) else None)
        for relative, recorded in record["outputs"].items()
    }


def recorded_sha(recorded) -> str:
    """An output's sha256 as its record holds it."""
    return recorded["sha256"] if isinstance(recorded, dict) else recorded


def refuse_other_stage1(cfg: Config) -> None:
    """Stage 1 resumes from its checkpoints: once it has written one, a config that changes
    what it depends on is refused, for every branch at once, naming what differs."""
    record = read_record(cfg, "stage1")
    started = any(path.suffix == ".pt" for b in cfg.branches for path in _files(branch_dir(cfg, b)))
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


def begin_stage(cfg: Config, name: str, freeze: bool = True) -> dict:
    """Record that stage `name` starts with this config (the run started with it, if it
    was not); returns the stage's inputs. Called once the stage has its inputs at hand
    (built-in data written), so that the record holds what it reads. `freeze=False`: a
    driver's point (the run's config with overrides), which leaves the run's config as it is."""
    if freeze:
        start_run(cfg)
    stage = stage_named(name)
    inputs = stage_inputs(cfg, name)
    identity = stage_identity(cfg, name, inputs)
    record = {"stage": name, "variant": stage.variant_of(cfg), "status": "running", "identity": identity}
    record.update(inputs=inputs, config=config_id(cfg), started=now())
    write_json(stage_record_path(cfg, name), record)
    log_event(cfg, stage.label(cfg), "started", identity=identity)
    return inputs


def finish_stage(cfg: Config, name: str, outputs: list[Path]) -> None:
    """Record stage `name` complete: the sha256 and stamp of each output, which later stages
    and `ffn status` read."""
    record = read_record(cfg, name) or {}
    inputs = record.get("inputs") or stage_inputs(cfg, name)
    root = run_dir(cfg)
    record.update(
        stage=name,
        status="complete",
        identity=stage_identity(cfg, name, inputs),
        inputs=inputs,
        config=config_id(cfg),
        outputs={str(Path(p).relative_to(root)): file_record(p) for p in outputs},
        finished=now(),
    )
    write_json(stage_record_path(cfg, name), record)
    log_event(cfg, stage_named(name).label(cfg), "complete", identity=record["identity"])


@contextmanager
def recorded(cfg: Config, name: str, world=None):
    """Whatever stops the block is recorded as stage `name`'s end: a stop request as a stop,
    an error with its message (`ffn status` shows it). With the stage's `world`: where its
    ranks run is logged and recorded first, and a collective that fails because a peer went
    away is recorded naming the peer's host (`lost_host`)."""
    from ffn_dist.stopping import StopRequested, Terminated

    label = stage_named(name).label(cfg)
    try:
        if world is None:
            yield
        else:
            from ffn_dist.distributed import naming_lost_peers

            if world.rank == 0:
                print(f"[{name}] {world.describe()}", flush=True)
                hosts = {p.host: list(world.ranks_on(p.host)) for p in world.placements}
                log_event(cfg, label, "placed", hosts=hosts)
            with naming_lost_peers(world):
                yield
    except (StopRequested, Terminated) as stop:
        note_end(cfg, label, "stopped", reason=str(stop) or type(stop).__name__)
        raise
    except Exception as exc:
        error = str(exc) if isinstance(exc, FFNError) else f"{type(exc).__name__}: {exc}"
        host = getattr(exc, "host", None)  # distributed.PeerLost: the host it lost
        lost = {"lost_host": host, "lost_ranks": list(exc.ranks)} if host else {}
        note_end(cfg, label, "failed", error=error, **lost)
        raise


def stage_state(cfg: Config, name: str, verify: bool = False) -> tuple[str, str]:
    """(state, detail) of a stage: complete, stale (what changed), failed (why), running,
    not started. `verify`: the stage's check reads its outputs whole (the cache's shards)."""
    stage = stage_named(name)
    record = read_record(cfg, name)
    if record is None:
        return "not started", ""
    if record.get("status") != "complete":
        failure = last_failure(cfg, stage.label(cfg))
        return ("failed", failure) if failure else ("incomplete", "started, not finished")
    try:
        inputs = stage_inputs(cfg, name)
    except FFNError as exc:
        return "stale", str(exc)
    changes = describe_changes(record["inputs"], inputs, then="when it ran")
    if changes:
        return "stale", "; ".join(changes)
    for relative, sha in stage_outputs(cfg, name).items():
        if sha != recorded_sha(record["outputs"][relative]):
            change = "is missing" if sha == "missing" else "changed since the stage wrote it"
            return "stale", f"{run_dir(cfg) / relative} {change}"
    if stage.check:
        try:
            resolve(stage.check)(cfg, verify)
        except FFNError as exc:
            return "stale", str(exc)
    return "complete", ""


def is_complete(cfg: Config, name: str) -> bool:
    return stage_state(cfg, name)[0] == "complete"


def run_stage(cfg: Config, name: str) -> None:
    """Stage `name` of a run, with the options it takes in a run (the same on one machine
    and on SLURM)."""
    stage = stage_named(name)
    stage.function()(cfg, **dict(stage.options))
