"""Every path of a run directory, built here and nowhere else.

output_dir/
  config.yaml  configs/ID.yaml  history.jsonl      the frozen config and what ran (history)
  stages/NAME.json                                  a stage's record (stages)
  stages/classifier/METHOD/FUSION[_seedS].json      one classifier's record: a stage of variants
  stage1/BRANCH/epoch_NNNN.pt, report.json          stage 1 (checkpoint names: checkpoint.py)
  cache/manifest.json, SPLIT/viewV/partNNNNN.safetensors
  classifier/METHOD/FUSION[_seedS]/                 one classifier: classifier.pt, result.json
  (FUSION: each branch's name and weight, kps0.50_ce0.50)
  classifier/sweep.*, classifier/methods/...        the drivers' tables, built from records
  report/  export/  tensorboard/  slurm/
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ffn_dist.checkpoint import checkpoint_path
from ffn_dist.fusion import fusion_slug

if TYPE_CHECKING:
    from ffn_dist.config import Config

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
REPORT_FILE = "report.json"  # a branch's (stage 1) and the run's (evaluate)
RESULT_FILE, FORM_FILE = "result.json", "classifier.pt"  # a classifier's
MODEL_FILE = "model.json"  # an export's description, which `ffn predict` reads


def run_dir(cfg: Config) -> Path:
    return Path(cfg.output_dir)


def frozen_config_path(cfg: Config) -> Path:
    return run_dir(cfg) / CONFIG_FILE


def kept_config_path(cfg: Config, config_id: str) -> Path:
    return run_dir(cfg) / "configs" / f"{config_id}.yaml"


def history_path(cfg: Config) -> Path:
    return run_dir(cfg) / HISTORY_FILE


def record_path(cfg: Config, name: str, variant: str | None = None) -> Path:
    """A stage's record; a stage of variants (the classifier) keeps one per variant."""
    records = run_dir(cfg) / "stages"
    return records / f"{name}.json" if variant is None else records / name / f"{variant}.json"


def stage1_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "stage1"


def branch_dir(cfg: Config, branch: str) -> Path:
    return stage1_dir(cfg) / branch


def branch_report(cfg: Config, branch: str) -> Path:
    return branch_dir(cfg, branch) / REPORT_FILE


def final_checkpoint(cfg: Config, branch: str) -> Path:
    return checkpoint_path(branch_dir(cfg, branch), cfg.stage1.epochs)


def cache_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "cache"


def classifier_variant(cfg: Config) -> str:
    """Which classifier a config trains: its method, its fusion weight and (when stage 2
    draws from another seed than the run's) its seed. Settings beyond these (epochs, grids)
    are in its identity: a change retrains it in the same place."""
    s2 = cfg.stage2
    seed = "" if s2.seed is None or s2.seed == cfg.seed else f"_seed{s2.seed}"
    return f"{s2.method}/{fusion_slug(s2.fusion)}{seed}"


def classifier_dir(cfg: Config) -> Path:
    return classifier_root(cfg) / classifier_variant(cfg)


def classifier_result(cfg: Config) -> Path:
    return classifier_dir(cfg) / RESULT_FILE


def classifier_form(cfg: Config) -> Path:
    return classifier_dir(cfg) / FORM_FILE


def classifier_root(cfg: Config) -> Path:
    """Where the classifiers and the drivers' tables (sweep, methods, seeds) go."""
    return run_dir(cfg) / "classifier"


def methods_dir(cfg: Config, seed: int | None = None) -> Path:
    """`--methods`' tables (another stage-2 seed's: in seedN/)."""
    out = classifier_root(cfg) / "methods"
    return out if seed is None or seed == cfg.seed else out / f"seed{seed}"


def report_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "report"


def run_report(cfg: Config) -> Path:
    return report_dir(cfg) / REPORT_FILE


def run_report_tables(cfg: Config) -> Path:
    """The report's tables in Markdown, beside run_report."""
    return report_dir(cfg) / "report.md"


def data_report(cfg: Config) -> Path:
    """The data stage's statistics of every split."""
    return run_dir(cfg) / "data_report.json"


def export_dir(cfg: Config) -> Path:
    return run_dir(cfg) / "export"


def export_description(directory: Path) -> Path:
    """An export's model.json (in the run's export/, or wherever a user copied it)."""
    return Path(directory) / MODEL_FILE


def tensorboard_dir(cfg: Config, part: str) -> Path:
    return run_dir(cfg) / "tensorboard" / part


def plan_path(cfg: Config) -> Path:
    """`ffn plan`'s prediction, which `ffn submit --plan` and `ffn status` read."""
    return run_dir(cfg) / "plan.json"


def slurm_dir(cfg: Config) -> Path:
    return run_dir(cfg).resolve() / "slurm"
