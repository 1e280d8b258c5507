"""Claims read on the reward-KL frontier, from per-prompt results alone.

A method is a curve of evaluated policies (its betas), each trained with one or more seeds; every policy
answered the same held-out prompts with the same random numbers. Two methods are compared where both
curves reach the same KL to SFT (``matched_kl``) or the same sample length (``matched_length``), or each
at its picked beta (``at_pick``):

- Each seed's curve is read at the point by linear interpolation between the two betas whose means
  bracket it (``read_seed``). Each prompt's term in that reading is its first-order share of the
  interpolated value, which also carries the error of where the curve reaches the point, since KL (or
  length) is estimated from the same samples (derivatives ``1 - t``, ``t`` in the two metrics and
  ``-s (1 - t)``, ``-s t`` in the two positions, ``s`` the slope between them).
- A method's reading is the mean over its seeds, per prompt and in level. The contrast's standard error
  is the spread over prompts of the paired per-prompt differences, plus, for each side with several
  seeds, the variance of its seeds' readings over their number (conservative: that variance also holds
  the prompt noise each seed repeats).
- The point must lie inside every seed's curve of both methods; otherwise the claim is not read (n 0).
- A contrast of four curves ``(a, b, c, d)`` reads ``(a - b) - (c - d)``, whether one change helps one
  method more than another (rounds against one round, say), the same way: per prompt, seeds' variance of
  every side added.

A curve's points are its betas, or one beta's policies after different numbers of optimiser steps (the
rounds of iterative alignment); ``step`` tells those apart.

The per-prompt table (``per_prompt.csv``: one row per policy and prompt) is what the reports write and
what every claim is recomputed from, so ``claims.json`` follows from committed files alone.
"""

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from directalign.claims import Estimate
from directalign.errors import ConfigError, DataError

# The per-prompt means a policy carries; kl_to_ref is the mean summed log-ratio of its samples.
METRICS = ("proxy_reward", "gold_reward", "length_tokens", "kl_to_ref")
PER_PROMPT_COLUMNS = (
    "curve",
    "method",
    "length_power",
    "beta",
    "seed",
    "step",
    "prompt",
    "n_samples",
    *METRICS,
)
ALONG = {"kl_to_ref": "matched_kl", "length_tokens": "matched_length"}
SFT = "sft"


@dataclass(frozen=True)
class Point:
    """One evaluated policy on a curve: its beta and training seed, each metric's per-prompt means, and
    the optimiser steps that trained it (None where the table leaves them out)."""

    curve: str
    beta: float
    seed: int
    means: dict[str, dict[str, float]]
    step: int | None = None

    def level(self, metric: str) -> float:
        """The metric's mean over prompts."""
        return float(np.mean(list(self.means[metric].values())))


@dataclass(frozen=True)
class Reading:
    """A method's curve read at one point: the level (mean over seeds), each prompt's term (mean over
    seeds) and every seed's own level."""

    value: float
    terms: dict[str, float]
    seed_values: list[float]


def read_seed(points: Sequence[Point], metric: str, along: str, at: float) -> tuple[float, dict[str, float]]:
    """One seed's curve at ``along == at``: the interpolated level and each prompt's term (module
    docstring). The caller checks that ``at`` is inside the curve."""
    ordered = sorted(points, key=lambda p: p.level(along))
    for low, high in pairwise(ordered):
        low_at, high_at = low.level(along), high.level(along)
        if low_at <= at <= high_at:
            span = high_at - low_at
            weight = 0.0 if span == 0 else (at - low_at) / span
            slope = 0.0 if span == 0 else (high.level(metric) - low.level(metric)) / span
            prompts = set(low.means[metric]) & set(high.means[metric])
            terms = {
                prompt: sum(
                    share * (p.means[metric][prompt] - slope * p.means[along][prompt])
                    for share, p in ((1 - weight, low), (weight, high))
                )
                for prompt in prompts
            }
            return (1 - weight) * low.level(metric) + weight * high.level(metric), terms
    raise DataError(f"curve {points[0].curve} seed {points[0].seed}: {along} {at} is outside its range")


def span(seeds: dict[int, list[Point]], along: str) -> tuple[float, float]:
    """The range of ``along`` that every seed's curve covers."""
    return (
        max(min(p.level(along) for p in points) for points in seeds.values()),
        min(max(p.level(along) for p in points) for points in seeds.values()),
    )


def common_range(curves: Iterable[dict[int, list[Point]]], along: str) -> tuple[float, float] | None:
    """The range of ``along`` inside every seed's curve of every method given; None if they share none."""
    spans = [span(seeds, along) for seeds in curves]
    low, high = max(s[0] for s in spans), min(s[1] for s in spans)
    return (low, high) if low <= high else None


def read_curve(seeds: dict[int, list[Point]], metric: str, along: str | None, at: float | None) -> Reading:
    """A method at ``along == at`` (each seed interpolated), or, with ``along`` None, its one point a
    seed (the picked beta)."""
    per_seed = []
    for seed, points in sorted(seeds.items()):
        if along is None:
            if len(points) != 1:
                raise DataError(
                    f"curve {points[0].curve} seed {seed}: {len(points)} policies where one is picked"
                )
            per_seed.append((points[0].level(metric), points[0].means[metric]))
        else:
            per_seed.append(read_seed(points, metric, along, at))
    prompts = sorted(set.intersection(*(set(terms) for _, terms in per_seed)))
    return Reading(
        value=float(np.mean([value for value, _ in per_seed])),
        terms={prompt: float(np.mean([terms[prompt] for _, terms in per_seed])) for prompt in prompts},
        seed_values=[value for value, _ in per_seed],
    )


# The sign of each curve in a contrast of two (a - b) or four ((a - b) - (c - d)).
SIGNS = {2: (1, -1), 4: (1, -1, -1, 1)}


def contrast(*sides: Reading) -> tuple[float, float, int]:
    """``first - second`` (or ``(a - b) - (c - d)`` of four): mean, standard error (paired over prompts,
    plus each side's between-seed variance) and the number of paired prompts."""
    if len(sides) not in SIGNS:
        raise ValueError(f"a contrast reads two or four curves, not {len(sides)}")
    signs = SIGNS[len(sides)]
    prompts = sorted(set.intersection(*(set(side.terms) for side in sides)))
    if len(prompts) < 2:
        raise DataError(f"a contrast needs at least 2 prompts every side answered, not {len(prompts)}")
    differences = np.asarray(
        [sum(s * side.terms[p] for s, side in zip(signs, sides, strict=True)) for p in prompts]
    )
    variance = float(differences.var(ddof=1)) / len(prompts)
    for side in sides:
        if len(side.seed_values) > 1:
            variance += float(np.var(side.seed_values, ddof=1)) / len(side.seed_values)
    value = sum(s * side.value for s, side in zip(signs, sides, strict=True))
    return value, math.sqrt(variance), len(prompts)


@dataclass(frozen=True)
class ClaimSpec:
    """A claim to read: ``contrast`` (two curve names, or four: the first pair's difference against the
    second's) moves ``metric`` in ``direction`` (+1, -1, or 0 for either way), read ``along`` KL or
    length at each of ``at`` (empty: the middle of the common range), or, with ``along`` None, each
    method at its picked beta."""

    claim: str
    paper: str
    contrast: tuple[str, ...]
    metric: str
    direction: int
    along: str | None = None
    at: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.metric not in METRICS or (self.along is not None and self.along not in ALONG):
            raise ConfigError(
                f"claim {self.claim!r}: metric {self.metric!r} along {self.along!r}; metric one of"
                f" {list(METRICS)}, along one of {list(ALONG)} or null (at each method's pick)"
            )
        if self.metric == self.along or len(self.contrast) not in SIGNS:
            raise ConfigError(
                f"claim {self.claim!r}: a contrast of two or four curves, a metric other than along"
            )


def curves_of(points: Sequence[Point]) -> dict[str, dict[int, list[Point]]]:
    """Points by curve, then by seed."""
    curves: dict[str, dict[int, list[Point]]] = defaultdict(lambda: defaultdict(list))
    for point in points:
        curves[point.curve][point.seed].append(point)
    return {name: dict(seeds) for name, seeds in curves.items()}


def estimates(
    spec: ClaimSpec, points: Sequence[Point], picks: dict[str, float] | None = None
) -> list[Estimate]:
    """The rows that read ``spec``: one per matched point, or one at the picks."""
    curves = curves_of(points)
    missing = [name for name in spec.contrast if name not in curves]
    if missing:
        raise ConfigError(
            f"claim {spec.claim!r}: no curve {missing} in the results (they have {sorted(curves)})"
        )
    sides = [curves[name] for name in spec.contrast]
    seeds = min(len(side) for side in sides)
    label = f"{spec.contrast[0]} - {spec.contrast[1]}"
    if len(spec.contrast) == 4:
        label = f"({label}) - ({spec.contrast[2]} - {spec.contrast[3]})"
    common = (spec.claim, spec.paper, label, spec.metric, spec.direction)
    if spec.along is None:
        if picks is None or any(name not in picks for name in spec.contrast):
            raise ConfigError(
                f"claim {spec.claim!r}: no picked beta for {list(spec.contrast)} (picks: {picks})"
            )
        picked = [
            {seed: [p for p in side_points if p.beta == picks[name]] for seed, side_points in side.items()}
            for name, side in zip(spec.contrast, sides, strict=True)
        ]
        mean, se, n = contrast(*(read_curve(side, spec.metric, None, None) for side in picked))
        return [Estimate(*common, "at_pick", None, seeds, mean, se, n)]
    found = common_range(sides, spec.along)
    points_at = list(spec.at) or ([] if found is None else [(found[0] + found[1]) / 2])
    rows = []
    for at in points_at or [None]:
        if at is None or found is None or not found[0] <= at <= found[1]:
            rows.append(Estimate(*common, ALONG[spec.along], at, seeds, 0.0, 0.0, 0))
            continue
        mean, se, n = contrast(*(read_curve(side, spec.metric, spec.along, at) for side in sides))
        rows.append(Estimate(*common, ALONG[spec.along], at, seeds, mean, se, n))
    return rows


def pick_betas(points: Sequence[Point], metric: str = "proxy_reward") -> dict[str, float]:
    """Each curve's beta of highest ``metric`` averaged over its seeds (paper B's rule on the proxy)."""
    picks = {}
    for name, seeds in curves_of(points).items():
        by_beta: dict[float, list[float]] = defaultdict(list)
        for side_points in seeds.values():
            for point in side_points:
                by_beta[point.beta].append(point.level(metric))
        picks[name] = max(sorted(by_beta), key=lambda beta: float(np.mean(by_beta[beta])))
    return picks


def per_prompt_rows(records: Sequence[dict[str, Any]], curve_of: dict[int, str]) -> list[dict[str, Any]]:
    """The per-prompt table of evaluated policies: ``records`` as policies.json holds them (with their
    ``prompt_means``), each named by ``curve_of[index]``."""
    rows = []
    for index, record in enumerate(records):
        means = record.get("prompt_means") or {}
        if "proxy_reward" not in means:
            raise DataError(
                f"job {record.get('job', record['method'])} has no per-prompt means (evaluated by an older"
                " version): run its command again to rewrite its results"
            )
        kl = "kl_to_ref" if "kl_to_ref" in means else None
        for prompt in sorted(means["proxy_reward"]):
            rows.append(
                {
                    "curve": curve_of[index],
                    "method": record["method"],
                    "length_power": record.get("length_power"),
                    "beta": record.get("beta"),
                    "seed": record.get("train_seed") or 0,
                    "step": record.get("train_steps"),
                    "prompt": prompt,
                    "n_samples": record.get("n_samples"),
                }
                | {m: means[m][prompt] if m in means else None for m in METRICS if m != "kl_to_ref"}
                | {"kl_to_ref": means[kl][prompt] if kl else 0.0}
            )
    return rows


def write_per_prompt(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """``per_prompt.csv``: floats as Python writes them (shortest exact form), so reading back is exact."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_PROMPT_COLUMNS)
        writer.writeheader()
        writer.writerows([{k: "" if row[k] is None else row[k] for k in PER_PROMPT_COLUMNS} for row in rows])


def read_per_prompt(path: Path) -> list[Point]:
    """The aligned policies of a per-prompt table as curve points (SFT's rows are left out: it is no
    curve's point)."""
    grouped: dict[tuple[str, float, int, int | None], dict[str, dict[str, float]]] = {}
    with path.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if list(row) != list(PER_PROMPT_COLUMNS):
                raise DataError(f"{path}: columns {list(row)} are not {list(PER_PROMPT_COLUMNS)}")
            if row["curve"] == SFT:
                continue
            key = (
                row["curve"],
                float(row["beta"]),
                int(row["seed"]),
                int(row["step"]) if row["step"] else None,
            )
            means = grouped.setdefault(key, {m: {} for m in METRICS})
            for metric in METRICS:
                if row[metric] == "":
                    continue
                value = float(row[metric])
                if not math.isfinite(value):
                    raise DataError(f"{path} line {line}: {metric} {row[metric]!r} is not finite")
                means[metric][row["prompt"]] = value
    return [Point(curve, beta, seed, means, step) for (curve, beta, seed, step), means in grouped.items()]
