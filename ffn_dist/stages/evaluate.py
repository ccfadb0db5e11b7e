"""`ffn evaluate CONFIG`: CE alone, KPS alone and FFN side by side, as JSON, Markdown and plots.

CE and KPS alone are each branch's own head on the test split as stage 1 scored it (the
CE linear head; the KPS cosine logits, argmax without r or margins, as the authors do).
The row after the branches' is the configured classifier (`stage2.method` at
`stage2.fusion`; FFN's by default). After `ffn train-classifier --methods`, the method chosen
on the val split joins them. Each row has its accuracies, its accuracy under shifted test
priors (priors.py) and its calibration (ECE, NLL; the stage-2 classifiers' also after the
temperature fitted on val). With `--prior FILE`, the configured classifier is also scored
under that prior with and without the logit adjustment `ffn predict --prior` makes; with
`--test-split FILE`, the file's images are scored by the classifier's export
(predict.score_test_lists). Outputs go to `output_dir/report/`: report.json, report.md,
per_class.png (the paper's Fig. 6), reliability.png and, with --tsne, tsne.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ffn_dist.config import Config
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json, write_text
from ffn_dist.fusion import describe_fusion
from ffn_dist.metrics import logits_report
from ffn_dist.plots import figure
from ffn_dist.priors import IMBALANCES, logit_adjustment, prior_accuracy, read_prior, shifted_accuracies
from ffn_dist.run.history import config_id
from ffn_dist.run.paths import (
    branch_report,
    classifier_root,
    methods_dir,
    report_dir,
    run_report,
    run_report_tables,
    tensorboard_dir,
)
from ffn_dist.run.stages import begin_stage, finish_stage, recorded, stage_outputs
from ffn_dist.rundir import holds_run_dir
from ffn_dist.stages.classifier import read_result
from ffn_dist.tables import ACCURACY_COLUMNS, accuracy_cells, column_names, markdown_table, number

TSNE_POINTS = 2000


def _read(path: Path, produced_by: str) -> dict:
    if not path.is_file():
        raise FFNError(f"{path}: missing; run {produced_by} first")
    return json.loads(path.read_text())


def branch_name(branch: str) -> str:
    """A branch's row in the report (its own stage-1 head): `CE`, `KPS`."""
    return branch.upper()


def classifier_name(cfg: Config) -> str:
    """The configured classifier's row: `FFN (kps 0.5, ce 0.5)`, `crt (kps 0.5, ce 0.5)`."""
    method = "FFN" if cfg.stage2.method == "ffn" else cfg.stage2.method
    return f"{method} ({describe_fusion(cfg.stage2.fusion)})"


def collect_results(cfg: Config) -> dict:
    stage1 = {b: _read(branch_report(cfg, b), "stage 1") for b in cfg.branches}
    stage_outputs(cfg, "classifier")  # refused, saying what to run, unless it is complete
    methods = {branch_name(b): stage1[b]["test"] for b in cfg.branches}
    classifier = read_result(cfg)
    methods[classifier_name(cfg)] = classifier["test"]
    compared = methods_dir(cfg) / "methods.json"
    if compared.is_file():  # `ffn train-classifier --methods`: the one chosen on val beside them
        body = json.loads(compared.read_text())
        best = body.get("best_on_val")
        if best:
            row = next(
                r for r in body["rows"] if (r["method"], r["features"]) == (best["method"], best["features"])
            )
            methods[f"{best['method']} on {best['features']} features (best on val)"] = row["test"]
    counts = stage1[next(iter(cfg.branches))]["train_counts"]
    for report in methods.values():  # a stage 1 of an earlier release reported no shifted priors
        report.setdefault("shifted_prior", shifted_accuracies(report["per_class"], counts))
    results = {
        "name": cfg.name,
        "config": config_id(cfg),  # configs/ID.yaml in the run directory: the settings behind it
        "classifier": {
            "method": cfg.stage2.method,
            "fusion": cfg.stage2.fusion,
            "temperature": classifier["temperature"],
        },
        "train_counts": counts,
        # None: a stage 1 of an earlier release
        "stage1_recipe": stage1[next(iter(cfg.branches))].get("recipe"),
        "methods": methods,
    }
    sweep = classifier_root(cfg) / "sweep.json"
    if sweep.is_file():
        results["sweep"] = json.loads(sweep.read_text())
    return results


def recipe_line(recipe: dict) -> str:
    """'stage 1: global batch 64 a branch, lr 0.1', and the linear scaling where it was used."""
    line = f"stage 1: global batch {recipe['global_batch']} a branch, lr {recipe['lr']:g}"
    return line + (f" (linear scaling: {recipe['linear_scaling']})" if recipe["linear_scaling"] else "")


def accuracy_table(methods: dict[str, dict]) -> str:
    """One row per method: its test accuracies (%)."""
    return markdown_table(
        ["method", *column_names()], [[name, *accuracy_cells(report)] for name, report in methods.items()]
    )


SHIFTED_NAMES = {
    "uniform": "uniform",
    **{f"{d}_{r}": f"{d[0].upper()}{r}" for d in ("forward", "backward") for r in IMBALANCES},
}


def shifted_table(methods: dict[str, dict]) -> str:
    """One row per method: top-1 (%) under forward (F) and backward (B) long-tailed test priors
    of each imbalance, and the uniform one."""
    names = list(next(iter(methods.values()))["shifted_prior"])
    rows = [[name, *(number(r["shifted_prior"].get(n)) for n in names)] for name, r in methods.items()]
    return markdown_table(["method", *(SHIFTED_NAMES[n] for n in names)], rows)


def calibration_table(methods: dict[str, dict]) -> str:
    """One row per method: ECE (%) and NLL, then the temperature fitted on val and both after it."""
    rows = []
    for name, report in methods.items():
        before, after = report.get("calibration") or {}, report.get("calibrated") or {}
        rows.append(
            [
                name,
                number(before.get("ece")),
                number(before.get("nll"), 3),
                number(after.get("temperature"), 3),
                number(after.get("ece")),
                number(after.get("nll"), 3),
            ]
        )
    return markdown_table(["method", "ECE", "NLL", "temperature", "ECE after", "NLL after"], rows)


def plot_reliability(results: dict, path: Path) -> None:
    """Accuracy against confidence per bin, one line per method; the diagonal is calibrated."""
    with figure(path, figsize=(5, 5)) as (_, ax):
        ax.plot([0, 100], [0, 100], color="grey", linestyle="--", linewidth=1, label="calibrated")
        for (method, report), marker in zip(results["methods"].items(), "os^D", strict=False):
            bins = (report.get("calibration") or {}).get("reliability")
            if bins:
                points = [
                    (c, a) for c, a in zip(bins["confidence"], bins["accuracy"], strict=True) if c is not None
                ]
                ax.plot(*zip(*points, strict=True), marker=marker, markersize=4, label=method)
        ax.set_xlabel("confidence (%), 15 equal-width bins")
        ax.set_ylabel("accuracy in the bin (%)")
        ax.set_title(f"{results['name']}: reliability")
        ax.legend(fontsize=8)


def prior_shift(cfg: Config, prior_spec: str, train_counts) -> dict:
    """The configured classifier under the test prior of `prior_spec`, exactly weighted: its
    top-1 without and with the logit adjustment (priors.logit_adjustment)."""
    import torch

    from ffn_dist.stages.cache import open_run_cache
    from ffn_dist.stages.classifier import load_form
    from ffn_dist.stages.epochs import cached_logits
    from ffn_dist.stages.methods import probability_scale

    prior = read_prior(prior_spec, cfg.data.num_classes)
    test = open_run_cache(cfg).splits["test"]
    logits, labels = cached_logits(load_form(cfg), test, cfg.stage2.fusion, "cpu")
    logits = probability_scale(cfg) * logits
    adjusted = logits + torch.from_numpy(logit_adjustment(prior, train_counts)).float()
    scored = {
        case: prior_accuracy(logits_report(values, labels, train_counts)["per_class"], prior)
        for case, values in (("without", logits), ("with", adjusted))
    }
    return {"prior": prior_spec, "classifier": classifier_name(cfg), "top1": scored}


def plot_per_class(results: dict, path: Path) -> None:
    counts = np.asarray(results["train_counts"])
    with figure(path, figsize=(6, 4)) as (_, ax):
        for (method, report), marker in zip(results["methods"].items(), "os^D", strict=False):
            accuracy = np.array([np.nan if a is None else a for a in report["per_class"]])
            ax.scatter(counts, accuracy, marker=marker, s=18, alpha=0.7, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class (log scale)")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.set_title(f"{results['name']}: per-class accuracy")
        ax.legend(fontsize=8)


def plot_tsne(cfg: Config, path: Path) -> None:
    """t-SNE of test embeddings (the paper's Fig. 5): each branch's (when cached) and the fused ones."""
    from sklearn.manifold import TSNE

    from ffn_dist.stages.cache import open_run_cache

    test = open_run_cache(cfg).splits["test"]
    rows = test.rows_of_view(0)
    rows = np.random.default_rng(cfg.seed).permutation(rows)[:TSNE_POINTS]
    panels = {f"fused ({describe_fusion(cfg.stage2.fusion)})": test.fused(rows, cfg.stage2.fusion)}
    if test.store == "normalized":
        panels = {**{branch_name(b): test.branch(rows, b) for b in cfg.branches}, **panels}
    with figure(path, ncols=len(panels), figsize=(4 * len(panels), 4), squeeze=False) as (_, axes):
        for ax, (title, features) in zip(axes[0], panels.items(), strict=True):
            points = TSNE(init="pca", random_state=cfg.seed, perplexity=min(30, len(rows) - 1)).fit_transform(
                features.numpy()
            )
            ax.scatter(points[:, 0], points[:, 1], c=test.labels[rows], cmap="tab20", s=4)
            ax.set_title(title)
            ax.set_xticks([]), ax.set_yticks([])


@holds_run_dir
def evaluate_run(
    cfg: Config, tsne: bool = False, prior: str | None = None, test_lists: dict[str, dict] | None = None
) -> dict:
    """The report; `test_lists` are the scores of `--test-split` files (predict.score_test_lists)."""
    with recorded(cfg, "evaluate"):
        begin_stage(cfg, "evaluate")
        results = _evaluate(cfg, tsne, prior, test_lists)
        finish_stage(cfg, "evaluate", [run_report(cfg)])
    return results


def _evaluate(cfg: Config, tsne: bool, prior: str | None, test_lists: dict[str, dict] | None) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    results = collect_results(cfg)
    if prior is not None:
        results["prior_shift"] = prior_shift(cfg, prior, np.asarray(results["train_counts"]))
    if test_lists:
        results["test_lists"] = test_lists
    out = report_dir(cfg)
    tables = (
        f"test accuracy (%), {cfg.name}:\n{accuracy_table(results['methods'])}\n\n"
        f"top-1 (%) under shifted test priors (F: forward, B: backward long-tailed, of that imbalance):\n"
        f"{shifted_table(results['methods'])}\n\n"
        f"calibration (ECE %, 15 bins; NLL), before and after the temperature fitted on val:\n"
        f"{calibration_table(results['methods'])}\n"
        f"temperature of {classifier_name(cfg)}: {results['classifier']['temperature']['fitted']}; "
        "the stage-1 rows (each backbone's own head) are not temperature-scaled"
    )
    if results["stage1_recipe"]:
        tables += f"\n{recipe_line(results['stage1_recipe'])}"
    if prior is not None:
        shift = results["prior_shift"]
        tables += (
            f"\n\n{shift['classifier']} on a test set of prior {prior} (top-1 %, exact): "
            f"{shift['top1']['without']:.2f} as trained, {shift['top1']['with']:.2f} with --prior"
        )
    if test_lists:
        tables += (
            f"\n\n{classifier_name(cfg)} (its export) on the --test-split files:\n"
            f"{accuracy_table(test_lists)}"
        )
    write_json(run_report(cfg), results)
    write_text(
        run_report_tables(cfg),
        f"# {cfg.name}\n\n{tables}\n\nConfig: configs/{results['config']}.yaml in the run directory.\n",
    )
    plot_per_class(results, out / "per_class.png")
    plot_reliability(results, out / "reliability.png")
    if tsne:
        plot_tsne(cfg, out / "tsne.png")
    with SummaryWriter(str(tensorboard_dir(cfg, "evaluate"))) as writer:
        for method, report in results["methods"].items():
            for column in ACCURACY_COLUMNS:
                if report.get(column) is not None:
                    writer.add_scalar(f"test/{column}/{method}", report[column], 0)
            if report.get("calibration"):
                writer.add_scalar(f"test/ece/{method}", report["calibration"]["ece"], 0)
    print(f"\n{tables}\n(report, tables and plots in {out})", flush=True)
    return results
