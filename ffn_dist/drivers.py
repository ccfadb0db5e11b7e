"""The drivers of the classifier stage: `--sweep`, `--methods` and `--seeds` run that one stage
under overrides, and build their tables and statistics from its records.

  ffn train-classifier CONFIG --sweep kps=0:1:0.1    FFN's classifier along one weight (paper Table 3)
  ffn train-classifier CONFIG --sweep grid=0.1       ... at every point of the simplex, step 0.1
  ffn train-classifier CONFIG --methods all          every method on every feature source
  ffn train-classifier CONFIG --methods all --seeds 3

Each point (a method at a fusion and a stage-2 seed) is the classifier stage of the run's
config with `stage2.method`, `stage2.fusion` and `stage2.seed` overridden: a record of its
own, reused when current, trained again, saying why, when not. The feature sources are each
branch's unit embeddings alone and the fused ones (chosen on val by FFN's sweep, else the
config's). Tables go to `classifier/sweep.*` and `classifier/methods/` (another seed's:
`classifier/methods/seedN/`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ffn_dist.cache.store import FeatureCache
from ffn_dist.config import Config, with_settings
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json, write_text
from ffn_dist.fusion import DIGITS, along, describe_fusion, one_hot, simplex_grid, weight_text
from ffn_dist.plots import figure
from ffn_dist.registry import METHODS
from ffn_dist.run.paths import classifier_root, methods_dir
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.classifier import fit_classifier, selection_split
from ffn_dist.tables import (
    ACCURACY_COLUMNS,
    SHOT_COLUMNS,
    accuracy_cells,
    column_names,
    markdown_table,
    number,
    over_seeds,
    per_seed,
    spread,
)

FUSED = "fused"  # the feature source of the fusion, beside one per branch
GRID_STEP = 0.1  # the simplex grid --methods chooses the fusion on


def point(cfg: Config, method: str | None = None, fusion: dict | None = None, seed: int | None = None):
    """The run's config with the classifier stage's overrides of one point."""
    s2 = cfg.stage2
    seed = s2.seed if seed is None or seed == cfg.seed else seed
    settings = {"stage2.method": method or s2.method, "stage2.fusion": dict(fusion or s2.fusion)}
    return with_settings(cfg, {**settings, "stage2.seed": seed})


# ----------------------------------------------------------------------------- the sweep
def parse_sweep(text: str, fusion: dict[str, float]) -> list[dict[str, float]]:
    """The fusions of `--sweep`: `BRANCH=START:STOP:STEP` (both ends included) or
    `BRANCH=A,B,C`, each in [0, 1], the other of two branches at 1 minus it; or `grid=STEP`,
    every point of the simplex over the branches in steps of STEP."""
    key, _, spec = (part.strip() for part in text.partition("="))
    expected = (
        "expected grid=STEP or, for two branches, BRANCH=START:STOP:STEP or BRANCH=A,B,C "
        f"(branches: {', '.join(fusion)})"
    )
    if not spec or (key != "grid" and key not in fusion):
        raise FFNError(f"--sweep {text!r}: {expected}")
    try:
        if key == "grid":
            return simplex_grid(fusion, float(spec))
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            values = list(np.arange(start, stop + step / 2, step))
        else:
            values = [float(x) for x in spec.split(",")]
    except ValueError:
        raise FFNError(f"--sweep {text!r}: {expected} (STEP > 0, STOP >= START)") from None
    values = sorted(
        {round(float(v), DIGITS) for v in values}
    )  # floats: a numpy scalar fails weights_only loads
    if not all(0.0 <= v <= 1.0 for v in values):
        raise FFNError(f"--sweep {text!r}: every weight must be in [0, 1], got {values}")
    return along(fusion, key, values)


def val_choice(results: list[dict]) -> dict | None:
    """The result with the best val top-1 (the first, on a tie); None without a val split."""
    with_val = [r for r in results if r.get("val")]
    return max(with_val, key=lambda r: r["val"]["top1"]) if with_val else None


def fused_sweep(cfg: Config, cache: FeatureCache, fusions: list[dict]) -> list[dict]:
    """FFN's classifier (the configured method) at each fusion: the points' results."""
    return [fit_classifier(point(cfg, fusion=fusion), cache, freeze=False) for fusion in fusions]


@holds_run_dir
def run_sweep(cfg: Config, fusions: list[dict]) -> list[dict]:
    """`--sweep`: the stage itself, then a point per fusion; the table, JSON and (along one
    weight) the plot."""
    cache = open_run_cache(cfg)
    fit_classifier(cfg, cache)
    print(f"fusion sweep: {len(fusions)} points over {', '.join(cfg.stage2.fusion)}", flush=True)
    results = fused_sweep(cfg, cache, fusions)
    out = classifier_root(cfg)
    table = sweep_table(results)
    write_text(out / "sweep.md", table + "\n")
    write_json(out / "sweep.json", [{k: r.get(k) for k in ("fusion", "val", "test")} for r in results])
    varied = varied_weight(fusions)
    if varied:
        plot_sweep(results, varied, out / "sweep.png", f"{cfg.name}: fusion sweep ({cfg.stage2.method})")
    shown = "table, JSON and plot" if varied else "table and JSON"
    print(f"\nfusion sweep, test accuracy (%):\n{table}\n({shown} in {out})", flush=True)
    return results


def varied_weight(fusions: list[dict]) -> str | None:
    """The first branch whose weight a sweep of two branches varies (the x of its plot);
    None for a simplex of three or more."""
    names = list(fusions[0]) if fusions else []
    return names[0] if len(names) == 2 else None


def sweep_table(results: list[dict]) -> str:
    chosen = val_choice(results)
    names = list(results[0]["fusion"]) if results else []
    rows = [
        [weight_text(w) for w in r["fusion"].values()]
        + [number((r.get("val") or {}).get("top1")) + (" (chosen)" if r is chosen else "")]
        + accuracy_cells(r["test"], SHOT_COLUMNS)
        for r in results
    ]
    return markdown_table([*names, "val top-1", *column_names(SHOT_COLUMNS)], rows)


def plot_sweep(results: list[dict], varied: str, path: Path, title: str) -> None:
    with figure(path, figsize=(5, 3.5)) as (_, ax):
        weights = [r["fusion"][varied] for r in results]
        ax.plot(weights, [r["test"]["top1"] for r in results], "o-", label="top-1")
        for group in ("many", "medium", "few"):
            values = [r["test"][group] for r in results]
            if all(v is not None for v in values):
                ax.plot(weights, values, ".--", alpha=0.6, label=group)
        ax.set_xlabel(f"{varied}'s fusion weight (the other: 1 minus it)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)


# ----------------------------------------------------------------------------- the methods
def parse_methods(text: str) -> list[str]:
    """`all` or a comma list of METHODS, in METHODS' order."""
    names = METHODS if text == "all" else [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise FFNError(f"--methods {text!r}: expected all or a comma list of {', '.join(METHODS)}")
    return [name for name in METHODS if name in names]


def sources(cfg: Config, cache: FeatureCache) -> list[tuple[str, dict]]:
    """(name, fusion) of each feature source: each branch alone, then the fusion; a fused
    cache holds only its own fusion."""
    if cache.manifest["store"] == "fused":
        fusion = cache.manifest["fusion"]
        print(
            f"[methods] this cache stores only the fused embedding at {describe_fusion(fusion)} "
            "(cache.store=fused): the methods run on it alone; each branch's features and a fusion "
            "chosen on val need cache.store: normalized",
            flush=True,
        )
        return [(FUSED, fusion)]
    names = list(cfg.stage2.fusion)
    if selection_split(cfg, "val" in cache.splits) is None:
        fused = cfg.stage2.fusion
    else:  # FFN's sweep, chosen on val
        grid = simplex_grid(names, GRID_STEP)
        print(f"[methods] choosing the fusion on val: {len(grid)} points, step {GRID_STEP:g}", flush=True)
        fused = val_choice(fused_sweep(point(cfg, "ffn"), cache, grid))["fusion"]
    return [*((name, one_hot(names, name)) for name in names), (FUSED, fused)]


def compare_methods(cfg: Config, cache: FeatureCache, methods: list[str], seed: int | None = None) -> dict:
    """Every method on every feature source, stage 2 drawing from `seed` (default: the
    run's); writes methods.md, methods.json and methods.png."""
    start = time.perf_counter()
    seeded = point(cfg, seed=seed)
    rows = []
    for name, fusion in sources(seeded, cache):
        for method in methods:
            result = fit_classifier(point(seeded, method, fusion), cache, freeze=False)
            rows.append(
                {
                    "method": method,
                    "features": name,
                    **{k: result[k] for k in ("fusion", "chosen", "test", "val")},
                }
            )
            print(f"[methods] {method:<16} {name:<5} test top-1 {result['test']['top1']:.2f}", flush=True)
    select_on = selection_split(seeded, "val" in cache.splits)
    body = summarise(rows, select_on, time.perf_counter() - start, seed if seed is not None else cfg.seed)
    out = methods_dir(cfg, seed)
    write_json(out / "methods.json", body)
    write_text(out / "methods.md", body["table"] + "\n")
    plot_methods(rows, out / "methods.png", f"{cfg.name}: classifier methods on the cache")
    print(f"\n{body['table']}\n(table, JSON and plot in {out})", flush=True)
    return body


@holds_run_dir
def run_methods(cfg: Config, methods: list[str], seeds: int = 1) -> dict:
    """`--methods [--seeds N]`: the stage itself, then every point; with seeds, the methods
    with seeds SEED .. SEED + N - 1 of stage 2 (the cache stays), each figure as mean ± std."""
    if seeds < 1:
        raise FFNError(f"--seeds {seeds}: expected 1 or more")
    cache = open_run_cache(cfg)
    fit_classifier(cfg, cache)
    if seeds == 1:
        return compare_methods(cfg, cache, methods)
    bodies = []
    for seed in range(cfg.seed, cfg.seed + seeds):
        print(f"\n[methods] seed {seed}", flush=True)
        bodies.append(compare_methods(cfg, cache, methods, seed))
    summary = summarise_seeds(bodies)
    out = methods_dir(cfg)
    write_json(out / "seeds.json", {k: v for k, v in summary.items() if k != "table"})
    write_text(out / "seeds.md", summary["table"] + "\n")
    print(f"\nover seeds {summary['seeds']}:\n{summary['table']}\n(table and JSON in {out})", flush=True)
    return summary


# ----------------------------------------------------------------------------- tables
def summarise(rows: list[dict], select_on: str | None, seconds: float, seed: int) -> dict:
    eligible = [r for r in rows if r.get("val")]
    best = max(eligible, key=lambda r: r["val"]["top1"]) if eligible else None
    chosen_on = f"chosen on {select_on}" if select_on else "no val split: published defaults (not chosen)"
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
    ffn = [by_key.get(("ffn", FUSED), {}).get("test", {}).get("top1") for by_key in keyed]
    rows = []
    for key in keyed[0]:
        found = [by_key.get(key) for by_key in keyed]
        if any(r is None for r in found):
            continue
        fused = key[1] == FUSED and None not in ffn
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
        fused = [r for (_, features), r in by_key.items() if features == FUSED and r.get("val")]
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
    sources = list(dict.fromkeys(r["features"] for r in rows))
    with figure(path, figsize=(max(6, 1.1 * len(methods)), 3.8)) as (_, ax):
        width = 0.8 / len(sources)
        for i, source in enumerate(sources):
            found = {r["method"]: r["test"]["top1"] for r in rows if r["features"] == source}
            xs = [m + i * width for m, name in enumerate(methods) if name in found]
            ax.bar(xs, [found[name] for name in methods if name in found], width, label=f"{source} features")
        ax.set_xticks([m + width for m in range(len(methods))], methods, rotation=30, ha="right")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
