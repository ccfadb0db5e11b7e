"""The one Markdown table writer, and the cells that go in it: accuracies, and figures over
seeds as mean ± standard deviation. Every table `ffn` prints or writes (the report, the fusion
sweep, `--methods`, the benchmarks) is made here."""

from __future__ import annotations

import statistics

# The one list of a report's metric columns. The epoch logs, the sweep table and model.json
# carry the first five; the report's tables add the head and tail halves.
SHOT_COLUMNS = ("top1", "top5", "many", "medium", "few")
ACCURACY_COLUMNS = (*SHOT_COLUMNS, "head", "tail")
COLUMN_NAMES = {"top1": "top-1", "top5": "top-5", "head": "head half", "tail": "tail half"}


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def column_names(columns=ACCURACY_COLUMNS) -> list[str]:
    return [COLUMN_NAMES.get(c, c) for c in columns]


def accuracy_cells(report: dict | None, columns=ACCURACY_COLUMNS) -> list[str]:
    """A report's accuracies (%), '-' where a figure is missing (a shot group with no class)."""
    return [number((report or {}).get(c)) for c in columns]


def over_seeds(values: list[float | None]) -> dict | None:
    """Mean, sample standard deviation (0 for one seed) and the values themselves; None where
    any seed lacks the figure."""
    if not values or any(v is None for v in values):
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "values": list(values)}


def spread(stats: dict | None, digits: int = 2, signed: bool = False) -> str:
    """'57.12 ± 0.84' (one seed: '57.12'); '-' for a missing figure."""
    if stats is None:
        return "-"
    mean = f"{stats['mean']:+.{digits}f}" if signed else f"{stats['mean']:.{digits}f}"
    return mean if len(stats["values"]) == 1 else f"{mean} ± {stats['std']:.{digits}f}"


def per_seed(stats: dict | None, digits: int = 2) -> str:
    return "-" if stats is None else ", ".join(f"{v:.{digits}f}" for v in stats["values"])
