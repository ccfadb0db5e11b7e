"""`ffn train-classifier CONFIG --methods all [--seeds N]`: classifier methods side by side on the cache.

Every method runs on each feature source of one cache: the CE branch's unit embeddings, the
KPS branch's, and the fused ones (w1 * f̂_kps + w2 * f̂_ce, w1 chosen on val by the FFN
sweep, else the config's). Hyperparameters are chosen on the val split, never on test;
without a val split the published defaults are used and the report says so. Every method
that trains does so in one loop (`CachedEpochs`) on the stage-2 recipe (SGD with momentum,
cosine decay, stage2.epochs, stage2.lr), so they differ only in what the registry says.

  ffn       FFN's cosine classifier: KPS-head init, LDAM, class-balanced (stage 2 itself)
  joint     the branch's own stage-1 head, as trained (CE: stage 1's evaluation; KPS: its
            cosine head on the cached features; fused: none)
  erm       a linear classifier fit with instance-balanced cross-entropy on the frozen
            features: the joint classifier of frozen features, and the base of the
            post-hoc methods and of those that fine-tune it
  crt       classifier re-training (Kang et al. 2020): a new linear classifier, randomly
            initialised, cross-entropy, class-balanced sampling
  lws       learnable weight scaling (Kang et al.): erm frozen, one scale per class learned
            with class-balanced sampling (logits x scale)
  tau_norm  tau-normalisation (Kang et al.): erm's w_c / ||w_c||^tau, no bias; tau in [0, 1]
  ncm       nearest class mean: cosine to the mean of each class's unit training features
  logit_adjustment  post-hoc logit adjustment (Menon et al. 2021): erm's logits - tau log pi
  balanced_softmax  Balanced Softmax (Ren et al. 2020): a new linear classifier trained with
            cross-entropy on logits + log n_y, instance-balanced; predicts with the logits
  weight_balancing  weight balancing's stage 2 (Alshammari et al. 2022): erm fine-tuned with
            the class-balanced loss (mean of w_y CE, Cui et al.'s weights), a tuned weight
            decay, and MaxNorm: after every step each class vector is projected to norm at
            most delta = min + max_norm (max - min) of erm's row norms
  mislas    MiSLAS's label-aware smoothing (Zhong et al. 2021): erm fine-tuned with
            class-balanced sampling against targets smoothed by epsilon_y, from the tail's
            value at the rarest class to the head's at the most frequent (concave). Its
            shifted batch norm re-estimates the backbone's statistics: it needs the
            backbone, so it has no place on a cache of frozen embeddings
  disalign  DisAlign (Zhang et al. 2021): erm frozen, a per-class magnitude and margin and a
            learned confidence gate (models.gated_logits), trained with its generalised
            re-weighting (cross-entropy weighted by (1 / r_c)^rho), instance-balanced
  ldam_drw  LDAM-DRW (Cao et al. 2019) on the frozen features: FFN's cosine classifier
            (KPS-head init, LDAM) sampled instance-balanced, with class-balanced loss
            weights deferred to the last 20% of the epochs (epoch 160 of 200 in the paper)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffn_dist.cache.store import CachedSplit, FeatureCache
from ffn_dist.config import Config
from ffn_dist.errors import FFNError
from ffn_dist.losses import (
    LDAMLoss,
    balanced_softmax_loss,
    class_balanced_weights,
    label_aware_smoothing,
    reweighting_weights,
    smoothed_cross_entropy,
)
from ffn_dist.models import LinearForm
from ffn_dist.models.heads import gated_logits
from ffn_dist.plots import figure
from ffn_dist.run import branch_dir, digest, methods_dir, save_torch, write_json, write_text
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.classifier import (
    CachedEpochs,
    ClassifierTrainer,
    SGDStep,
    classifier_device,
    evaluate_cached,
    kps_head_weight,
    val_choice,
)
from ffn_dist.tables import (
    ACCURACY_COLUMNS,
    column_names,
    markdown_table,
    over_seeds,
    per_seed,
    spread,
)

SOURCES = ("ce", "kps", "fused")
W1_GRID = [round(0.1 * i, 1) for i in range(11)]
DRW_FROM = 0.8  # LDAM-DRW re-weights from epoch 160 of 200


def parse_methods(text: str) -> list[str]:
    """`all` or a comma list of METHODS, in METHODS' order."""
    names = METHODS if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise FFNError(f"--methods {text!r}: expected all or a comma list of {', '.join(METHODS)}")
    return [name for name in METHODS if name in names]


def selection_split(cache: FeatureCache, select: str) -> str | None:
    """The split hyperparameters are chosen on: 'val', or None for the published defaults."""
    if select == "defaults":
        return None
    if "val" in cache.splits:
        return "val"
    if select == "val":
        raise FFNError(
            "--select val: this run has no val split (data.val_split is null, so the cache has none). "
            "Make one (`ffn splits make-lt ... --val-per-class N`) and set data.val_split, or use "
            "--select defaults"
        )
    return None


# ----------------------------------------------------------------------------- features
@dataclasses.dataclass
class Source:
    """One feature source of a cache: w1 = 0 gives the CE embeddings, 1 the KPS ones."""

    name: str
    w1: float

    def rows(self, split: CachedSplit, rows: np.ndarray, chunk: int = 8192):
        """(features float32, labels) of `rows`, a chunk at a time."""
        for begin in range(0, len(rows), chunk):
            picked = rows[begin : begin + chunk]
            yield (
                split.fused(picked, self.w1, round(1.0 - self.w1, 6)),
                torch.from_numpy(split.labels[picked]),
            )


# ----------------------------------------------------------------------------- classifiers
class Methods:
    """Fits the methods on one cache, choosing on `select_on` (a split or None). With `seed`
    (another than the run's) stage 2 draws from it and FFN's classifiers go to `ffn_root`
    (default: the run's classifier/ folder); stage 1's heads are the run's either way."""

    def __init__(
        self,
        cfg: Config,
        cache: FeatureCache,
        select_on: str | None,
        seed: int | None = None,
        ffn_root: Path | None = None,
    ):
        self.run_cfg = cfg  # stage 1's outputs are the run's
        cfg = cfg if seed is None else dataclasses.replace(cfg, seed=seed)
        self.cfg, self.cache, self.select_on, self.ffn_root = cfg, cache, select_on, ffn_root
        self.train = cache.splits["train"]
        self.images = self.train.rows_of_view(0)
        self.counts = np.bincount(self.train.labels[self.images], minlength=cfg.data.num_classes)
        self.device = classifier_device(cfg.stage2.device, cfg.data.num_classes * cache.dims)
        self.epochs = CachedEpochs(cfg, self.train, self.device)
        counts = torch.as_tensor(self.counts, dtype=torch.float32)
        self.log_prior = torch.log(counts / counts.sum()).to(self.device)
        self.log_counts = torch.log(counts).to(self.device)
        self._erm = {}

    @functools.cached_property
    def ffn(self) -> ClassifierTrainer:
        return ClassifierTrainer(self.cfg, self.cache, kps_head_weight(self.run_cfg), root=self.ffn_root)

    # -- training -----------------------------------------------------------------------
    def trained(self, source: Source, parameters: list, loss_of, order: str, name: str, **step) -> None:
        """The stage-2 recipe on `loss_of(features, labels)`, `order` 'shuffle' (instance-
        balanced) or 'balanced' (class-balanced); `step` may set weight_decay and project."""
        s2 = self.cfg.stage2
        step = SGDStep(
            parameters, loss_of, s2.momentum, step.get("weight_decay", s2.weight_decay), step.get("project")
        )
        self.epochs.train(step, source.w1, order, f"{name} on {source.name} features")

    def new_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A freshly initialised linear classifier (nn.Linear's init, seeded)."""
        torch.manual_seed(self.cfg.seed)
        layer = torch.nn.Linear(self.cache.dims, self.cfg.data.num_classes)
        return layer.weight.detach().to(self.device), layer.bias.detach().to(self.device)

    def linear(
        self, source: Source, order: str, name: str, loss=F.cross_entropy, start=None, **step
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear classifier trained from `start` (default: a fresh one) on
        `loss(logits, labels)`; `step['project'](weight)` runs after every step."""
        weight, bias = (p.clone().requires_grad_() for p in (start or self.new_linear()))
        project = step.pop("project", None)
        if project is not None:
            step["project"] = lambda: project(weight)
        self.trained(
            source, [weight, bias], lambda z, y: loss(F.linear(z, weight, bias), y), order, name, **step
        )
        return weight.detach(), bias.detach()

    def erm(self, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
        """The instance-balanced linear classifier of `source` (fit once, shared)."""
        if source.name not in self._erm:
            self._erm[source.name] = self.linear(source, "shuffle", "erm")
        return self._erm[source.name]

    def class_means(self, source: Source) -> torch.Tensor:
        sums = torch.zeros(self.cfg.data.num_classes, self.cache.dims)
        for features, labels in source.rows(self.train, self.images):
            sums.index_add_(0, labels, F.normalize(features, dim=1))
        return F.normalize(sums, dim=1).to(self.device)

    # -- the methods: each returns its classifier as a LinearForm --------------------------
    def fit_erm(self, source: Source) -> LinearForm:
        return LinearForm(*self.erm(source))

    def fit_crt(self, source: Source) -> LinearForm:
        return LinearForm(*self.linear(source, "balanced", "crt"))

    def fit_lws(self, source: Source) -> LinearForm:
        weight, bias = self.erm(source)
        scales = torch.ones(self.cfg.data.num_classes, device=self.device, requires_grad=True)

        def loss(z, y):
            return F.cross_entropy(F.linear(z, weight, bias) * scales, y)

        self.trained(source, [scales], loss, "balanced", "lws")
        scales = scales.detach()
        return LinearForm(weight * scales[:, None], bias * scales)

    def fit_tau_norm(self, source: Source, tau: float) -> LinearForm:
        weight, _ = self.erm(source)
        return LinearForm(weight / weight.norm(dim=1, keepdim=True).pow(tau))

    def fit_logit_adjustment(self, source: Source, tau: float) -> LinearForm:
        weight, bias = self.erm(source)
        return LinearForm(weight, bias - tau * self.log_prior)

    def fit_ncm(self, source: Source) -> LinearForm:
        return LinearForm(self.class_means(source), normalize_input=True)

    def fit_balanced_softmax(self, source: Source) -> LinearForm:
        loss = functools.partial(balanced_softmax_loss, log_counts=self.log_counts)
        return LinearForm(*self.linear(source, "shuffle", "balanced_softmax", loss))

    def fit_weight_balancing(self, source: Source, weight_decay: float, max_norm: float) -> LinearForm:
        start = self.erm(source)
        norms = start[0].norm(dim=1)
        delta = norms.min() + max_norm * (norms.max() - norms.min())
        weights = class_balanced_weights(self.counts).float().to(self.device)

        def loss(logits, labels):  # Cui et al.: the batch mean of w_y * CE
            return (weights[labels] * F.cross_entropy(logits, labels, reduction="none")).mean()

        def project(weight):  # MaxNorm: rows longer than delta scaled back onto the ball
            weight.mul_((delta / weight.norm(dim=1)).clamp(max=1.0)[:, None])

        trained = self.linear(
            source, "shuffle", "weight_balancing", loss, start, weight_decay=weight_decay, project=project
        )
        return LinearForm(*trained)

    def fit_mislas(self, source: Source, head: float, tail: float) -> LinearForm:
        epsilon = label_aware_smoothing(self.counts, head, tail).float().to(self.device)
        loss = functools.partial(smoothed_cross_entropy, epsilon=epsilon)
        return LinearForm(*self.linear(source, "balanced", "mislas", loss, self.erm(source)))

    def fit_disalign(self, source: Source, rho: float) -> LinearForm:
        weight, bias = self.erm(source)
        torch.manual_seed(self.cfg.seed)
        gate = torch.nn.Linear(self.cache.dims, 1)  # the confidence layer, nn.Linear's init
        classes = self.cfg.data.num_classes
        parts = {
            "gate_weight": gate.weight.detach()[0],
            "gate_bias": gate.bias.detach()[0],
            "scale": torch.ones(classes),  # DisAlign's init: magnitude 1, margin 0
            "shift": torch.zeros(classes),
        }
        parts = {k: v.to(self.device).clone().requires_grad_() for k, v in parts.items()}
        class_weights = reweighting_weights(self.counts, rho).float().to(self.device)

        def loss(z, y):
            logits = gated_logits(F.linear(z, weight, bias), z, *parts.values())
            return F.cross_entropy(logits, y, weight=class_weights)

        self.trained(source, list(parts.values()), loss, "shuffle", "disalign")
        return LinearForm(weight, bias, gate={k: v.detach() for k, v in parts.items()})

    def fit_ldam_drw(self, source: Source) -> LinearForm:
        s2 = self.cfg.stage2
        head, step = self.ffn.new_classifier()
        deferred = int(DRW_FROM * s2.epochs)
        name = f"ldam_drw on {source.name} features"
        self.epochs.train(step, source.w1, "shuffle", name, epochs=range(deferred))
        weights = class_balanced_weights(self.counts)
        step.loss = LDAMLoss(self.counts, s2.ldam_max_m, s2.ldam_s, weights).trusting_labels().to(self.device)
        self.epochs.train(step, source.w1, "shuffle", name, epochs=range(deferred, s2.epochs))
        return LinearForm.cosine(head.weight)

    # -- selection ------------------------------------------------------------------------
    def report(self, logits_of, source: Source) -> dict:
        return {
            name: evaluate_cached(logits_of, self.cache.splits[name], source.w1, self.counts, self.device)
            for name in ("test", "val")
            if name in self.cache.splits
        }

    def choose(self, method: Method, source: Source) -> tuple[dict, LinearForm]:
        """The hyperparameters with the best val top-1 (the first, on a tie) and their
        classifier; without a val split the published defaults."""
        fit = functools.partial(method.fit, self, source)
        if self.select_on is None:
            return dict(method.defaults), fit(**method.defaults)
        split = self.cache.splits[self.select_on]
        best = None
        for values in itertools.product(*method.grid.values()):
            chosen = dict(zip(method.grid, values, strict=True))
            form = fit(**chosen).to(self.device)
            score = evaluate_cached(form, split, source.w1, self.counts, self.device)["top1"]
            if best is None or score > best[0]:
                best = (score, chosen, form)
        return best[1], best[2]

    def fused_w1(self) -> float:
        """w1 of the fused source: FFN's sweep chosen on val, else the config's."""
        if self.select_on is None:
            return self.cfg.stage2.w1
        return val_choice([self.ffn.fit(w1) for w1 in W1_GRID])["w1"]

    def run(self, name: str, source: Source) -> dict | None:
        """{'test': .., 'val': .., 'chosen': {..}, 'form': LinearForm or None} of method
        `name` on `source`, or None where it does not apply. The form is the classifier as
        one layer (what `ffn export` puts behind the backbones)."""
        if name == "ffn":  # its own report, as the classifier stage wrote it
            report = self.ffn.fit(source.w1)
            saved = torch.load(self.ffn.directory(source.w1) / "classifier.pt", weights_only=True)
            form = LinearForm.cosine(saved["weight"])
            return {
                "test": report["test"],
                "val": report.get("val"),
                "chosen": {"w1": source.w1},
                "form": form,
            }
        if name == "joint":
            return self.joint(source)
        chosen, form = self.choose(REGISTRY[name], source)
        form = form.to(self.device)
        return {**self.report(form, source), "chosen": chosen, "form": form}

    def joint(self, source: Source) -> dict | None:
        if source.name == "kps":  # its cosine head is blind to the embedding's norm: exact
            head = F.normalize(kps_head_weight(self.run_cfg).float(), dim=1)
            form = LinearForm(head, normalize_input=True).to(self.device)
            return {**self.report(form, source), "chosen": {}, "form": form}
        if source.name == "ce":  # its linear head needs the norm the cache does not keep
            stage1 = json.loads((branch_dir(self.run_cfg, "ce") / "report.json").read_text())
            note = "stage 1's own evaluation"
            return {"test": stage1["test"], "val": None, "chosen": {}, "note": note, "form": None}
        return None


@dataclasses.dataclass(frozen=True)
class Method:
    """A registry entry: how the method fits its classifier on one feature source
    (`fit(runner, source, **hyperparameters)`), the grid its hyperparameters are chosen
    from on val, and the published defaults used without a val split."""

    fit: Callable | None
    grid: dict = dataclasses.field(default_factory=dict)
    defaults: dict = dataclasses.field(default_factory=dict)


TAU = {"tau": [round(0.1 * i, 1) for i in range(11)]}
REGISTRY = {
    "ffn": Method(None),  # Methods.run: the classifier stage's own trainer and report
    "joint": Method(None),  # Methods.run: stage 1's head
    "erm": Method(Methods.fit_erm),
    "crt": Method(Methods.fit_crt),
    "lws": Method(Methods.fit_lws),
    "tau_norm": Method(Methods.fit_tau_norm, TAU, {"tau": 1.0}),
    "ncm": Method(Methods.fit_ncm),
    "logit_adjustment": Method(
        Methods.fit_logit_adjustment, {"tau": [0.25 * i for i in range(9)]}, {"tau": 1.0}
    ),
    "balanced_softmax": Method(Methods.fit_balanced_softmax),
    "weight_balancing": Method(
        Methods.fit_weight_balancing,
        {"weight_decay": [5e-4, 5e-3, 5e-2], "max_norm": [0.1, 0.5, 1.0]},
        {"weight_decay": 0.1, "max_norm": 0.1},  # the authors' stage-2 demo
    ),
    "mislas": Method(
        Methods.fit_mislas, {"head": [0.1, 0.2, 0.3, 0.4], "tail": [0.0, 0.1]}, {"head": 0.3, "tail": 0.0}
    ),
    "disalign": Method(Methods.fit_disalign, {"rho": [0.5, 1.0, 1.5]}, {"rho": 1.0}),
    "ldam_drw": Method(Methods.fit_ldam_drw),
}
METHODS = tuple(REGISTRY)


# ----------------------------------------------------------------------------- the job
def method_identity(
    cfg: Config, cache: FeatureCache, method: str, source: Source, select_on: str | None
) -> str:
    entry = REGISTRY[method]
    return digest(
        {
            "method": method,
            "grid": entry.grid,
            "defaults": entry.defaults,
            "features": source.name,
            "w1": source.w1,
            "select_on": select_on,
            "seed": cfg.seed,
            "stage2": dataclasses.asdict(cfg.stage2),
            "cache": cache.cache_id,
        }
    )


@holds_run_dir
def train_methods(cfg: Config, methods: list[str], select: str = "auto", seeds: int = 1) -> dict:
    """`ffn train-classifier CONFIG --methods ... [--seeds N]` on the run's cache."""
    cache = open_run_cache(cfg)
    if seeds < 1:
        raise FFNError(f"--seeds {seeds}: expected 1 or more")
    if seeds == 1:
        return compare_methods(cfg, cache, methods, select)
    return compare_over_seeds(cfg, cache, methods, select, seeds)


def compare_over_seeds(cfg: Config, cache: FeatureCache, methods: list[str], select: str, seeds: int) -> dict:
    """The methods with seeds cfg.seed .. cfg.seed + seeds - 1 (the seed draws stage 2's
    initialisation and sampling; the cache stays), each figure as mean ± std. The run's own
    seed writes to methods/ as a single run does, the others to methods/seedN/."""
    bodies = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        print(f"\n[methods] seed {seed}", flush=True)
        bodies.append(compare_methods(cfg, cache, methods, select, seed))
    summary = summarise_seeds(bodies)
    out = methods_dir(cfg)
    write_json(out / "seeds.json", {k: v for k, v in summary.items() if k != "table"})
    write_text(out / "seeds.md", summary["table"] + "\n")
    print(f"\nover seeds {summary['seeds']}:\n{summary['table']}\n(table and JSON in {out})", flush=True)
    return summary


def compare_methods(
    cfg: Config, cache: FeatureCache, methods: list[str], select: str = "auto", seed: int | None = None
) -> dict:
    """Every method on every feature source, stage 2 drawing from `seed` (default: the
    run's); a finished (method, source) with the same settings and cache is reused. Writes
    methods.md, methods.json and methods.png to methods/ (another seed: methods/seedN/)."""
    start = time.perf_counter()
    select_on = selection_split(cache, select)
    if seed is None or seed == cfg.seed:
        out, runner = methods_dir(cfg), Methods(cfg, cache, select_on)
    else:
        out = methods_dir(cfg) / f"seed{seed}"
        runner = Methods(cfg, cache, select_on, seed, out / "classifier")
    cfg = runner.cfg
    out.mkdir(parents=True, exist_ok=True)
    if cache.manifest["store"] == "fused":  # only z = w1 f̂_kps + w2 f̂_ce at the cached w1
        w1 = cache.manifest["fusion"]["w1"]
        sources = [Source("fused", w1)]
        print(
            f"[methods] this cache stores only the fused embedding at w1={w1:g} (cache.store=fused): "
            "the methods run on it alone; CE and KPS features and a w1 chosen on val need "
            "cache.store: normalized",
            flush=True,
        )
    else:
        sources = [Source("ce", 0.0), Source("kps", 1.0), Source("fused", runner.fused_w1())]
    rows = []
    for source in sources:
        for method in [m for m in METHODS if m in methods]:
            row = _method_row(
                runner, out, method, source, method_identity(cfg, cache, method, source, select_on)
            )
            if row is not None:
                rows.append(row)
                print(
                    f"[methods] {method:<16} {source.name:<5} test top-1 {row['test']['top1']:.2f}",
                    flush=True,
                )
    body = summarise(rows, select_on, time.perf_counter() - start, cfg.seed)
    write_json(out / "methods.json", body)
    write_text(out / "methods.md", body["table"] + "\n")
    plot_methods(rows, out / "methods.png", f"{cfg.name}: classifier methods on the cache")
    print(f"\n{body['table']}\n(table, JSON and plot in {out})", flush=True)
    return body


def _method_row(runner: Methods, out: Path, method: str, source: Source, identity: str) -> dict | None:
    """The method's row on `source`: reused when its identity matches, else fit and written."""
    path = out / f"{method}_{source.name}.json"
    if path.is_file() and json.loads(path.read_text()).get("identity") == identity:
        return json.loads(path.read_text())
    result = runner.run(method, source)
    if result is None:
        return None
    form = result.pop("form")
    if form is not None:  # the classifier itself, for `ffn export --method`
        save_torch(path.with_suffix(".pt"), form.state())
    row = {"identity": identity, "method": method, "features": source.name, "w1": source.w1, **result}
    row["chosen"] = {**row["chosen"], "selected_on": runner.select_on or "published defaults"}
    write_json(path, row)
    return row


# ----------------------------------------------------------------------------- tables
def summarise(rows: list[dict], select_on: str | None, seconds: float, seed: int) -> dict:
    eligible = [r for r in rows if r.get("val")]
    best = max(eligible, key=lambda r: r["val"]["top1"]) if eligible else None
    chosen_on = f"chosen on {select_on}" if select_on else "no val split: published defaults (not chosen)"
    rows = [{k: v for k, v in r.items() if k != "identity"} for r in rows]
    body = {
        "seed": seed,
        "selected_on": select_on,
        "seconds": round(seconds, 1),
        "rows": rows,
        "best_on_val": None if best is None else {"method": best["method"], "features": best["features"]},
    }
    over = summarise_seeds([body])
    table = methods_table(over["rows"], chosen_on, body["best_on_val"])
    return {**body, "table": f"{table}\n\n{over['verdict']}"}


def summarise_seeds(bodies: list[dict]) -> dict:
    """Every (method, features) row over the seeds, mean ± std with the per-seed values, and
    its paired difference to FFN's classifier on fused features (seed by seed: the same
    cache), and per seed the fused-feature method best on val."""
    keyed = [{(r["method"], r["features"]): r for r in body["rows"]} for body in bodies]
    ffn = [by_key.get(("ffn", "fused"), {}).get("test", {}).get("top1") for by_key in keyed]
    rows = []
    for key in keyed[0]:
        found = [by_key.get(key) for by_key in keyed]
        if any(r is None for r in found):
            continue
        fused = key[1] == "fused" and None not in ffn
        rows.append(
            {
                "method": key[0],
                "features": key[1],
                "chosen": [{k: v for k, v in r["chosen"].items() if k != "selected_on"} for r in found],
                "val_top1": over_seeds([(r.get("val") or {}).get("top1") for r in found]),
                "test": {c: over_seeds([r["test"].get(c) for r in found]) for c in ACCURACY_COLUMNS},
                "vs_ffn": over_seeds([r["test"]["top1"] - f for r, f in zip(found, ffn, strict=True)])
                if fused
                else None,
            }
        )
    summary = {"seeds": [body["seed"] for body in bodies], "rows": rows}
    summary["selected_on_val"] = _selected_on_val(keyed, ffn)
    best = [body.get("best_on_val") for body in bodies]
    summary["table"] = methods_table(rows, "chosen on val" if all(best) else "published defaults", None)
    summary["verdict"] = verdict(summary)
    summary["table"] += "\n\n" + summary["verdict"]
    return summary


def _selected_on_val(keyed: list[dict], ffn: list) -> dict | None:
    """Per seed, the fused-feature method with the best val top-1, and its test top-1 against FFN's."""
    picks = []
    for by_key in keyed:
        fused = [r for (_, features), r in by_key.items() if features == "fused" and r.get("val")]
        if not fused or None in ffn:
            return None
        best = max(fused, key=lambda r: r["val"]["top1"])
        picks.append({"method": best["method"], "test_top1": best["test"]["top1"]})
    return {
        "per_seed": picks,
        "test_top1": over_seeds([p["test_top1"] for p in picks]),
        "vs_ffn": over_seeds([p["test_top1"] - f for p, f in zip(picks, ffn, strict=True)]),
    }


def verdict(summary: dict) -> str:
    """Whether a method on fused features beats FFN's classifier by a point of mean test top-1."""
    rivals = [r for r in summary["rows"] if r["vs_ffn"] is not None and r["method"] != "ffn"]
    if not rivals:
        return "No method ran on fused features beside FFN's classifier."
    best = max(rivals, key=lambda r: r["vs_ffn"]["mean"])
    gain, seeds = best["vs_ffn"], len(summary["seeds"])
    line = (
        f"Best against FFN's classifier on fused features: {best['method']}, "
        f"{spread(gain, signed=True)} points of test top-1 (paired, {seeds} seed{'s' if seeds > 1 else ''}): "
        + ("at least one point better." if gain["mean"] >= 1.0 else "no method beats it by one point.")
    )
    selected = summary["selected_on_val"]
    if selected:
        picks = ", ".join(p["method"] for p in selected["per_seed"])
        line += (
            f" Chosen on val per seed ({picks}): test top-1 {spread(selected['test_top1'])}, "
            f"{spread(selected['vs_ffn'], signed=True)} against FFN's."
        )
    return line


def _hyperparameters(chosen: list[dict]) -> str:
    """The chosen hyperparameters; per seed (separated by ';') where the seeds chose differently."""
    texts = [", ".join(f"{k} {v:g}" for k, v in c.items()) or "-" for c in chosen]
    return texts[0] if len(set(texts)) == 1 else "; ".join(texts)


def methods_table(rows: list[dict], chosen_on: str, best: dict | None) -> str:
    """The methods' table, for one seed or (mean ± std, and per seed) over several."""
    several = any(len(r["test"]["top1"]["values"]) > 1 for r in rows)
    header = ["method", "features", f"hyperparameters ({chosen_on})", "val top-1", *column_names(), "vs FFN"]
    table = []
    for r in rows:
        mark = (
            " (best on val)"
            if best and (r["method"], r["features"]) == (best["method"], best["features"])
            else ""
        )
        cells = [f"{r['method']}{mark}", r["features"], _hyperparameters(r["chosen"]), spread(r["val_top1"])]
        cells += [spread(r["test"][c]) for c in ACCURACY_COLUMNS] + [spread(r["vs_ffn"], signed=True)]
        table.append(cells + ([per_seed(r["test"]["top1"])] if several else []))
    return markdown_table(header + (["top-1 per seed"] if several else []), table)


def plot_methods(rows: list[dict], path: Path, title: str) -> None:
    methods = list(dict.fromkeys(r["method"] for r in rows))
    with figure(path, figsize=(max(6, 1.1 * len(methods)), 3.8)) as (_, ax):
        width = 0.8 / len(SOURCES)
        for i, source in enumerate(SOURCES):
            found = {r["method"]: r["test"]["top1"] for r in rows if r["features"] == source}
            xs = [m + i * width for m, name in enumerate(methods) if name in found]
            ax.bar(xs, [found[name] for name in methods if name in found], width, label=f"{source} features")
        ax.set_xticks([m + width for m in range(len(methods))], methods, rotation=30, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
