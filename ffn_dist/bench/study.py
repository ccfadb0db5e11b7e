"""`ffn bench accuracy --study NAME`: which stage-1 branches to fuse, measured on CIFAR-10-LT.

A study file (`configs/studies/NAME.yaml`, or a path) names the branches to train and the
fusions to compare, each a list of those branches. A seed's run trains every branch once (one
stage 1, a process group a branch, on the schedule's recipe) and caches every branch's unit
embedding; each fusion is then FFN's classifier at every point of the simplex of its branches
in steps of 0.1 (a line for two branches, a grid for three), the other branches weighted 0, its
weights chosen on val and scored on test. The first fusion is the reference: every other one is
compared with it seed by seed (the same split, the same backbones).

Weighting a branch 0 leaves it out of z exactly (CachedSplit.fuse), and stage 2 starts from a
cosine head the fusion weighs (config.head_branch), so a fusion's classifier is the one a run of
its branches alone trains on the same backbones. What sharing stage 1 changes is only which
seed each backbone starts from (a branch's seed is drawn from the run's seed and its position).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from ffn_dist.bench.accuracy import CONFIG, cifar_overrides, over_seeds_of, prepare_cifar10_lt, write_summary
from ffn_dist.config import ConfigError, describe_branch, load_config, shipped_configs, yaml_line
from ffn_dist.drivers import GRID_STEP, fused_sweep, val_choice
from ffn_dist.errors import FFNError
from ffn_dist.files import write_json
from ffn_dist.fusion import describe_fusion, equal_weights, simplex_grid
from ffn_dist.rundir import holding
from ffn_dist.stages.cache import open_run_cache
from ffn_dist.stages.evaluate import branch_name
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

STUDY_KEYS = ("branches", "fusions")


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    branches: dict  # a config's `branches` section, as the file spells it
    fusions: dict[str, list[str]]  # a fusion's name -> the branches it weighs
    described: dict[str, str]  # a branch's name -> how it trains ('kps loss, cosine head')

    @property
    def reference(self) -> str:
        return next(iter(self.fusions))


def study_path(name_or_path: str) -> Path:
    """A study file, or the name of a shipped one (`branches`: configs/studies/branches.yaml)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs() / "studies" / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in (shipped_configs() / "studies").glob("*.yaml")))
    raise FFNError(f"--study {name_or_path}: no such file, nor a shipped study (shipped: {names})")


def read_study(name_or_path: str) -> Study:
    """The study file, checked: its branches as a config checks them, and each fusion two or
    more of those branches, each once; refused naming the file and the key otherwise."""
    path = study_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise FFNError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict) or set(raw) != set(STUDY_KEYS):
        got = ", ".join(raw) if isinstance(raw, dict) else repr(raw)
        raise FFNError(f"{path}: expected the keys {' and '.join(STUDY_KEYS)}, got {got}")
    try:
        branches = load_config(None, [_override("branches", raw["branches"])]).branches
    except ConfigError as exc:
        raise FFNError(f"{path}: {exc}") from None
    fusions = raw["fusions"]
    if not isinstance(fusions, dict) or not fusions:
        raise FFNError(f"{path}: fusions: expected a mapping of name: [branch, ...], got {fusions!r}")
    for name, listed in fusions.items():
        if not isinstance(listed, list) or len(listed) < 2 or len(set(map(str, listed))) != len(listed):
            raise FFNError(
                f"{path}: fusions.{name}: expected two branches or more, each once, got {listed!r}"
            )
        unknown = [b for b in listed if b not in branches]
        if unknown:
            raise FFNError(
                f"{path}: fusions.{name}: {unknown[0]} is not a branch of the study ({', '.join(branches)})"
            )
    described = {name: describe_branch(branch) for name, branch in branches.items()}
    return Study(path.stem, path, raw["branches"], {str(k): list(v) for k, v in fusions.items()}, described)


def _override(key: str, value) -> str:
    return f"{key}={yaml_line(value)}"


def within(names: list[str], weights: dict[str, float]) -> dict[str, float]:
    """A fusion of some branches as a fusion of all `names` (in their order): the others at 0."""
    return {name: weights.get(name, 0.0) for name in names}


def study_overrides(study: Study, schedule_overrides: list[str]) -> list[str]:
    """The run of a study: its branches, a process each, fused as the reference by default."""
    names = list(study.branches)
    listed = study.fusions[study.reference]
    reference = within(names, dict(zip(listed, equal_weights(len(listed)), strict=True)))
    return [
        *schedule_overrides,
        _override("branches", study.branches),
        _override("stage2.fusion", reference),
        f"dist.nproc={len(names)}",
    ]


def _corner(sweep: list[dict], branch: str) -> dict | None:
    return next((p for p in sweep if p["fusion"].get(branch) == 1.0), None)


def run_study_seed(study: Study, schedule: str, archive: Path, work: Path, seed: int) -> dict:
    """One seed: the run of every branch, then each fusion's sweep; its figures, also written to
    `work/SCHEDULE/study_NAME/seedN/study.json`."""
    began = time.perf_counter()
    images, splits = prepare_cifar10_lt(archive, work, seed)
    out = work / schedule / f"study_{study.name}" / f"seed{seed}"
    cfg = load_config(CONFIG, study_overrides(study, cifar_overrides(images, splits, out, seed, schedule)))
    names = list(cfg.branches)
    print(f"\n[study {study.name}] seed {seed}: branches {', '.join(names)} in {out}", flush=True)
    fusions = {}
    with holding(cfg.output_dir):  # the run and the sweeps, one job
        results = run_pipeline(cfg)
        seconds = dict(results["seconds"])
        cache = open_run_cache(cfg)
        with timed(seconds, "sweeps"):
            for name, listed in study.fusions.items():
                grid = simplex_grid(listed, GRID_STEP)
                print(f"[study {study.name}] {name}: {len(grid)} fusions of {', '.join(listed)}", flush=True)
                swept = fused_sweep(cfg, cache, [within(names, point) for point in grid])
                chosen = val_choice(swept)
                if chosen is None:
                    raise FFNError(
                        f"{cfg.data.val_split}: the study chooses each fusion on val, and found none"
                    )
                fusions[name] = {
                    "branches": listed,
                    "chosen": {b: chosen["fusion"][b] for b in listed},
                    "test": {k: chosen["test"].get(k) for k in ACCURACY_COLUMNS},
                    "sweep": [
                        {
                            "fusion": {b: r["fusion"][b] for b in listed},
                            "val": r["val"]["top1"],
                            "top1": r["test"]["top1"],
                        }
                        for r in swept
                    ],
                }
    seconds["total"] = round(time.perf_counter() - began, 1)
    body = {
        "seed": seed,
        "branches": {
            b: {
                "settings": study.branches[b],
                "own_head": results["methods"][branch_name(b)]["top1"],
                "features_alone": next(  # None for a branch no fusion weighs
                    (p["top1"] for f in fusions.values() if (p := _corner(f["sweep"], b)) is not None), None
                ),
            }
            for b in names
        },
        "fusions": fusions,
        "seconds": seconds,
    }
    write_json(out / "study.json", body)
    return body


def summarise_study(study: Study, schedule: str, runs: list[dict]) -> tuple[dict, str]:
    """Each fusion over the seeds: test accuracy at its val-chosen weights, the weights chosen,
    its paired difference to the reference; the branches alone; every sweep; the verdict."""
    seeds = [run["seed"] for run in runs]
    reference = study.reference
    fusions = {}
    for name in study.fusions:
        per_run = [run["fusions"][name] for run in runs]
        differences = [
            f["test"]["top1"] - run["fusions"][reference]["test"]["top1"]
            for f, run in zip(per_run, runs, strict=True)
        ]
        fusions[name] = {
            "branches": per_run[0]["branches"],
            "test": {c: over_seeds([f["test"][c] for f in per_run]) for c in ACCURACY_COLUMNS},
            "chosen": [f["chosen"] for f in per_run],
            "vs_reference": over_seeds(differences) if name != reference else None,
            "better_seeds": sum(d > 0 for d in differences) if name != reference else None,
            "sweep": [
                {"fusion": point["fusion"], "top1": over_seeds([f["sweep"][i]["top1"] for f in per_run])}
                for i, point in enumerate(per_run[0]["sweep"])
            ],
        }
    branches = {
        b: {k: over_seeds([run["branches"][b][k] for run in runs]) for k in ("own_head", "features_alone")}
        for b in runs[0]["branches"]
    }
    better = [n for n, f in fusions.items() if f["better_seeds"] == len(runs)]
    body = {
        "study": str(study.path),
        "schedule": schedule,
        "command": f"ffn bench accuracy --study {study.name} --schedule {schedule} --seeds {len(runs)}",
        "seeds": seeds,
        "branches": branches,
        "fusions": fusions,
        "better_than_reference_on_every_seed": better,
        "seconds": {k: round(sum(run["seconds"].get(k, 0.0) for run in runs), 1) for k in runs[0]["seconds"]},
    }
    return body, study_markdown(study, body)


def _shown_weights(chosen: list[dict]) -> str:
    return "; ".join(describe_fusion(c) for c in chosen)


def study_markdown(study: Study, body: dict) -> str:
    seeds = body["seeds"]
    stat = "mean ± std over seeds " + ", ".join(map(str, seeds)) if len(seeds) > 1 else f"seed {seeds[0]}"
    reference = study.reference
    rows = [
        [
            name,
            *(spread(f["test"][c]) for c in ACCURACY_COLUMNS),
            per_seed(f["test"]["top1"]),
            "reference" if f["vs_reference"] is None else spread(f["vs_reference"], signed=True),
            _shown_weights(f["chosen"]),
        ]
        for name, f in body["fusions"].items()
    ]
    branch_rows = [
        [b, study.described[b], spread(s["own_head"]), spread(s["features_alone"])]
        for b, s in body["branches"].items()
    ]
    lines = [
        f"# Study `{study.name}`: CIFAR-10-LT (IF 100), schedule `{body['schedule']}`, "
        f"test accuracy (%), {stat}",
        "",
        f"`{body['command']}`. Each fusion is FFN's classifier on its branches, the weights chosen on val "
        f"from the simplex in steps of {GRID_STEP:g}; 'vs {reference}' is the paired difference in "
        "test top-1 (seed by seed: the same split and backbones).",
        "",
        markdown_table(
            [
                "fusion",
                *column_names(),
                "top-1 per seed",
                f"vs {reference}",
                "weights chosen on val (per seed)",
            ],
            rows,
        ),
        "",
        _verdict(body, reference, len(seeds)),
        "",
        "## Each branch alone",
        "",
        "Its own stage-1 head, and FFN's classifier on its features alone (its corner of a sweep).",
        "",
        markdown_table(
            ["branch", "trained with", "own head top-1", "its features, FFN's classifier"], branch_rows
        ),
    ]
    for name, f in body["fusions"].items():
        table = triangle_table(f) if len(f["branches"]) == 3 else sweep_table(f)
        lines += ["", f"## Sweep: {name} ({len(f['sweep'])} fusions)", "", table]
    lines += [
        "",
        "wall time over all seeds (s): " + ", ".join(f"{k} {v:g}" for k, v in body["seconds"].items()),
    ]
    return "\n".join(lines) + "\n"


def sweep_table(fusion: dict) -> str:
    """A row per point of a sweep: its weights, test top-1 over seeds and per seed."""
    return markdown_table(
        [*fusion["branches"], "test top-1", "per seed"],
        [
            [*(f"{w:.1f}" for w in p["fusion"].values()), spread(p["top1"]), per_seed(p["top1"])]
            for p in fusion["sweep"]
        ],
    )


def triangle_table(fusion: dict) -> str:
    """A simplex of three branches as a triangle: the first branch's weight a row, the
    second's a column, the third's the rest; each cell the mean test top-1 over seeds."""
    first, second, third = fusion["branches"]
    cells = {(p["fusion"][first], p["fusion"][second]): p["top1"]["mean"] for p in fusion["sweep"]}
    rows_of = sorted({a for a, _ in cells})
    columns = sorted({b for _, b in cells})
    return (
        markdown_table(
            [f"{first} \\ {second}", *(f"{b:.1f}" for b in columns)],
            [
                [f"{a:.1f}", *(number(cells.get((a, b))) if (a, b) in cells else "" for b in columns)]
                for a in rows_of
            ],
        )
        + f"\n\n({third}: 1 minus the other two; the mean test top-1 over the seeds)"
    )


def _verdict(body: dict, reference: str, seeds: int) -> str:
    others = {n: f for n, f in body["fusions"].items() if n != reference}
    better = body["better_than_reference_on_every_seed"]
    if better:
        named = ", ".join(f"{n} ({spread(others[n]['vs_reference'], signed=True)} points)" for n in better)
        return f"Better than {reference} on every seed: {named}."
    best = max(others, key=lambda n: others[n]["vs_reference"]["mean"])
    return (
        f"None is better than {reference} on every seed; the closest, {best}, differs by "
        f"{spread(others[best]['vs_reference'], signed=True)} points (better on "
        f"{others[best]['better_seeds']} of {seeds} seeds)."
    )


def bench_study(
    study_name: str, schedule: str, archive: str | None, work_dir: str, seeds: int
) -> dict | None:
    study = read_study(study_name)
    ran = over_seeds_of(
        archive, work_dir, seeds, lambda found, work, seed: run_study_seed(study, schedule, found, work, seed)
    )
    if ran is None:
        return None
    work, runs = ran
    return write_summary(
        work / schedule / f"study_{study.name}", "study", *summarise_study(study, schedule, runs)
    )
