"""`ffn train-classifier CONFIG`: the classifier stage, the configured method on the cache.

`stage2.method` (default `ffn`: the paper's LDAM cosine classifier) is trained on the fused
embeddings z = sum_b w_b f̂_b (stage2.fusion) of the cached training views, its hyperparameters chosen
on the val split (`stage2.select`), and scored on view 0 of the val and test splits. Each
classifier (method, fusion, seed: `paths.classifier_variant`) is a record of this stage and a
directory of its own (`classifier.pt`, its LinearForm; `result.json`, its accuracies): a
complete one is reused, one whose inputs changed is trained again, saying why. The drivers
(`--sweep`, `--methods`, `--seeds`: drivers.py) run this stage under overrides.
"""

from __future__ import annotations

import itertools

import torch

from ffn_dist.cache.store import FeatureCache
from ffn_dist.checkpoint import load_checkpoint
from ffn_dist.config import Config, head_branch, with_settings
from ffn_dist.errors import FFNError
from ffn_dist.files import save_torch, write_json
from ffn_dist.metrics import fit_temperature
from ffn_dist.models.heads import LinearForm
from ffn_dist.registry import METHODS
from ffn_dist.run.paths import classifier_form, classifier_result, final_checkpoint
from ffn_dist.run.stages import begin_stage, finish_stage, recorded, stage_identity, stage_named, stage_state
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.epochs import cached_logits, evaluate_cached, stage2_seed
from ffn_dist.stages.methods import FITS, Fitting, grid_of, probability_scale


def initial_head_weight(cfg: Config) -> torch.Tensor:
    """The stage-2 cosine classifier starts from a stage-1 head: `config.head_branch`'s."""
    state = load_checkpoint(final_checkpoint(cfg, head_branch(cfg)), stage_identity(cfg, "stage1"))
    return state["model"]["head.weight"]


def selection_split(cfg: Config, has_val: bool) -> str | None:
    """The split hyperparameters are chosen on: 'val', or None for the published defaults."""
    select = cfg.stage2.select
    if select == "defaults":
        return None
    if has_val:
        return "val"
    if select == "val":
        raise FFNError(
            "stage2.select=val: this run has no val split (data.val_split is null, so the cache has none). "
            "Make one (`ffn splits make-lt ... --val-per-class N`) and set data.val_split, or use "
            "stage2.select=defaults"
        )
    return None


def candidates(cfg: Config, select_on: str | None) -> list[dict]:
    """The hyperparameters to try: every point of the grids where they are chosen on val;
    else one, each grid's single value or the published default."""
    grid, defaults = grid_of(cfg, cfg.stage2.method), METHODS[cfg.stage2.method].defaults
    if select_on is None:
        return [{k: values[0] if len(values) == 1 else defaults[k] for k, values in grid.items()}]
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def fit_classifier(
    cfg: Config, cache: FeatureCache | None = None, freeze: bool = True, announce: bool = True
) -> dict:
    """The classifier `cfg` configures: reused where its record is current, else trained and
    recorded; returns its result. `cache`: the run's, opened (and verified) by a caller that
    fits many; `freeze`: this is the run's own config (a driver's points are not);
    `announce`: say why it is skipped or trained again (`ffn run` has said it already)."""
    label = stage_named("classifier").label(cfg)
    state, detail = stage_state(cfg, "classifier")
    if state == "complete":
        if announce:
            print(f"{label}: complete, skipped", flush=True)
        return read_result(cfg)
    if state in ("stale", "failed") and announce:
        print(f"{label}: runs again ({state}: {detail})", flush=True)
    cache = cache or open_run_cache(cfg)
    with recorded(cfg, "classifier"):
        begin_stage(cfg, "classifier", freeze=freeze)
        result, form = _fit(cfg, cache)
        save_torch(classifier_form(cfg), form.state())
        write_json(classifier_result(cfg), result)
        finish_stage(cfg, "classifier", [classifier_form(cfg), classifier_result(cfg)])
    return result


def _fit(cfg: Config, cache: FeatureCache) -> tuple[dict, LinearForm]:
    s2 = cfg.stage2
    fit = FITS[s2.method]
    select_on = selection_split(cfg, "val" in cache.splits)
    tries = candidates(cfg, select_on)

    def point(name: str) -> LinearForm:
        other = with_settings(cfg, {"stage2.method": name})
        fit_classifier(other, cache, freeze=False)
        return load_form(other)

    fitting = Fitting(cfg, cache, point, lambda: initial_head_weight(cfg), verbose=len(tries) == 1)
    scored = []
    for chosen in tries:
        form = fit(fitting, **chosen).to(fitting.device)
        val = _score(form, cache, "val", fitting) if select_on else None
        scored.append((val["top1"] if val else 0.0, chosen, form))
    _, chosen, form = max(scored, key=lambda item: item[0])  # the first of the best, on a tie
    temperature = _temperature(form, cache, fitting, probability_scale(cfg))
    result = {
        "method": s2.method,
        "fusion": dict(fitting.loop.fusion),
        "seed": stage2_seed(cfg),
        "epochs": s2.epochs,
        "chosen": {**chosen, "selected_on": select_on or "published defaults"},
        "train_counts": fitting.counts.tolist(),
        "temperature": temperature,
        "test": _score(form, cache, "test", fitting, temperature["value"]),
        "val": _score(form, cache, "val", fitting, temperature["value"]),
    }
    shown = ", ".join(f"{k} {v:g}" for k, v in chosen.items())
    print(
        f"[{fitting.name}] test top-1 {result['test']['top1']:.2f} top-5 {result['test']['top5']:.2f}"
        + (f" ({shown}, {result['chosen']['selected_on']})" if shown else ""),
        flush=True,
    )
    return result, form.cpu()


def _score(
    form: LinearForm, cache: FeatureCache, split: str, fitting: Fitting, temperature: float | None = None
) -> dict | None:
    if split not in cache.splits:
        return None
    scale = probability_scale(fitting.cfg)
    return evaluate_cached(
        form, cache.splits[split], fitting.loop.fusion, fitting.counts, fitting.device, scale, temperature
    )


def _temperature(form: LinearForm, cache: FeatureCache, fitting: Fitting, scale: float) -> dict:
    """Temperature scaling: the one scalar dividing the classifier's logits that minimises its
    NLL on val; without a val split, not fitted, and why."""
    if "val" not in cache.splits:
        return {"value": None, "fitted": "not fitted: the run has no val split (data.val_split is null)"}
    logits, labels = cached_logits(form, cache.splits["val"], fitting.loop.fusion, fitting.device)
    return {"value": fit_temperature(scale * logits, labels), "fitted": "on val (minimum NLL)"}


def read_result(cfg: Config) -> dict:
    """The accuracies of the classifier `cfg` configures (its stage must be complete)."""
    import json

    return json.loads(classifier_result(cfg).read_text())


def load_form(cfg: Config) -> LinearForm:
    """The classifier `cfg` configures, as one layer over z."""
    return LinearForm.from_state(torch.load(classifier_form(cfg), weights_only=True))


@holds_run_dir
def train_classifier(cfg: Config, announce: bool = True) -> dict:
    """The classifier stage of a run: the configured classifier."""
    return fit_classifier(cfg, announce=announce)
