"""Fusion weights: a weight per branch on the simplex (they sum to 1), as `stage2.fusion`
holds them, and the points a fusion sweep visits.

The weights are a mapping of branch name to weight, in the order they are summed; every
function here keeps that order, so a point of a sweep fuses exactly as the config it came from.
"""

from __future__ import annotations

import functools
import math
import operator
from itertools import product

from ffn_dist.errors import FFNError

DIGITS = 6  # weights are rounded here: a sweep's 0.7 is the config's 0.7, not 0.7000000000000001


def check_weights(weights: dict[str, float]) -> None:
    """Refuse weights off the simplex: a negative one, or a sum other than 1."""
    if not weights:
        raise FFNError("expected a weight per branch, got none")
    negative = [name for name, w in weights.items() if w < 0]
    if negative:
        raise FFNError(f"a fusion weight must be >= 0, got {negative[0]}: {weights[negative[0]]:g}")
    total = sum(weights.values())
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        terms = " + ".join(f"{w:g}" for w in weights.values())
        raise FFNError(f"the fusion weights must sum to 1, got {terms} = {total:g} ({', '.join(weights)})")


def weighed(weights: dict[str, float]) -> dict[str, float]:
    """The branches a fusion uses: those of a weight other than 0, in order."""
    return {name: w for name, w in weights.items() if w != 0}


def weighted_sum(values: dict, weights: dict[str, float]):
    """sum_b w_b values[b], in the order of `weights`, over the branches of a weight other than
    0 (tensors, arrays or numbers; a term of weight 0 would add exactly nothing)."""
    terms = [w * values[name] for name, w in weighed(weights).items()]
    return functools.reduce(operator.add, terms)


def equal_weights(count: int) -> list[float]:
    """`count` equal weights summing to 1 (the last takes the rounding)."""
    share = round(1.0 / count, DIGITS)
    return [share] * (count - 1) + [round(1.0 - share * (count - 1), DIGITS)]


def describe_fusion(weights: dict[str, float]) -> str:
    """'kps 0.5, ce 0.5': the weights as a report row or a log line names them."""
    return ", ".join(f"{name} {w:g}" for name, w in weights.items())


def weight_text(weight: float) -> str:
    """'0.50', '0.505': a weight with at least 2 decimals and every one that DIGITS keeps, so
    that two weights differing anywhere DIGITS sees are spelled differently."""
    whole, _, decimals = f"{round(weight, DIGITS):.{DIGITS}f}".rstrip("0").partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


def fusion_slug(weights: dict[str, float]) -> str:
    """'kps0.50_ce0.50', 'kps0.505_ce0.495': the weights as a directory name, one per fusion."""
    return "_".join(f"{name}{weight_text(w)}" for name, w in weights.items())


def one_hot(names, name: str) -> dict[str, float]:
    """One branch's features alone: weight 1 on `name`, 0 on the others."""
    return {other: 1.0 if other == name else 0.0 for other in names}


def along(weights: dict[str, float], name: str, values: list[float]) -> list[dict[str, float]]:
    """Two branches: `name` at each of `values`, the other branch at 1 minus it."""
    if name not in weights or len(weights) != 2:
        raise FFNError(
            f"a sweep along one weight needs two branches and one of their names, got {name!r} "
            f"and the branches {', '.join(weights)}"
        )
    return [{n: v if n == name else round(1.0 - v, DIGITS) for n in weights} for v in values]


def simplex_grid(names, step: float) -> list[dict[str, float]]:
    """Every point of the simplex over `names` whose weights are multiples of `step` (1/step a
    whole number), the first name's weight rising slowest; the last weight takes the rounding."""
    names = list(names)
    parts = round(1.0 / step) if step > 0 else 0
    if parts < 1 or not math.isclose(parts * step, 1.0, abs_tol=1e-9):
        raise FFNError(f"a simplex grid's step must divide 1 (0.1, 0.25, 0.5), got {step:g}")
    points = []
    for counts in product(range(parts + 1), repeat=len(names) - 1):
        if sum(counts) <= parts:
            head = [round(c / parts, DIGITS) for c in counts]
            points.append(dict(zip(names, [*head, round(1.0 - sum(head), DIGITS)], strict=True)))
    return points
