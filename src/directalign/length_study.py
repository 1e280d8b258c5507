"""Paper A's length question on a language model, read off beta sweeps.

The length sweep (``make length``) trains and evaluates each loss (dpo, ipo, copg) at length powers
a = 0 (summed log-ratios), 0.5 and 1 (averaged), a few betas each: every (loss, a) is one curve across
beta, named as the sweep report names it (``"dpo a=1"``). Paper A's statement, that averaging trades the
length of generations against their scores, splits into contrasts between two curves of one loss:

- at matched KL to SFT, does averaging change the length (or the score) of samples?
- at matched length, does it change the score?

A claim reads both curves at one point of ``along`` (``kl_to_ref`` or ``length_tokens``): the middle
of the range that both curves span, so neither is extrapolated, each by linear interpolation between
the two betas that bracket the point (``sweep.at_value``). Every policy answered the same prompts with the
same random numbers, so the standard error is paired, over prompts: each prompt's term in the difference
of the two interpolated values, to first order in its per-prompt means (``prompt_terms``). That term also
carries the error of where each curve reaches the point, since ``along`` (KL or length) is estimated from
the same samples; the point itself is held fixed. The verdict is ``claims.py``'s rule (two standard
errors). Curves that share no range give an inconclusive claim with ``n = 0``.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from directalign.claims import Claim, claims_table, verdict, write_claims
from directalign.estimates import mean_and_se
from directalign.plots import plt, save_figure
from directalign.report import write_table
from directalign.sweep import (
    CURVE_METRICS,
    at_value,
    bracket,
    collect_jobs,
    method_groups,
    write_sweep_report,
)
from directalign.validation import ConfigError

log = logging.getLogger(__name__)

STANDARD_ERRORS = dict(CURVE_METRICS)
ALONG = {"kl_to_ref": "KL", "length_tokens": "length"}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DISTRIBUTION_COLUMNS = ("policy", "samples", "mean", *(f"q{round(q * 100)}" for q in QUANTILES), "eos_rate")


@dataclass(frozen=True)
class CurveClaim:
    """A claim that curve ``contrast[0]`` minus curve ``contrast[1]`` moves ``metric`` in ``direction``
    (+1 up, -1 down) where both reach the same ``along``."""

    claim: str
    paper: str
    contrast: tuple[str, str]
    metric: str
    along: str
    direction: int

    def __post_init__(self) -> None:
        if self.metric not in STANDARD_ERRORS or self.along not in ALONG or self.metric == self.along:
            raise ConfigError(
                f"length claim {self.claim!r}: metric {self.metric!r} along {self.along!r}; metric one of"
                f" {sorted(STANDARD_ERRORS)}, along one of {sorted(ALONG)}, not the same"
            )
        if self.direction not in (1, -1) or len(self.contrast) != 2:
            raise ConfigError(f"length claim {self.claim!r}: direction +1 or -1 and a contrast of two curves")


def overlap_midpoint(first: list[dict[str, Any]], second: list[dict[str, Any]], along: str) -> float | None:
    """The middle of the range of ``along`` that both curves span; None if they share none."""
    low = max(min(r[along] for r in first), min(r[along] for r in second))
    high = min(max(r[along] for r in first), max(r[along] for r in second))
    return (low + high) / 2 if low <= high else None


def prompt_terms(group: list[dict[str, Any]], metric: str, along: str, point: float) -> dict[str, float]:
    """Each prompt's term in a curve's ``metric`` at ``along == point``, to first order.

    Between the bracketing betas (low, high) the curve reads ``f = (1 - t) m_low + t m_high`` with
    ``t = (point - a_low) / (a_high - a_low)``, ``m`` and ``a`` the means over prompts of ``metric`` and
    ``along``. Its derivatives are ``1 - t`` and ``t`` in ``m_low`` and ``m_high``, and ``-s (1 - t)`` and
    ``-s t`` in ``a_low`` and ``a_high`` (``s`` the slope between them), so prompt i moves it by
    ``(1 - t) (m_low,i - s a_low,i) + t (m_high,i - s a_high,i)``: terms whose mean is ``f - s point``
    and whose spread over prompts gives ``f``'s standard error.
    """
    low, high, weight = bracket(group, along, point)
    span = high[along] - low[along]
    slope = 0.0 if span == 0 else (high[metric] - low[metric]) / span
    means = [(row["prompt_means"][metric], row["prompt_means"][along]) for row in (low, high)]
    prompts = set.intersection(*(set(values) for pair in means for values in pair))
    return {
        prompt: sum(
            share * (values[prompt] - slope * position[prompt])
            for share, (values, position) in zip((1 - weight, weight), means, strict=True)
        )
        for prompt in prompts
    }


def read_curve_claim(spec: CurveClaim, groups: dict[str, list[dict[str, Any]]]) -> Claim:
    """``spec`` read off the sweep's curves (see the module docstring)."""
    missing = [name for name in spec.contrast if name not in groups]
    if missing:
        raise ConfigError(
            f"length claim {spec.claim!r}: no curve {missing} in the sweep (it has {sorted(groups)})"
        )
    first, second = (groups[name] for name in spec.contrast)
    for row in first + second:
        if not {spec.metric, spec.along} <= set(row.get("prompt_means", {})):
            raise ConfigError(
                f"length claim {spec.claim!r}: job {row['job']} has no per-prompt {spec.metric} and"
                f" {spec.along} (evaluated by an older version): run its command again to rewrite its results"
            )
    point = overlap_midpoint(first, second, spec.along)
    label = f"{spec.contrast[0]} - {spec.contrast[1]}"
    if point is None:
        return Claim(
            spec.claim,
            spec.paper,
            f"{label} (no common {ALONG[spec.along]})",
            spec.metric,
            spec.direction,
            0.0,
            0.0,
            0,
            verdict(0.0, 0.0, spec.direction),
        )
    ours, theirs = at_value(first, spec.along, point), at_value(second, spec.along, point)
    mean = ours[spec.metric] - theirs[spec.metric]
    ours_terms, theirs_terms = (prompt_terms(c, spec.metric, spec.along, point) for c in (first, second))
    prompts = sorted(set(ours_terms) & set(theirs_terms))
    _, se = mean_and_se([ours_terms[p] - theirs_terms[p] for p in prompts])
    contrast = f"{label} at {ALONG[spec.along]} {point:.3g}"
    return Claim(
        spec.claim,
        spec.paper,
        contrast,
        spec.metric,
        spec.direction,
        mean,
        se,
        len(prompts),
        verdict(mean, se, spec.direction),
    )


def plot_length_vs_score(
    groups: dict[str, list[dict[str, Any]]], baselines: list[dict[str, Any]], path: Path
) -> None:
    """Gold and proxy reward against length, and length against KL: one curve per (loss, a) across its
    betas (standard-error bars), SFT as a grey star; last, the histogram of SFT's sample lengths."""
    panels = (
        ("length_tokens", "gold_reward", "gold reward"),
        ("length_tokens", "proxy_reward", "proxy reward (learned RM)"),
        ("kl_to_ref", "length_tokens", "length of samples (tokens)"),
    )
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 4.5), squeeze=False)
    for ax, (x, y, label) in zip(axes[0][:-1], panels, strict=True):
        for name, group in groups.items():
            points = sorted(group, key=lambda r: r["beta"])
            ax.errorbar(
                [r[x] for r in points],
                [r[y] for r in points],
                xerr=[r.get(STANDARD_ERRORS[x]) or 0.0 for r in points],
                yerr=[r.get(STANDARD_ERRORS[y]) or 0.0 for r in points],
                marker="o",
                ms=4,
                capsize=2,
                linestyle="--" if name.endswith("a=0") else "-",
                label=name,
            )
        for baseline in baselines:
            if baseline.get(y) is not None:
                ax.plot([baseline[x] or 0.0], [baseline[y]], "*", color="grey", ms=12, label="sft")
        ax.set_xlabel("KL(policy || SFT), nats" if x == "kl_to_ref" else "length of samples (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    histogram = axes[0][-1]
    for baseline in baselines:
        histogram.hist(sample_lengths(baseline), bins=24, color="grey", alpha=0.7, label="sft samples")
    histogram.set_xlabel("length of SFT's samples (tokens)")
    histogram.set_ylabel("samples")
    histogram.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, "Length against score, each (loss, length power a) across its betas", path)


def sample_lengths(record: dict[str, Any]) -> np.ndarray:
    """A policy record's sample lengths; a record written before they were kept is refused in one line."""
    if not record.get("sample_lengths"):
        raise ConfigError(
            f"length report: {record.get('job', record['method'])} has no sample lengths (evaluated by an"
            " older version): run its command again to rewrite its results"
        )
    return np.asarray(record["sample_lengths"], dtype=float)


def length_distribution(
    groups: dict[str, list[dict[str, Any]]], baselines: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The lengths of each policy's samples: SFT's first, then every (loss, a) by beta; ``eos_rate`` is
    the share that ended before the budget."""
    named = [("sft", b) for b in baselines] + [
        (f"{name} beta={row['beta']:g}", row) for name, group in groups.items() for row in group
    ]
    rows = []
    for name, record in named:
        lengths = sample_lengths(record)
        quantiles = {f"q{round(q * 100)}": float(np.quantile(lengths, q)) for q in QUANTILES}
        rows.append(
            {"policy": name, "samples": lengths.size, "mean": float(lengths.mean())}
            | quantiles
            | {"eos_rate": record.get("eos_rate")}
        )
    return rows


def write_length_report(
    sweep_dir: Path, out: Path, claims: Sequence[CurveClaim], matched_kl: Sequence[float] = ()
) -> Path | None:
    """The sweep report of ``sweep_dir`` in ``out``, plus ``length_vs_score.png``, the samples' length
    distributions (``length_distribution.md``, SFT's drawn in the plot) and the claims (``claims.json``,
    ``claims.md``); None when no job has evaluated anything."""
    rows, baselines, _ = collect_jobs(Path(sweep_dir))
    if write_sweep_report(Path(sweep_dir), out, matched_kl) is None:
        return None
    groups = method_groups(rows)
    records = [read_curve_claim(spec, groups) for spec in claims]
    write_claims(records, out / "claims.json")
    (out / "claims.md").write_text(claims_table(records))
    plot_length_vs_score(groups, baselines, out / "length_vs_score.png")
    write_table(
        length_distribution(groups, baselines),
        DISTRIBUTION_COLUMNS,
        out / "length_distribution.csv",
        "Lengths of the evaluation samples (tokens): mean, quantiles, share ending before the budget",
    )
    log.info("length report: %d curves, %d claims in %s", len(groups), len(records), out)
    return out
