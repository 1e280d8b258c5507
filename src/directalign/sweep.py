"""One report for a Hydra multirun over methods and betas (paper B's Figures 5 and 6).

Each job of the sweep evaluates its own policy into its results folder (summary.csv and
policies.json, see report.py); this module reads every job back and writes, into
``<sweep dir>/sweep_report/``: one table row per aligned policy; each method's pick, the beta of
highest proxy reward (the CoPG paper's rule: the reward model is what a user has, the gold judge
stays unseen), with whether it is interior to its grid (``picks.json``); the final reward against
beta and against KL(policy || SFT) with best-of-n over SFT samples as the frontier; the scores read
off each method's curve at matched KLs (``matched_kl.md``); and the reward against step at each
pick. Hydra runs it when a multirun ends (the ``SweepReport`` callback);
``pipelines/sweep_report.py <sweep dir>`` runs it by hand.
"""

import csv
import json
import logging
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from directalign.distributed import is_rank_zero
from directalign.plots import plt, save_figure
from directalign.report import POLICIES_FILE, SUMMARY_COLUMNS, format_cell, write_table

log = logging.getLogger(__name__)

REPORT_DIR = "sweep_report"
PICKS_FILE = "picks.json"
BEST_CURVES_PLOT = "reward_vs_step_best_beta.png"
SWEEP_COLUMNS = ("job", *SUMMARY_COLUMNS)
# The metric a beta is picked on.
SELECTION_METRIC = "proxy_reward"
MATCHED_COLUMNS = (
    "method",
    "kl_to_ref",
    "proxy_reward",
    "proxy_se",
    "gold_reward",
    "gold_se",
    "length_tokens",
    "length_se",
    "betas",
)
SERIES = (
    ("proxy_reward", "proxy reward (learned RM)"),
    ("gold_reward", "gold reward"),
    ("length_tokens", "length of samples (tokens)"),
)


def collect_jobs(
    sweep_dir: Path,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The aligned policies of every job (each with its job folder and reward curve), the SFT
    baselines the jobs report (one per distinct upstream, usually exactly one), and the best-of-n rows
    over those baselines' samples (each once)."""
    rows, baselines, frontier = [], [], []
    for records in sorted(sweep_dir.rglob(POLICIES_FILE)):
        if REPORT_DIR in records.relative_to(sweep_dir).parts:
            continue
        for record in json.loads(records.read_text()):
            if record["kind"] == "baseline" and record["policy"] not in [b["policy"] for b in baselines]:
                baselines.append(record)
            seen = [(f["policy"], f["method"]) for f in frontier]
            if record["kind"] == "best_of_n" and (record["policy"], record["method"]) not in seen:
                frontier.append(record)
            if record["kind"] == "aligned":
                rows.append(record | {"job": records.parent.relative_to(sweep_dir).as_posix()})
    rows.sort(key=lambda r: (r["method"], r["length_power"], r["beta"]))
    frontier.sort(key=lambda r: r["kl_to_ref"])
    return rows, baselines, frontier


def method_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows per method, each sorted by beta; a method swept at several length_powers splits by it."""
    powers: dict[str, set[float]] = defaultdict(set)
    for row in rows:
        powers[row["method"]].add(row["length_power"])
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        several = len(powers[row["method"]]) > 1
        groups[f"{row['method']} a={row['length_power']:g}" if several else row["method"]].append(row)
    return dict(groups)


@dataclass
class Pick:
    """A method's selected beta: the highest proxy reward of its grid, and whether the grid brackets it
    (a pick at either end of the grid may lie beyond it: extend the grid that way)."""

    method: str
    beta: float
    length_power: float
    proxy_reward: float
    proxy_se: float | None
    gold_reward: float | None
    kl_to_ref: float | None
    grid: list[float]
    interior: bool

    @property
    def edge(self) -> str:
        if self.interior:
            return "interior"
        if len(self.grid) < 3:
            return f"not bracketed: {len(self.grid)} betas"
        return "at the grid's " + ("lowest" if self.beta == min(self.grid) else "highest") + " beta"


def seed_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """``key`` averaged over the training seeds of one beta (None where a row lacks it)."""
    values = [r.get(key) for r in rows]
    return None if any(v is None for v in values) else statistics.fmean(values)


def picks_of(groups: dict[str, list[dict[str, Any]]]) -> dict[str, Pick]:
    """Each method's beta of highest proxy reward averaged over its training seeds (its scores are those
    seed means; its standard error the seeds' mean one), with its grid of distinct betas."""
    picks = {}
    for name, group in groups.items():
        by_beta: dict[float, list[dict[str, Any]]] = defaultdict(list)
        for row in group:
            by_beta[row["beta"]].append(row)
        grid = sorted(by_beta)
        beta = max(grid, key=lambda b: seed_mean(by_beta[b], SELECTION_METRIC))
        rows = by_beta[beta]
        picks[name] = Pick(
            method=rows[0]["method"],
            beta=beta,
            length_power=rows[0]["length_power"],
            proxy_reward=seed_mean(rows, "proxy_reward"),
            proxy_se=seed_mean(rows, "proxy_se"),
            gold_reward=seed_mean(rows, "gold_reward"),
            kl_to_ref=seed_mean(rows, "kl_to_ref"),
            grid=grid,
            interior=len(grid) >= 3 and min(grid) < beta < max(grid),
        )
    return picks


# The scores a curve carries, each with its standard error.
CURVE_METRICS = (
    ("proxy_reward", "proxy_se"),
    ("gold_reward", "gold_se"),
    ("length_tokens", "length_se"),
    ("kl_to_ref", "kl_se"),
)


def bracket(
    group: list[dict[str, Any]], along: str, value: float
) -> tuple[dict[str, Any], dict[str, Any], float] | None:
    """The two rows of a method's curve across beta whose ``along`` brackets ``value``, and ``value``'s
    weight on the higher (0 at the lower row, 1 at the higher); None outside the swept range."""
    points = sorted(group, key=lambda r: r[along])
    for low, high in zip(points, points[1:], strict=False):
        if low[along] <= value <= high[along]:
            span = high[along] - low[along]
            return low, high, 0.0 if span == 0 else (value - low[along]) / span
    return None


def at_value(group: list[dict[str, Any]], along: str, value: float) -> dict[str, Any] | None:
    """A method's scores where its curve across beta reaches ``along == value`` (``kl_to_ref`` for
    matched KL, ``length_tokens`` for matched length), linearly interpolated between the two betas that
    bracket it, standard errors likewise (an approximation); None outside the swept range."""
    if (found := bracket(group, along, value)) is None:
        return None
    low, high, weight = found
    betas = sorted((low["beta"], high["beta"]))
    row: dict[str, Any] = {"betas": f"{betas[0]:g}-{betas[1]:g}"}
    for key in (k for pair in CURVE_METRICS for k in pair):
        both = (low.get(key), high.get(key))
        row[key] = None if None in both else (1 - weight) * both[0] + weight * both[1]
    return row | {along: value}


def matched_kl_rows(groups: dict[str, list[dict[str, Any]]], kls: Sequence[float]) -> list[dict[str, Any]]:
    """Every method's scores read off its beta curve at each of ``kls`` (where its sweep reaches)."""
    return [
        {"method": name} | row
        for kl in kls
        for name, group in groups.items()
        if (row := at_value(group, "kl_to_ref", kl)) is not None
    ]


def _series(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(k, label) for k, label in SERIES if all(r.get(k) is not None for r in rows)]


def plot_reward_vs_beta(
    groups: dict[str, list[dict[str, Any]]], baselines: list[dict[str, Any]], path: Path
) -> None:
    """Final reward (proxy, gold) and length against beta, one line per method; SFT dashed."""
    series = _series([r for group in groups.values() for r in group])
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=True):
        for name, group in groups.items():
            ax.plot([r["beta"] for r in group], [r[key] for r in group], marker="o", label=name)
        for baseline in baselines:
            if baseline[key] is not None:
                ax.axhline(baseline[key], color="grey", linestyle="--", linewidth=1, label="sft")
        ax.set_xscale("log")
        ax.set_xlabel("beta")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, "Final reward and length of generations against beta", path)


def plot_best_of_n(ax: Any, frontier: Sequence[dict[str, Any]], key: str) -> None:
    """Best-of-n over SFT samples against its exact KL, dashed, where every row has ``key``."""
    if frontier and all(f.get(key) is not None and math.isfinite(f[key]) for f in frontier):
        ax.plot(
            [f["kl_to_ref"] for f in frontier],
            [f[key] for f in frontier],
            "k--",
            marker="s",
            ms=4,
            label="best-of-n over SFT",
        )


def plot_reward_vs_kl(
    groups: dict[str, list[dict[str, Any]]], frontier: list[dict[str, Any]], path: Path
) -> None:
    """Final reward against KL(policy || SFT), one line per method across its betas (standard-error
    bars), best-of-n over SFT samples dashed: a method above the dashed line at the same KL does
    better than picking among SFT samples."""
    series = [s for s in _series([r for group in groups.values() for r in group]) if s[0] != "length_tokens"]
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=True):
        se = key.replace("_reward", "_se")
        plot_best_of_n(ax, frontier, key)
        for name, group in groups.items():
            points = sorted(group, key=lambda r: r["kl_to_ref"])
            ax.errorbar(
                [r["kl_to_ref"] for r in points],
                [r[key] for r in points],
                xerr=[r.get("kl_se") or 0.0 for r in points],
                yerr=[r.get(se) or 0.0 for r in points],
                marker="o",
                ms=4,
                capsize=2,
                label=name,
            )
        ax.set_xlabel("KL(policy || SFT), nats")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, "Final reward against KL, each method across its betas", path)


def plot_best_curves(best: dict[str, dict[str, Any]], path: Path) -> None:
    """Reward (proxy, gold) and length against optimiser step at each method's best beta."""
    points = [p for row in best.values() for p in row["curve"]]
    series = _series(points)
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=True):
        for name, row in best.items():
            steps, values = [p["step"] for p in row["curve"]], [p[key] for p in row["curve"]]
            ax.plot(steps, values, marker="o", ms=3, label=f"{name} b={row['beta']:g}")
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, "Reward during alignment at each method's best beta", path)


def write_sweep_report(
    sweep_dir: Path, out: Path | None = None, matched_kl: Sequence[float] = ()
) -> Path | None:
    """Gather the jobs under ``sweep_dir`` into ``out`` (default ``<sweep_dir>/sweep_report``); scores at
    matched KL are read off at each of ``matched_kl`` (nats).

    Returns the report folder, or None when no job has evaluated anything (a sweep of upstream
    stages only, or jobs that all failed).
    """
    sweep_dir = Path(sweep_dir)
    rows, baselines, frontier = collect_jobs(sweep_dir)
    if not rows:
        log.warning("no evaluated job under %s: no sweep report", sweep_dir)
        return None
    out = out or sweep_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    with (out / "sweep_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SWEEP_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: "" if r[k] is None else r[k] for k in SWEEP_COLUMNS} for r in rows])
    groups = method_groups(rows)
    picks = picks_of(groups)
    (out / PICKS_FILE).write_text(json.dumps({name: asdict(p) for name, p in picks.items()}, indent=2))
    matched = matched_kl_rows(groups, matched_kl)
    if matched:
        write_table(matched, MATCHED_COLUMNS, out / "matched_kl.csv", "Scores at matched KL (interpolated)")
    lines = [
        f"# Sweep report: {sweep_dir.name}",
        "",
        f"{len(rows)} aligned policies from {len({r['job'] for r in rows})} jobs.",
        "Each method's beta of highest proxy reward on the sweep's prompts (gold and KL beside it):",
        "",
        *(
            f"- **{name}**: beta {p.beta:g} (proxy {p.proxy_reward:.4g}"
            + (f" ± {p.proxy_se:.2g}" if p.proxy_se is not None else "")
            + (f", gold {p.gold_reward:.4g}" if p.gold_reward is not None else "")
            + (f", KL {p.kl_to_ref:.3g}" if p.kl_to_ref is not None else "")
            + f"); grid {', '.join(f'{b:g}' for b in p.grid)}: {p.edge}"
            for name, p in picks.items()
        ),
        "",
        *(["Scores read off each method's curve at matched KLs: `matched_kl.md`.", ""] if matched else []),
        "| " + " | ".join(SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(SWEEP_COLUMNS),
        *("| " + " | ".join(format_cell(r[c]) for c in SWEEP_COLUMNS) + " |" for r in rows),
        "",
        "![reward vs KL](reward_vs_kl.png)",
        "",
        "![reward vs beta](reward_vs_beta.png)",
        "",
    ]
    plot_reward_vs_beta(groups, baselines, out / "reward_vs_beta.png")
    plot_reward_vs_kl(groups, frontier, out / "reward_vs_kl.png")
    best = {name: next(r for r in groups[name] if r["beta"] == p.beta) for name, p in picks.items()}
    # Jobs trained without a reward curve (stage.align.curve_prompts=0) have no reward-vs-step plot.
    (out / BEST_CURVES_PLOT).unlink(missing_ok=True)
    if any(row["curve"] for row in best.values()):
        plot_best_curves(best, out / BEST_CURVES_PLOT)
        lines += [f"![reward vs step at the picked beta]({BEST_CURVES_PLOT})", ""]
    (out / "sweep_summary.md").write_text("\n".join(lines))
    log.info("sweep report of %d policies written to %s", len(rows), out)
    return out


class SweepReport(Callback):
    """Hydra callback: write the sweep report once every job of a multirun has returned.

    Hydra calls it in the process that ran the sweep; under DDP the other ranks run the sweep too
    and skip it. ``matched_kl``: the KLs (nats) at which the report reads off every method's scores.
    """

    def __init__(self, matched_kl: Sequence[float] = ()) -> None:
        self.matched_kl = list(matched_kl)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_rank_zero():
            write_sweep_report(Path(config.hydra.sweep.dir), matched_kl=self.matched_kl)
