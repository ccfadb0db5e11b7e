"""The one config schema: typed dataclasses, loaded from YAML, `a.b.c=value` overrides.

Every field carries its default and what values it accepts; `load_config` refuses unknown
keys (suggesting the nearest valid one), wrong types and out-of-range values, naming the
key's full dotted path. `configs/*.yaml` are the readable defaults for each setting; each
field's `doc` is what `ffn show-config CONFIG --explain` prints and what the configuration
reference of the documentation is generated from (`settings_reference`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ffn_dist.errors import FFNError
from ffn_dist.files import write_text
from ffn_dist.fusion import DIGITS, check_weights, equal_weights, weighed
from ffn_dist.models.backbones import BACKBONES
from ffn_dist.registry import HEADS, LOSSES, METHODS, REWEIGHTABLE_LOSSES, SAMPLERS


class ConfigError(FFNError):
    pass


def opt(default, *, choices=None, ge=None, gt=None, le=None, lt=None, doc=""):
    """A config field with its allowed values and what it means (`doc`)."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = opt("data/demo", doc="data root; split-file paths are relative to it")
    builtin: str | None = opt(
        None, choices=["digits"], doc="write this built-in dataset into `root` if absent"
    )
    train_split: str = opt("train.txt", doc="split file, relative to root unless absolute")
    val_split: str | None = opt(None, doc="optional validation split file")
    test_split: str = opt("test.txt", doc="split file the reports are computed on")
    num_classes: int = opt(10, ge=1, doc="labels are 0..num_classes-1 in every split file")
    backend: str = opt(
        "dali",
        choices=["dali", "torch", "memory"],
        doc="dali (GPU decoding), torch (PIL workers), memory (decoded once, held on the device)",
    )
    train_crop: str = opt(
        "pad_crop",
        choices=["pad_crop", "random_resized_crop"],
        doc="pad_crop: CIFAR pad-4 + random crop; random_resized_crop: ImageNet",
    )
    image_size: int = opt(32, ge=8, doc="side of the network input")
    resize_size: int = opt(32, ge=8, doc="eval: shorter side resized to this, then centre crop")
    color_jitter: float = opt(0.0, ge=0.0, le=1.0, doc="brightness/contrast/saturation jitter")
    mean: list[float] = opt([0.4914, 0.4822, 0.4465], doc="per-channel mean, 0..1 scale")
    std: list[float] = opt([0.2470, 0.2435, 0.2616], doc="per-channel std, 0..1 scale")
    batch_size: int = opt(
        64,
        ge=1,
        doc="the recipe's batch: images per stage-1 optimizer step of each branch, split over its processes",
    )
    num_threads: int = opt(2, ge=1, doc="decoding threads (DALI) or workers (torch) per process")
    on_bad_image: str = opt(
        "error", choices=["error", "skip"], doc="skip: exclude unreadable images up front"
    )
    memory_limit_gb: float = opt(
        4.0, gt=0.0, doc="memory backend: the most a split's decoded pixels may take (also <= half the free)"
    )

    def validate(self, prefix: str) -> None:
        for name in ("mean", "std"):
            if len(getattr(self, name)) != 3:
                raise ConfigError(f"{prefix}{name}: expected 3 values (RGB), got {getattr(self, name)}")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"{prefix}std: every value must be > 0, got {self.std}")
        if self.backend == "memory" and self.train_crop != "pad_crop":
            raise ConfigError(
                f"{prefix}backend: memory supports {prefix}train_crop=pad_crop (CIFAR-sized images), "
                f"got {self.train_crop}; use dali or torch for {self.train_crop}"
            )
        if self.resize_size < self.image_size:
            raise ConfigError(
                f"{prefix}resize_size: must be >= image_size ({self.image_size}), got {self.resize_size}"
            )


@dataclass
class ModelConfig:
    arch: str = opt(
        "resnet32",
        choices=BACKBONES,
        doc="every branch's backbone, by name (models/backbones.py): resnet32 (CIFAR), torchvision's ResNets",
    )
    pretrained: str | None = opt(
        None,
        doc="initialise both trunks from this local file (torchvision state dict, or a stage-1 checkpoint); "
        "its contents are part of stage 1's identity",
    )
    precision: str = opt(
        "auto", choices=["auto", "fp32", "bf16"], doc="auto: bf16 autocast on CUDA, fp32 on CPU"
    )


@dataclass
class Stage1Config:
    epochs: int = opt(200, ge=1, doc="training epochs of every branch's backbone")
    lr: float = opt(0.1, gt=0.0, doc="the recipe's base learning rate, for the batch data.batch_size")
    momentum: float = opt(0.9, ge=0.0, le=1.0, doc="SGD momentum")
    weight_decay: float = opt(2e-4, ge=0.0, doc="SGD weight decay")
    warmup_epochs: int = opt(5, ge=0, doc="linear warm-up length")
    schedule: str = opt(
        "step",
        choices=["step", "cosine"],
        doc="after the warm-up: step (lr_factors from lr_milestones) or cosine decay to 0 at the last epoch",
    )
    lr_milestones: list[float] = opt(
        [160, 180], doc="epochs (may be fractional) at which lr_factors take effect"
    )
    lr_factors: list[float] = opt([0.1, 0.01], doc="lr multipliers (of the base lr)")
    mixup_alpha: float = opt(1.0, ge=0.0, doc="0 switches mixup off")
    kps_max_m: float = opt(0.2, ge=0.0, doc="KPS: the rarest class's margin")
    kps_s: float = opt(15.0, gt=0.0, doc="KPS: the logit scale s")
    kps_ga_epoch: int = opt(120, ge=0, doc="epoch from which KPS uses per-class scales")
    ldam_max_m: float = opt(0.5, ge=0.0, doc="loss ldam: the rarest class's margin")
    ldam_s: float = opt(30.0, gt=0.0, doc="loss ldam: the logit scale s")
    focal_gamma: float = opt(2.0, ge=0.0, doc="loss focal: the focusing exponent (0: cross-entropy)")
    class_balanced_beta: float = opt(
        0.9999, ge=0.0, lt=1.0, doc="loss class_balanced_ce: weights (1 - beta) / (1 - beta^n_c)"
    )
    logit_adjusted_tau: float = opt(1.0, ge=0.0, doc="loss logit_adjusted: CE on logits + tau log(prior)")
    cosine_s: float = opt(
        16.0, gt=0.0, doc="a cosine head under a loss without its own scale: the cosines are scaled by this"
    )
    drw_from: float = opt(
        0.8,
        ge=0.0,
        le=1.0,
        doc="a branch with drw: class-balanced loss weights from this fraction of the epochs",
    )
    lr_reference_batch: int | None = opt(
        None,
        ge=1,
        doc="linear scaling rule: stage1.lr is for a batch of this size, scaled by data.batch_size / it "
        "(null: stage1.lr as it is)",
    )
    accumulation: int | None = opt(
        1,
        ge=1,
        doc="micro-batches per optimizer step in each process (gradient accumulation); "
        "null: the fewest whose micro-batch is at most max_micro_batch",
    )
    max_micro_batch: int = opt(
        256, ge=1, doc="accumulation null: the largest micro-batch a process runs (what fits in its memory)"
    )
    eval_every: int = opt(10, ge=1, doc="evaluate on the test split every N epochs (and at the end)")
    checkpoint_every: int = opt(10, ge=1, doc="checkpoint every N epochs (and at the end)")
    keep_checkpoints: int = opt(3, ge=1, doc="newest checkpoints kept per branch")
    log_every: int = opt(20, ge=1, doc="console/TensorBoard interval in steps")

    def validate(self, prefix: str) -> None:
        if self.schedule == "cosine" and self.lr_milestones:
            raise ConfigError(
                f"{prefix}lr_milestones: a cosine schedule has none, got {self.lr_milestones}; "
                f"set {prefix}lr_milestones=[] {prefix}lr_factors=[] or {prefix}schedule=step"
            )
        if len(self.lr_milestones) != len(self.lr_factors):
            raise ConfigError(
                f"{prefix}lr_factors: expected one factor per milestone "
                f"({len(self.lr_milestones)}), got {len(self.lr_factors)}"
            )
        if self.lr_milestones != sorted(set(self.lr_milestones)):
            raise ConfigError(
                f"{prefix}lr_milestones: expected strictly increasing epochs, got {self.lr_milestones}"
            )


GRID = "searched on val, the best val top-1 kept (one value: used as is; no val split: the published default)"


@dataclass
class TauNormConfig:
    tau: list[float] = opt([round(0.1 * i, 1) for i in range(11)], ge=0.0, doc=f"w_c / |w_c|^tau; {GRID}")


@dataclass
class LogitAdjustmentConfig:
    tau: list[float] = opt([0.25 * i for i in range(9)], ge=0.0, doc=f"logits - tau log(prior); {GRID}")


@dataclass
class WeightBalancingConfig:
    weight_decay: list[float] = opt([5e-4, 5e-3, 5e-2], ge=0.0, doc=f"its tuned weight decay; {GRID}")
    max_norm: list[float] = opt(
        [0.1, 0.5, 1.0],
        ge=0.0,
        le=1.0,
        doc=f"MaxNorm's radius, min + max_norm (max - min) of ERM's row norms; {GRID}",
    )


@dataclass
class MislasConfig:
    head: list[float] = opt(
        [0.1, 0.2, 0.3, 0.4], ge=0.0, le=1.0, doc=f"smoothing of the most frequent class; {GRID}"
    )
    tail: list[float] = opt([0.0, 0.1], ge=0.0, le=1.0, doc=f"smoothing of the rarest class; {GRID}")


@dataclass
class DisalignConfig:
    rho: list[float] = opt([0.5, 1.0, 1.5], ge=0.0, doc=f"generalised re-weighting (1/r_c)^rho; {GRID}")


@dataclass
class LdamDrwConfig:
    drw_from: float = opt(
        0.8,
        ge=0.0,
        le=1.0,
        doc="class-balanced loss weights from this fraction of the epochs (160 of 200 in the paper)",
    )


@dataclass
class Stage2Config:
    method: str = opt(
        "ffn",
        choices=METHODS,
        doc="the classifier stage 2 trains on the cache (ffn: the paper's LDAM cosine classifier); "
        "the report and the export are this one's (docs/stages.md lists them)",
    )
    seed: int | None = opt(None, ge=0, doc="stage 2's seed (initialisation, sampling); null: the run's seed")
    select: str = opt(
        "auto",
        choices=["auto", "val", "defaults"],
        doc="where hyperparameters are chosen: val (auto: where the run has a val split), "
        "or the published defaults",
    )
    epochs: int = opt(30, ge=1, doc="classifier epochs on the cache")
    batch_size: int = opt(64, ge=1, doc="rows per classifier step")
    lr: float = opt(0.1, gt=0.0, doc="base learning rate (cosine decay)")
    momentum: float = opt(0.9, ge=0.0, le=1.0, doc="SGD momentum")
    weight_decay: float = opt(2e-4, ge=0.0, doc="SGD weight decay")
    fusion: dict[str, float] = opt(
        {"ce": 0.5, "kps": 0.5},  # equal weights on the paper's pair, as a file without it has
        ge=0.0,
        le=1.0,
        doc="each branch's weight in the fused embedding, on the simplex (they sum to 1), summed in "
        "this order; a file without it: equal weights",
    )
    ldam_max_m: float = opt(0.5, ge=0.0, doc="LDAM (ffn, ldam_drw): the rarest class's margin")
    ldam_s: float = opt(30.0, gt=0.0, doc="LDAM (ffn, ldam_drw): the logit scale s")
    device: str = opt(
        "auto",
        choices=["auto", "cpu", "cuda"],
        doc="auto: a GPU for classifiers of 65,536+ weights (ImageNet-LT), the CPU for small ones (CIFAR)",
    )
    tau_norm: TauNormConfig = field(default_factory=TauNormConfig)
    logit_adjustment: LogitAdjustmentConfig = field(default_factory=LogitAdjustmentConfig)
    weight_balancing: WeightBalancingConfig = field(default_factory=WeightBalancingConfig)
    mislas: MislasConfig = field(default_factory=MislasConfig)
    disalign: DisalignConfig = field(default_factory=DisalignConfig)
    ldam_drw: LdamDrwConfig = field(default_factory=LdamDrwConfig)

    def validate(self, prefix: str) -> None:
        for section in dataclasses.fields(self):
            grid = getattr(self, section.name)
            for key in dataclasses.fields(grid) if dataclasses.is_dataclass(grid) else ():
                if isinstance(getattr(grid, key.name), list) and not getattr(grid, key.name):
                    raise ConfigError(f"{prefix}{section.name}.{key.name}: expected at least one value")


@dataclass
class CacheConfig:
    train_views: int = opt(
        1, ge=1, doc="views per training image: view 0 the eval transform, the rest train-augmented"
    )
    store: str = opt(
        "normalized",
        choices=["normalized", "fused"],
        doc="normalized: each branch's unit embedding (the fusion can change later); fused: only z "
        "(a fraction of the size)",
    )
    dtype: str = opt(
        "fp16",
        choices=["fp16", "fp32"],
        doc="how the training views' embeddings are stored (val and test: fp32, the export's numbers)",
    )
    shard_rows: int = opt(16384, ge=1, doc="rows per shard file; a shard is the unit of resume")
    batch_size: int = opt(256, ge=1, doc="images per forward pass while extracting")


@dataclass
class DistConfig:
    engine: str = opt("ddp", choices=["ddp", "deepspeed"], doc="data parallelism inside each branch's group")
    nproc: int = opt(2, ge=1, doc="processes `ffn run` starts for stage 1")
    zero_stage: int = opt(0, ge=0, le=2, doc="DeepSpeed ZeRO stage")
    timeout_s: int = opt(
        300,
        ge=10,
        doc="seconds the rendezvous and every collective wait for a peer: a lost host ends the job "
        "in this time (a checkpoint taking longer than this on one rank also fails)",
    )


@dataclass
class BranchConfig:
    """One stage-1 backbone: how it is trained, and its share of the processes."""

    loss: str = opt("ce", choices=LOSSES, doc="its loss (registry.py: LOSSES)")
    head: str = opt("linear", choices=HEADS, doc="its classifier head; kps and ldam need cosine")
    sampler: str = opt(
        "instance",
        choices=SAMPLERS,
        doc="instance: every image once an epoch; class_balanced: classes equally likely; sqrt: a class "
        "as likely as the square root of its count",
    )
    mixup: bool = opt(True, doc="mixup (stage1.mixup_alpha) on its batches")
    drw: bool = opt(
        False, doc="deferred re-weighting: class-balanced loss weights from stage1.drw_from (ce, focal, ldam)"
    )
    processes: int | None = opt(
        None, ge=1, doc="its stage-1 processes; null: an even share of those the other branches leave"
    )

    def validate(self, prefix: str) -> None:
        heads = LOSSES[self.loss].heads
        if self.head not in heads:
            raise ConfigError(
                f"{prefix}head: loss {self.loss} puts its margin on cosine logits, so it needs head "
                f"{' or '.join(heads)}, got {self.head}"
            )
        if self.drw and self.loss not in REWEIGHTABLE_LOSSES:
            raise ConfigError(
                f"{prefix}drw: deferred re-weighting applies to the losses {', '.join(REWEIGHTABLE_LOSSES)}, "
                f"not to {self.loss}"
            )


def describe_branch(branch: BranchConfig) -> str:
    """'kps loss, cosine head' and what differs from instance sampling with mixup."""
    parts = [f"{branch.loss} loss", f"{branch.head} head"]
    parts += [f"{branch.sampler} sampler"] if branch.sampler != "instance" else []
    parts += ["DRW"] if branch.drw else []
    parts += [] if branch.mixup else ["no mixup"]
    return ", ".join(parts)


def paper_branches() -> dict[str, BranchConfig]:
    """The paper's pair: cross-entropy on a linear head, KPS on a cosine head."""
    return {"ce": BranchConfig(loss="ce", head="linear"), "kps": BranchConfig(loss="kps", head="cosine")}


def _check_branches(branches: dict[str, BranchConfig]) -> None:
    if len(branches) < 2:
        raise ConfigError(
            "branches: FFN fuses two branches or more (each with its own loss, head, sampler, mixup "
            f"and processes); got {', '.join(branches) or 'none'}"
        )


def head_branch(cfg: Config) -> str:
    """The branch whose stage-1 head stage 2's cosine classifier starts from: the first with a
    cosine head that the fusion weighs (the paper's KPS branch), else the first with a cosine
    head, else the first. So a fusion that weighs a branch 0 trains exactly as the fusion of
    the others alone."""
    cosine = [name for name, branch in cfg.branches.items() if branch.head == "cosine"]
    used = [name for name in cosine if name in weighed(cfg.stage2.fusion)]
    return (used or cosine or list(cfg.branches))[0]


@dataclass
class LaunchConfig:
    """SLURM resources for `ffn submit`; each can also be set on its command line."""

    partition: str | None = opt(None, doc="SLURM partition (default: the cluster's)")
    account: str | None = opt(None, doc="SLURM account to charge")
    qos: str | None = opt(None, doc="SLURM quality of service")
    constraint: str | None = opt(None, doc="e.g. a GPU model feature")
    nodes: int = opt(1, ge=1, doc="nodes for stage 1 and the cache job")
    min_nodes: int | None = opt(
        None,
        ge=1,
        doc="the fewest nodes stage 1 and the cache may start on, or resume on after a node is lost "
        "(SLURM requeues the job; null: launch.nodes, all of them)",
    )
    gpus_per_node: int = opt(0, ge=0, doc="0: CPU tasks, dist.nproc per node")
    cpus_per_task: int = opt(4, ge=1, doc="CPU cores per task: DALI threads + the training process")
    mem_gb: int | None = opt(None, ge=1, doc="memory per node")
    data_minutes: int = opt(30, ge=1, doc="time limit of the data check (split files, statistics)")
    stage1_minutes: int = opt(2880, ge=1, doc="time limit of one stage-1 allocation; it requeues past it")
    cache_minutes: int = opt(240, ge=1, doc="time limit of the feature-cache job")
    classifier_minutes: int = opt(120, ge=1, doc="time limit of the classifier and the report")
    signal_delay_s: int = opt(120, ge=1, doc="USR2 this long before the time limit: checkpoint and requeue")
    max_requeues: int = opt(5, ge=0, doc="preemptions/time-outs a stage may requeue after")
    sbatch: list[str] = opt([], doc="extra sbatch options as key=value, e.g. exclusive=, mail-type=END")
    setup: list[str] = opt([], doc="shell lines run before the job, e.g. module load cuda")

    def validate(self, prefix: str) -> None:
        if self.min_nodes is not None and self.min_nodes > self.nodes:
            raise ConfigError(f"{prefix}min_nodes: at most launch.nodes ({self.nodes}), got {self.min_nodes}")
        for i, item in enumerate(self.sbatch):
            if "=" not in item or item.startswith("="):
                raise ConfigError(
                    f"{prefix}sbatch[{i}]: expected key=value (value may be empty), got {item!r}"
                )


@dataclass
class Config:
    name: str = opt("demo", doc="the run's name, in reports, plots and SLURM job names")
    output_dir: str = opt("runs/demo", doc="run directory: resolved config, logs, outputs")
    seed: int = opt(0, ge=0, doc="drives initialisation, sampling, augmentation and mixup of every stage")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    branches: dict[str, BranchConfig] = field(
        default_factory=paper_branches,
        metadata={
            "doc": "the stage-1 backbones by name, in rank order (when a file lists none: the paper's pair)"
        },
    )
    stage2: Stage2Config = field(default_factory=Stage2Config)
    cache: CacheConfig = field(default_factory=CacheConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self, prefix: str) -> None:
        _check_branches(self.branches)
        fusion = self.stage2.fusion
        if set(fusion) != set(self.branches):
            extra = [name for name in fusion if name not in self.branches]
            missing = [name for name in self.branches if name not in fusion]
            what = "not a branch" if extra else "no weight for this branch"
            raise ConfigError(
                f"stage2.fusion.{(extra or missing)[0]}: {what}; the fusion weighs each branch once, got "
                f"weights for {', '.join(fusion)} and the branches {', '.join(self.branches)}"
            )
        try:
            check_weights(fusion)
        except FFNError as exc:
            raise ConfigError(f"stage2.fusion: {exc}") from None


# ----------------------------------------------------------------------------- loading

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"mapping of name: {_type_name(typing.get_args(tp)[1])}"
    return "null" if tp is type(None) else tp.__name__


def _coerce(value, tp, key: str):
    """Return `value` as type `tp`, or raise naming `key`; YAML gives `1e-4` as a string."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is dict:
        if not isinstance(value, dict) or not value:
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        inner = typing.get_args(tp)[1]
        return {_name(n, key): _coerce(v, inner, f"{key}.{n}") for n, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if ok:
        return value
    if tp is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _check_range(value, meta: dict, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")  # a registry's names are read at each check
    if choices and value not in choices:
        allowed = ", ".join(map(str, choices))
        raise ConfigError(f"{key}: got {value!r}, allowed values: {allowed}")
    tests = {
        "ge": (">=", lambda b: value >= b),
        "gt": (">", lambda b: value > b),
        "le": ("<=", lambda b: value <= b),
        "lt": ("<", lambda b: value < b),
    }
    for name, (op, holds) in tests.items():
        bound = meta.get(name)
        if bound is not None and isinstance(value, (int, float)) and not holds(bound):
            raise ConfigError(f"{key}: got {value!r}, expected a value {op} {bound}")


# Keys an earlier release had, and where their setting is now.
MOVED = {
    "dist.kps_ranks": "branches.kps.processes",
    "stage2.w1": "stage2.fusion.kps (stage2.fusion: a weight per branch)",
    "stage2.w2": "stage2.fusion.ce (stage2.fusion: a weight per branch)",
    "stage1.scale_lr": "stage1.lr_reference_batch (the linear scaling rule, explicit)",
}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _section_map(tp):
    """The settings class of a `dict[str, Settings]` field (`branches`), else None."""
    if typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
        return typing.get_args(tp)[1]
    return None


def _name(name, key: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{key}: names are lower-case letters, digits and _, got {name!r}")
    return name


def _build_map(inner, given, key: str) -> dict:
    """A named section of settings per entry: `branches: {ce: {...}, kps: {...}}`."""
    if not isinstance(given, dict) or not given:
        raise ConfigError(f"{key}: expected a mapping of name: settings, got {given!r}")
    built = {}
    for name, body in given.items():
        built[_name(name, key)] = _build(inner, body or {}, f"{key}.{name}.")
    return built


def _unknown_key(prefix: str, key, fields) -> ConfigError:
    moved = MOVED.get(f"{prefix}{key}")
    if moved:
        return ConfigError(f"{prefix}{key}: no longer a setting; it is now {moved}")
    near = difflib.get_close_matches(str(key), fields, n=1)
    hint = f" (did you mean '{prefix}{near[0]}'?)" if near else ""
    return ConfigError(f"{prefix}{key}: unknown key{hint}; valid keys here: {', '.join(fields)}")


def _build(cls, raw: dict, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise _unknown_key(prefix, key, fields)
    values = {}
    for name, f in fields.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            values[name] = _build(tp, raw.get(name, {}) or {}, key + ".")
        elif _section_map(tp):
            given = raw[name] if name in raw else _as_raw(f.default_factory())
            values[name] = _build_map(_section_map(tp), given, key)
        elif name in raw:
            values[name] = _coerce(raw[name], tp, key)
            _check_range(values[name], f.metadata, key)
            if isinstance(values[name], list):
                for i, item in enumerate(values[name]):
                    _check_range(item, f.metadata, f"{key}[{i}]")
            if isinstance(values[name], dict):
                for item, value in values[name].items():
                    _check_range(value, f.metadata, f"{key}.{item}")
    obj = cls(**values)
    for name in fields:  # defaults in their declared types too ([160, 180] as floats)
        if name not in raw and not dataclasses.is_dataclass(hints[name]) and not _section_map(hints[name]):
            setattr(obj, name, _coerce(getattr(obj, name), hints[name], prefix + name))
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def parse_override(text: str) -> tuple[list[str], object]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"override {text!r}: expected the form a.b.c=value")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


def _apply_override(raw: dict, path: list[str], value) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
        node = child
    node[path[-1]] = value


def shipped_configs() -> Path:
    """The configs ffn-dist ships: inside the installed package (a wheel), else the
    repository's top-level configs/ (a checkout, editable or on PYTHONPATH)."""
    package = Path(__file__).resolve().parent
    inside = package / "configs"
    return inside if inside.is_dir() else package.parent / "configs"


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file, or the name of a shipped one (`demo` for its demo.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs() / f"{path.name}.yaml"
    if path.suffix == "" and len(path.parts) == 1 and shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in shipped_configs().glob("*.yaml")))
    raise ConfigError(f"{path}: config file not found (the shipped configs can be named: {names})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Load a YAML config (a path, or a shipped config's name; the defaults when `path` is
    None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {raw!r}")
    # A file that lists no branches trains the paper's pair, which overrides then change.
    raw.setdefault("branches", _as_raw(paper_branches()))
    _migrate(raw)
    for text in overrides:
        _apply_override(raw, *parse_override(text))
    _default_fusion(raw)
    try:
        return _build(Config, raw, "")
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def _allowed(tp, meta: dict) -> str:
    if meta.get("choices"):
        return ", ".join(map(str, meta["choices"]))
    bounds = [
        f"{op} {meta[k]}"
        for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if meta.get(k) is not None
    ]
    return " and ".join([_type_name(tp), *bounds]) if bounds else _type_name(tp)


def yaml_line(value) -> str:
    """A value as YAML writes it in one line (`null`, `[0.5, 0.5]`, `{kps: 0.5, ce: 0.5}`): a
    default in the settings reference, a value in an override."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf)
    return text.split("\n...")[0].strip()


def describe_settings(cfg: Config | None = None) -> list[dict]:
    """Every setting of the schema, in order: key, value (of `cfg`, else the default),
    allowed values and what it means."""
    cfg = cfg if cfg is not None else Config()
    rows = []

    def walk(node, prefix: str) -> None:
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            if _section_map(hints[f.name]):
                for name, section in value.items():
                    walk(section, f"{prefix}{f.name}.{name}.")
                continue
            allowed = _allowed(hints[f.name], f.metadata)
            rows.append(
                {"key": prefix + f.name, "value": value, "allowed": allowed, "doc": f.metadata.get("doc", "")}
            )

    walk(cfg, "")
    return rows


def explain(cfg: Config) -> str:
    """`ffn show-config CONFIG --explain`: each setting's value, what it accepts, what it means."""
    lines = []
    for row in describe_settings(cfg):
        doc = f"  # {row['doc']}" if row["doc"] else ""
        lines.append(f"{row['key']}: {yaml_line(row['value'])}{doc}")
        lines.append(f"    allowed: {row['allowed']}")
    return "\n".join(lines)


def settings_reference() -> str:
    """The configuration reference of the documentation: a Markdown table per section."""
    out, section = [], None
    for row in describe_settings():
        head = row["key"].split(".")[0] if "." in row["key"] else "run"
        if head != section:
            section = head
            out += ["", f"### `{section}`", "", "| key | default | allowed | meaning |", "|---|---|---|---|"]
        default = yaml_line(row["value"])
        cells = [f"`{row['key']}`", f"`{default}`", row["allowed"], row["doc"].replace("|", "\\|")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out).strip() + "\n"


def with_settings(cfg: Config, settings: dict) -> Config:
    """`cfg` with some settings changed ({"stage2.method": "crt", ...}), validated like a loaded one:
    how the drivers (--sweep, --methods, --seeds) run a stage under overrides."""
    raw = dataclasses.asdict(cfg)
    for key, value in settings.items():
        _apply_override(raw, key.split("."), value)
    return _build(Config, raw, "")


def _migrate(raw: dict) -> None:
    """A file of an earlier release (a run's frozen config) read as this one: its
    `dist.kps_ranks` is the KPS branch's processes, its `stage2.w1` and `w2` the KPS and CE
    branches' fusion weights. (An override of them is refused: MOVED.)"""
    dist = raw.get("dist")
    if isinstance(dist, dict) and "kps_ranks" in dist:
        kps_ranks = dist.pop("kps_ranks")
        kps = raw["branches"].get("kps") if isinstance(raw["branches"], dict) else None
        if kps_ranks is not None and isinstance(kps, dict):
            kps["processes"] = kps_ranks
    stage2 = raw.get("stage2")
    if isinstance(stage2, dict) and "w1" in stage2 and "fusion" not in stage2:
        w1 = stage2.pop("w1")
        w2 = stage2.pop("w2", None)  # left out: 1 - w1, as that release's sweep derived it
        stage2["fusion"] = {
            "kps": w1,
            "ce": round(1.0 - w1, DIGITS) if w2 is None and isinstance(w1, (int, float)) else w2,
        }


def _default_fusion(raw: dict) -> None:
    """A file without `stage2.fusion` weighs its branches equally."""
    branches, stage2 = raw.get("branches"), raw.setdefault("stage2", {})
    if isinstance(stage2, dict) and "fusion" not in stage2 and isinstance(branches, dict) and branches:
        stage2["fusion"] = dict(zip(branches, equal_weights(len(branches)), strict=True))


def _as_raw(sections: dict) -> dict:
    """Named settings sections as the mappings a YAML file holds."""
    return {name: dataclasses.asdict(body) for name, body in sections.items()}


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the fully resolved config (atomically) so a run records what produced it."""
    return write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
