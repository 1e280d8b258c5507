"""Paper A's length question on a language model, read off beta sweeps.

The length sweep (``make length``) trains and evaluates each loss at length powers a = 0 (summed
log-ratios) and 1 (averaged), a few betas and two training seeds each: every (loss, a) is one curve
across beta, named as the sweep report names it (``"dpo a=1"``). Paper A's statement, that averaging
trades the length of generations against their scores, has no direction in its abstract, so each claim
is two-sided and reports the direction found:

- at matched KL to SFT, does averaging change the length of samples?
- at matched length, does it change the gold score?

Claims are read by ``frontier.py`` (each seed's curve interpolated at the point, standard errors paired
over prompts with the between-seed variance and the error of where each curve reaches the point) and
Holm-adjusted over the file (``claims.py``); this module adds the length plots and distributions.
"""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from directalign.claims import Claim
from directalign.errors import ConfigError
from directalign.frontier import ClaimSpec
from directalign.frontier_report import write_frontier_report
from directalign.plots import plt, save_figure
from directalign.report import write_table
from directalign.sweep import CURVE_METRICS, collect_jobs, method_groups

log = logging.getLogger(__name__)

STANDARD_ERRORS = dict(CURVE_METRICS)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
DISTRIBUTION_COLUMNS = ("policy", "samples", "mean", *(f"q{round(q * 100)}" for q in QUANTILES), "eos_rate")


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
            points = sorted(group, key=lambda r: (r.get("train_seed") or 0, r["beta"]))
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
        (f"{name} beta={row['beta']:g} seed={row.get('train_seed') or 0}", row)
        for name, group in groups.items()
        for row in group
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
    sweep_dir: Path,
    out: Path,
    claims: Sequence[ClaimSpec],
    power_targets: dict[str, float],
    matched_kl: Sequence[float] = (),
) -> list[Claim]:
    """The frontier report of ``sweep_dir`` in ``out`` (claims, per-prompt data, sweep report), plus
    ``length_vs_score.png`` and the samples' length distributions (``length_distribution.md``, SFT's
    drawn in the plot); returns the claims."""
    records = write_frontier_report(Path(sweep_dir), out, claims, {}, power_targets, matched_kl)
    rows, baselines, _ = collect_jobs(Path(sweep_dir))
    groups = method_groups(rows)
    plot_length_vs_score(groups, baselines, out / "length_vs_score.png")
    write_table(
        length_distribution(groups, baselines),
        DISTRIBUTION_COLUMNS,
        out / "length_distribution.csv",
        "Lengths of the evaluation samples (tokens): mean, quantiles, share ending before the budget",
    )
    log.info("length report: %d curves, %d claims in %s", len(groups), len(records), out)
    return records
