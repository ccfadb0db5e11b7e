"""`ffn bench accuracy`: FFN on CIFAR-10-LT (IF 100) built from real CIFAR-10 JPEGs.

Builds the long-tailed split (docs/method.md, data: exactly 12,406 training images) from
`cifar10-jpeg.tar.gz`, runs the whole pipeline with the chosen stage-1 schedule, sweeps the
fusion over the simplex in steps of 0.1 (its corners are the fair single-branch baselines: the
same stage-2 classifier on one branch's features), and reports each branch alone, FFN at the
recipe's fusion and the sweep, as JSON and Markdown.

Schedules: `paper` is the recipe of docs/method.md (200 epochs: a GPU job); `cpu` is 11 epochs, linear
warm-up over the first, x0.1 at 80% and x0.01 at 90% of training, KPS per-class scale from
60%, both branches concurrently (one process each): about half an hour on a 2-core CPU.
"""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path

from ffn_dist.config import load_config, shipped_configs
from ffn_dist.data.longtail import make_lt
from ffn_dist.drivers import GRID_STEP, compare_methods, fused_sweep, summarise_seeds, val_choice
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json, write_text
from ffn_dist.fusion import describe_fusion, simplex_grid
from ffn_dist.registry import METHODS
from ffn_dist.rundir import holding
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.evaluate import branch_name, classifier_name
from ffn_dist.stages.pipeline import run_pipeline, timed
from ffn_dist.tables import (
    ACCURACY_COLUMNS,
    column_names,
    markdown_table,
    number,
    over_seeds,
    per_seed,
    spread,
)

CONFIG = shipped_configs() / "cifar10_lt_r32.yaml"
ARCHIVE = "cifar10-jpeg.tar.gz"
# IF 100 (12,406 images), less the 100 validation images the head class gives up
VAL_PER_CLASS = 100
EXPECTED_COUNTS = [4900, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
SCHEDULES = {
    "paper": [],  # the config is the paper's recipe
    "cpu": [
        "stage1.epochs=11",
        "stage1.warmup_epochs=1",
        "stage1.lr_milestones=[8.8, 9.9]",  # 80% and 90% of 11 epochs
        "stage1.lr_factors=[0.1, 0.01]",
        "stage1.kps_ga_epoch=7",  # the first epoch at or past 60% (6.6)
        "stage1.eval_every=11",
        "stage1.checkpoint_every=1",
        "dist.nproc=2",
        "data.num_threads=1",
    ],
}
# Measured outside the project with exactly the cpu schedule on the same JPEGs (issue #7).
# The sweep's first and last points: the CE branch's features alone, the KPS branch's.
CPU_CALIBRATION = {"CE": 32.9, "KPS": 20.9, "FFN": 57.2, "sweep_first": 53.3, "sweep_last": 59.5}
# The paper's Table 5, CIFAR-10-LT IF 100, ResNet-32 (the fusion sweep of its Table 3 peaks
# inside the simplex on CIFAR-10-LT: at 0.5 and 0.5 for IF 200).
PAPER_TABLE5 = {"CE": 70.70, "KPS": 79.93, "FFN": 85.24}


def default_archive() -> Path:
    """$FFN_CIFAR10_ARCHIVE, else ../shared/data/ beside the checkout (this project's machines)."""
    given = os.environ.get("FFN_CIFAR10_ARCHIVE")
    return Path(given) if given else Path(__file__).resolve().parents[3] / "shared" / "data" / ARCHIVE


def prepare_cifar10_lt(archive: Path, work_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Extract the JPEGs (once) and write the IF-100 splits with a val split, the images of
    each class drawn with `seed`; returns (image root, split dir)."""
    images, splits = work_dir / "cifar10", work_dir / f"cifar10_lt_seed{seed}"
    if not (images / ".complete").is_file():
        print(f"extracting {archive} -> {images}", flush=True)
        images.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as handle:
            handle.extractall(images, filter="data")
        (images / ".complete").write_text("ok\n")
    if not (splits / "train.txt").is_file() or not (splits / "val.txt").is_file():
        result = make_lt(images, splits, "exp", 100, seed=seed, val_per_class=VAL_PER_CLASS)
        if result["train_counts"] != EXPECTED_COUNTS:
            raise FFNError(f"CIFAR-10-LT counts {result['train_counts']}, expected {EXPECTED_COUNTS}")
    return images, splits


def cifar_overrides(images: Path, splits: Path, output_dir: Path, seed: int, schedule: str) -> list[str]:
    """The CIFAR-10-LT config's overrides for one seed's split, run directory and schedule."""
    return [
        f"data.root={images}",
        f"data.train_split={splits / 'train.txt'}",
        f"data.test_split={splits / 'test.txt'}",
        f"data.val_split={splits / 'val.txt'}",
        f"output_dir={output_dir}",
        f"seed={seed}",
        *SCHEDULES[schedule],
    ]


def bench_archive(given: str | None) -> Path | None:
    """The archive to read (--archive, else `default_archive`); None, saying so, where it is absent."""
    archive = Path(given) if given else default_archive()
    if not archive.is_file():
        print(f"skipped: {archive} not found (the CIFAR-10 JPEGs, --archive); nothing was run")
        return None
    return archive


def _row(report: dict) -> dict:
    return {k: report.get(k) for k in ACCURACY_COLUMNS}


def _compared(measured: dict, reference: dict, name: str, lines: list[str]) -> dict:
    """Measured (mean) top-1 against reference figures: a JSON block, and a table into `lines`."""
    block = {
        k: {"measured": measured[k], name: v, "difference": measured[k] - v} for k, v in reference.items()
    }
    rows = [[k, number(c["measured"]), number(c[name]), f"{c['difference']:+.2f}"] for k, c in block.items()]
    lines += ["", markdown_table([f"top-1 against the {name}", "measured", name, "difference"], rows)]
    return block


def run_seed(schedule: str, archive: Path, work: Path, seed: int) -> dict:
    """The whole pipeline, the fusion sweep and every method on one seed's split and training;
    its figures, also written to `work/SCHEDULE/seedN/accuracy.json`."""
    began = time.perf_counter()
    images, splits = prepare_cifar10_lt(archive, work, seed)
    cfg = load_config(
        CONFIG, cifar_overrides(images, splits, work / schedule / f"seed{seed}", seed, schedule)
    )
    print(f"\n[bench accuracy] seed {seed}: {cfg.output_dir}", flush=True)
    with holding(cfg.output_dir):  # the pipeline and the sweep, one job
        results = run_pipeline(cfg)
        seconds = dict(results["seconds"])
        cache = open_run_cache(cfg)
        with timed(seconds, "sweep"):
            sweep = fused_sweep(cfg, cache, simplex_grid(cfg.stage2.fusion, GRID_STEP))
        with timed(seconds, "methods"):  # every classifier method on every feature source
            compared = compare_methods(cfg, cache, list(METHODS))
    seconds["total"] = round(time.perf_counter() - began, 1)
    stage1 = results["methods"]
    body = {
        "seed": seed,
        "train_counts": results["train_counts"],
        "figures": {
            **{branch_name(b): _row(stage1[branch_name(b)]) for b in cfg.branches},
            "FFN": _row(stage1[classifier_name(cfg)]),
        },
        "fusion": cfg.stage2.fusion,
        "sweep": [{"fusion": r["fusion"], **_row(r["test"])} for r in sweep],
        "sweep_chosen_on_val": (val_choice(sweep) or {}).get("fusion"),
        "methods": {k: compared[k] for k in ("selected_on", "best_on_val", "rows")},
        "seconds": seconds,
    }
    write_json(Path(cfg.output_dir) / "accuracy.json", body)
    return body


def summarise_runs(schedule: str, runs: list[dict]) -> tuple[dict, str]:
    """Each figure over the seeds (mean ± std and the per-seed values): JSON and Markdown."""
    figures = {
        name: {c: over_seeds([run["figures"][name][c] for run in runs]) for c in ACCURACY_COLUMNS}
        for name in runs[0]["figures"]
    }
    sweep = [
        {"fusion": point["fusion"], "top1": over_seeds([run["sweep"][i]["top1"] for run in runs])}
        for i, point in enumerate(runs[0]["sweep"])
    ]
    peak = max(sweep, key=lambda p: p["top1"]["mean"])
    methods = summarise_seeds([{"seed": run["seed"], **run["methods"]} for run in runs])
    seeds = [run["seed"] for run in runs]
    body = {
        "schedule": schedule,
        "command": f"ffn bench accuracy --schedule {schedule} --seeds {len(runs)}",
        "seeds": seeds,
        "train_counts": runs[0]["train_counts"],
        "figures": figures,
        "sweep": sweep,
        "sweep_peak": peak["fusion"],
        "sweep_peaks_inside": bool(max(peak["fusion"].values()) < 1.0),  # no branch alone
        "methods": methods["rows"],
        "selected_on_val": methods["selected_on_val"],
        "verdict": methods["verdict"],
        "seconds": {k: round(sum(run["seconds"][k] for run in runs), 1) for k in runs[0]["seconds"]},
    }
    stat = "mean ± std over seeds " + ", ".join(map(str, seeds)) if len(runs) > 1 else f"seed {seeds[0]}"
    names = list(runs[0]["fusion"])
    lines = [
        f"# CIFAR-10-LT (IF 100), schedule `{schedule}`: test accuracy (%), {stat}",
        "",
        markdown_table(
            ["", *column_names(), "top-1 per seed"],
            [
                [name if name != "FFN" else f"FFN ({describe_fusion(runs[0]['fusion'])})"]
                + [spread(s) for s in stats.values()]
                + [per_seed(stats["top1"])]
                for name, stats in figures.items()
            ],
        ),
        "",
        f"## The fusion sweep (FFN's classifier on sum_b w_b f̂_b, steps of {GRID_STEP:g})",
        "",
        markdown_table(
            [*names, "test top-1", "per seed"],
            [
                [*(f"{w:.1f}" for w in p["fusion"].values()), spread(p["top1"]), per_seed(p["top1"])]
                for p in sweep
            ],
        ),
        "",
        f"The mean peaks at {describe_fusion(peak['fusion'])}, "
        + ("inside the simplex." if body["sweep_peaks_inside"] else "at a corner: one branch alone."),
        "",
        "## Classifier methods on the cache (`ffn train-classifier --methods all`)",
        "",
        "Hyperparameters chosen on val; 'vs FFN' is the paired difference in test top-1 to FFN's "
        "classifier on the same seed's fused features (the fusion chosen on val).",
        "",
        methods["table"],
        "",
        "wall time over all seeds (s): " + ", ".join(f"{k} {v:g}" for k, v in body["seconds"].items()),
    ]
    measured = {name: figures[name]["top1"]["mean"] for name in figures}
    if schedule == "cpu":
        measured.update(sweep_first=sweep[0]["top1"]["mean"], sweep_last=sweep[-1]["top1"]["mean"])
        body["calibration"] = _compared(measured, CPU_CALIBRATION, "calibration", lines)
    else:
        body["paper"] = _compared(measured, PAPER_TABLE5, "paper", lines)
    return body, "\n".join(lines) + "\n"


def over_seeds_of(archive: str | None, work_dir: str, seeds: int, run_one) -> tuple[Path, list[dict]] | None:
    """`run_one(archive, work, seed)` for the seeds 0..seeds-1: the work directory and each
    seed's figures; None, saying so, where the archive is absent."""
    if seeds < 1:
        raise FFNError(f"--seeds {seeds}: expected 1 or more")
    found = bench_archive(archive)
    if found is None:
        return None
    work = Path(work_dir).resolve()
    return work, [run_one(found, work, seed) for seed in range(seeds)]


def write_summary(out: Path, stem: str, body: dict, markdown: str) -> dict:
    """`out/STEM.json` and `out/STEM.md`, and the Markdown on the console."""
    write_json(out / f"{stem}.json", body)
    write_text(out / f"{stem}.md", markdown)
    print("\n" + markdown + f"\n(JSON and Markdown in {out}; each seed's run in {out}/seedN)", flush=True)
    return body


def bench_accuracy(schedule: str, archive: str | None, work_dir: str, seeds: int = 1) -> dict | None:
    ran = over_seeds_of(
        archive, work_dir, seeds, lambda found, work, seed: run_seed(schedule, found, work, seed)
    )
    if ran is None:
        return None
    work, runs = ran
    return write_summary(work / schedule, "accuracy", *summarise_runs(schedule, runs))
