"""`ffn train-classifier CONFIG --methods all`: the decoupling methods side by side on the cache.

Every method runs on each feature source of one cache: the CE branch's unit embeddings, the
KPS branch's, and the fused ones (w1 * f̂_kps + w2 * f̂_ce, w1 chosen on val by the FFN
sweep, else the config's). Hyperparameters are chosen on the val split, never on test;
without a val split the published defaults are used and the report says so.

  ffn       FFN's cosine classifier: KPS-head init, LDAM, class-balanced (stage 2 itself)
  joint     the branch's own stage-1 head, as trained (CE: stage 1's evaluation; KPS: its
            cosine head on the cached features; fused: none)
  erm       a linear classifier fit with instance-balanced cross-entropy on the frozen
            features: the joint classifier of frozen features, and the base of the three
            post-hoc methods below
  crt       classifier re-training (Kang et al. 2020): a new linear classifier, randomly
            initialised, cross-entropy, class-balanced sampling
  lws       learnable weight scaling (Kang et al.): erm frozen, one scale per class learned
            with class-balanced sampling (logits x scale)
  tau_norm  tau-normalisation (Kang et al.): erm's w_c / ||w_c||^tau, no bias; tau in [0, 1]
  ncm       nearest class mean: cosine to the mean of each class's unit training features
  logit_adjustment  post-hoc logit adjustment (Menon et al. 2021): erm's logits - tau log pi
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ffn_dist.cache.store import CachedSplit, FeatureCache
from ffn_dist.config import Config
from ffn_dist.data.sampling import epoch_order
from ffn_dist.errors import FFNError
from ffn_dist.models import LinearForm
from ffn_dist.plots import figure
from ffn_dist.run import branch_dir, classifier_dir, digest, methods_dir, save_torch, write_json, write_text
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.classifier import (
    GATHER_BATCHES,
    ClassifierTrainer,
    classifier_device,
    cosine_lr,
    evaluate_cached,
    kps_head_weight,
    val_choice,
)

METHODS = ("ffn", "joint", "erm", "crt", "lws", "tau_norm", "ncm", "logit_adjustment")
POST_HOC = ("lws", "tau_norm", "logit_adjustment")  # methods built on erm
SOURCES = ("ce", "kps", "fused")
W1_GRID = [round(0.1 * i, 1) for i in range(11)]
TAU_GRIDS = {
    "tau_norm": [round(0.1 * i, 1) for i in range(11)],
    "logit_adjustment": [0.25 * i for i in range(9)],
}
DEFAULT_TAU = {"tau_norm": 1.0, "logit_adjustment": 1.0}  # the published defaults
COLUMNS = ("top1", "top5", "many", "medium", "few", "head", "tail")


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
    """Fits and applies the methods on one cache, choosing on `select_on` (a split or None)."""

    def __init__(self, cfg: Config, cache: FeatureCache, select_on: str | None):
        self.cfg, self.cache, self.select_on = cfg, cache, select_on
        self.train = cache.splits["train"]
        self.images = self.train.rows_of_view(0)
        self.counts = np.bincount(self.train.labels[self.images], minlength=cfg.data.num_classes)
        self.device = classifier_device(cfg.stage2.device, cfg.data.num_classes * cache.dims)
        self.log_prior = torch.log(torch.as_tensor(self.counts / self.counts.sum(), dtype=torch.float32))

    @functools.cached_property
    def ffn(self) -> ClassifierTrainer:
        return ClassifierTrainer(self.cfg, self.cache, kps_head_weight(self.cfg))

    # -- training -----------------------------------------------------------------------
    def fit_linear(self, source: Source, parameters: list, logits_of, order: str) -> None:
        """SGD with momentum and cosine decay (the stage-2 recipe) on cross-entropy, drawing
        an epoch of as many rows as images from every cached view, `order` 'shuffle'
        (instance-balanced) or 'balanced' (class-balanced)."""
        s2 = self.cfg.stage2
        optimizer = torch.optim.SGD(parameters, lr=s2.lr, momentum=s2.momentum, weight_decay=s2.weight_decay)
        steps = math.ceil(len(self.images) / s2.batch_size)
        chunk = s2.batch_size * GATHER_BATCHES
        for epoch in range(s2.epochs):
            draws = epoch_order(self.train.labels, order, self.cfg.seed, epoch)[: len(self.images)]
            for begin in range(0, len(draws), chunk):
                features, labels = next(source.rows(self.train, draws[begin : begin + chunk], chunk))
                features, labels = features.to(self.device), labels.to(self.device)
                for offset in range(0, len(labels), s2.batch_size):
                    step = epoch * steps + (begin + offset) // s2.batch_size
                    for group in optimizer.param_groups:
                        group["lr"] = cosine_lr(s2.lr, step, s2.epochs * steps)
                    batch = slice(offset, offset + s2.batch_size)
                    loss = F.cross_entropy(logits_of(features[batch]), labels[batch])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

    def new_linear(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A freshly initialised linear classifier (nn.Linear's init, seeded)."""
        torch.manual_seed(self.cfg.seed)
        layer = torch.nn.Linear(self.cache.dims, self.cfg.data.num_classes)
        return layer.weight.detach().to(self.device), layer.bias.detach().to(self.device)

    def linear(self, source: Source, order: str) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = (p.clone().requires_grad_() for p in self.new_linear())
        self.fit_linear(source, [weight, bias], lambda z: F.linear(z, weight, bias), order)
        return weight.detach(), bias.detach()

    def lws_scales(self, source: Source, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        scales = torch.ones(self.cfg.data.num_classes, device=self.device, requires_grad=True)
        self.fit_linear(source, [scales], lambda z: F.linear(z, weight, bias) * scales, "balanced")
        return scales.detach()

    def class_means(self, source: Source) -> torch.Tensor:
        sums = torch.zeros(self.cfg.data.num_classes, self.cache.dims)
        for features, labels in source.rows(self.train, self.images):
            sums.index_add_(0, labels, F.normalize(features, dim=1))
        return F.normalize(sums, dim=1).to(self.device)

    # -- selection ------------------------------------------------------------------------
    def report(self, logits_of, source: Source) -> dict:
        return {
            name: evaluate_cached(logits_of, self.cache.splits[name], source.w1, self.counts, self.device)
            for name in ("test", "val")
            if name in self.cache.splits
        }

    def choose(self, family, grid: list[float], default: float, source: Source) -> tuple[float, LinearForm]:
        """The grid value with the best val top-1 (the first, on a tie), or the default; and
        its classifier."""
        if self.select_on is None:
            return default, family(default)
        split = self.cache.splits[self.select_on]
        scores = [
            evaluate_cached(family(v), split, source.w1, self.counts, self.device)["top1"] for v in grid
        ]
        best = grid[int(np.argmax(scores))]
        return best, family(best)

    def fused_w1(self) -> float:
        """w1 of the fused source: FFN's sweep chosen on val, else the config's."""
        if self.select_on is None:
            return self.cfg.stage2.w1
        return val_choice([self.ffn.fit(w1) for w1 in W1_GRID])["w1"]

    # -- the methods ----------------------------------------------------------------------
    def run(self, method: str, source: Source, erm: tuple | None) -> dict | None:
        """{'test': .., 'val': .., 'chosen': {..}, 'form': LinearForm or None} of `method` on
        `source`, or None where it does not apply. The form is the classifier as one layer
        (what `ffn export` puts behind the backbones)."""
        if method == "ffn":
            report = self.ffn.fit(source.w1)
            saved = torch.load(classifier_dir(self.cfg, source.w1) / "classifier.pt", weights_only=True)
            form = LinearForm.cosine(saved["weight"])
            return {
                "test": report["test"],
                "val": report.get("val"),
                "chosen": {"w1": source.w1},
                "form": form,
            }
        if method == "joint":
            return self.joint(source)
        if method == "ncm":
            return self.evaluated(LinearForm(self.class_means(source), normalize_input=True), source)
        if method in ("erm", "crt"):
            weight, bias = erm if method == "erm" else self.linear(source, "balanced")
            return self.evaluated(LinearForm(weight, bias), source)
        weight, bias = erm
        if method == "lws":
            scales = self.lws_scales(source, weight, bias)
            return self.evaluated(LinearForm(weight * scales[:, None], bias * scales), source)
        if method == "tau_norm":

            def family(tau):
                return LinearForm(weight / weight.norm(dim=1, keepdim=True).pow(tau))

        else:
            log_prior = self.log_prior.to(self.device)

            def family(tau):
                return LinearForm(weight, bias - tau * log_prior)

        tau, form = self.choose(family, TAU_GRIDS[method], DEFAULT_TAU[method], source)
        return self.evaluated(form.to(self.device), source, {"tau": tau})

    def evaluated(self, form: LinearForm, source: Source, chosen: dict | None = None) -> dict:
        form = form.to(self.device)
        return {**self.report(form, source), "chosen": chosen or {}, "form": form}

    def joint(self, source: Source) -> dict | None:
        if source.name == "kps":  # its cosine head is blind to the embedding's norm: exact
            head = F.normalize(kps_head_weight(self.cfg).float(), dim=1)
            return self.evaluated(LinearForm(head, normalize_input=True), source)
        if source.name == "ce":  # its linear head needs the norm the cache does not keep
            stage1 = json.loads((branch_dir(self.cfg, "ce") / "report.json").read_text())
            note = "stage 1's own evaluation"
            return {"test": stage1["test"], "val": None, "chosen": {}, "note": note, "form": None}
        return None


# ----------------------------------------------------------------------------- the job
def method_identity(
    cfg: Config, cache: FeatureCache, method: str, source: Source, select_on: str | None
) -> str:
    return digest(
        {
            "method": method,
            "features": source.name,
            "w1": source.w1,
            "select_on": select_on,
            "seed": cfg.seed,
            "stage2": dataclasses.asdict(cfg.stage2),
            "cache": cache.cache_id,
        }
    )


@holds_run_dir
def train_methods(cfg: Config, methods: list[str], select: str = "auto") -> dict:
    """`ffn train-classifier CONFIG --methods ...` on the run's cache."""
    return compare_methods(cfg, open_run_cache(cfg), methods, select)


def compare_methods(cfg: Config, cache: FeatureCache, methods: list[str], select: str = "auto") -> dict:
    """Every method on every feature source; a finished (method, source) with the same
    settings and cache is reused. Writes methods.md, methods.json and methods.png."""
    start = time.perf_counter()
    select_on = selection_split(cache, select)
    runner = Methods(cfg, cache, select_on)
    out = methods_dir(cfg)
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
    wanted = [*methods, *(["erm"] if set(methods) & set(POST_HOC) and "erm" not in methods else [])]
    rows = []
    for source in sources:
        erm = None
        for method in [m for m in METHODS if m in wanted]:
            path = out / f"{method}_{source.name}.json"
            identity = method_identity(cfg, cache, method, source, select_on)
            if path.is_file() and json.loads(path.read_text()).get("identity") == identity:
                row = json.loads(path.read_text())
            else:
                if method in ("erm", *POST_HOC) and erm is None:
                    erm = runner.linear(source, "shuffle")
                result = runner.run(method, source, erm)
                if result is None:
                    continue
                form = result.pop("form")
                if form is not None:  # the classifier itself, for `ffn export --method`
                    save_torch(path.with_suffix(".pt"), form.state())
                row = {
                    "identity": identity,
                    "method": method,
                    "features": source.name,
                    "w1": source.w1,
                    **result,
                }
                row["chosen"] = {**row["chosen"], "selected_on": select_on or "published defaults"}
                write_json(path, row)
            rows.append(row)
            print(f"[methods] {method:<16} {source.name:<5} test top-1 {row['test']['top1']:.2f}", flush=True)
    body = summarise(rows, select_on, time.perf_counter() - start)
    write_json(out / "methods.json", body)
    write_text(out / "methods.md", body["table"] + "\n")
    plot_methods(rows, out / "methods.png", f"{cfg.name}: classifier methods on the cache")
    print(f"\n{body['table']}\n(table, JSON and plot in {out})", flush=True)
    return body


def summarise(rows: list[dict], select_on: str | None, seconds: float) -> dict:
    eligible = [r for r in rows if r.get("val")]
    best = max(eligible, key=lambda r: r["val"]["top1"]) if eligible else None
    chosen_on = f"chosen on {select_on}" if select_on else "no val split: published defaults (not chosen)"
    return {
        "selected_on": select_on,
        "seconds": round(seconds, 1),
        "rows": [{k: v for k, v in r.items() if k != "identity"} for r in rows],
        "best_on_val": None if best is None else {"method": best["method"], "features": best["features"]},
        "table": methods_table(rows, chosen_on, best),
    }


def methods_table(rows: list[dict], chosen_on: str, best: dict | None) -> str:
    names = {"top1": "test top-1", "top5": "top-5", "head": "head half", "tail": "tail half"}
    lines = [
        f"| method | features | hyperparameters ({chosen_on}) | val top-1 | "
        + " | ".join(names.get(c, c) for c in COLUMNS)
        + " |",
        "|---" * (len(COLUMNS) + 4) + "|",
    ]
    for r in rows:
        chosen = ", ".join(f"{k} {v:g}" for k, v in r["chosen"].items() if k != "selected_on") or "-"
        val = "-" if not r.get("val") else f"{r['val']['top1']:.2f}"
        cells = ["-" if r["test"].get(c) is None else f"{r['test'][c]:.2f}" for c in COLUMNS]
        mark = " (best on val)" if r is best else ""
        lines.append(
            f"| {r['method']}{mark} | {r['features']} | {chosen} | {val} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


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
