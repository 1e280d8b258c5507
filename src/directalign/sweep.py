"""One report for a Hydra multirun over methods and betas (paper B's Figures 5 and 6).

Each job of the sweep evaluates its own policy into its results folder (summary.csv and
policies.json, see report.py); this module reads every job back and writes, into
``<sweep dir>/sweep_report/``: one table row per aligned policy, the final reward against beta per
method with the length of generations beside it, and the reward against step at each method's best
beta, for the proxy reward model and the gold judge. Hydra runs it when a multirun ends (the
``SweepReport`` callback); ``pipelines/sweep_report.py <sweep dir>`` runs it by hand.
"""

import csv
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from directalign.distributed import is_rank_zero
from directalign.plots import plt, save_figure
from directalign.report import POLICIES_FILE, SUMMARY_COLUMNS, format_cell

log = logging.getLogger(__name__)

REPORT_DIR = "sweep_report"
SWEEP_COLUMNS = ("job", *SUMMARY_COLUMNS)
SERIES = (
    ("proxy_reward", "proxy reward (learned RM)"),
    ("gold_reward", "gold reward"),
    ("length_tokens", "length of samples (tokens)"),
)


def collect_jobs(sweep_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The aligned policies of every job (each with its job folder and reward curve), and the
    SFT baselines the jobs report (one per distinct upstream, usually exactly one)."""
    rows, baselines = [], []
    for records in sorted(sweep_dir.rglob(POLICIES_FILE)):
        if REPORT_DIR in records.relative_to(sweep_dir).parts:
            continue
        for record in json.loads(records.read_text()):
            if record["kind"] == "baseline" and record["policy"] not in [b["policy"] for b in baselines]:
                baselines.append(record)
            if record["kind"] == "aligned":
                rows.append(record | {"job": records.parent.relative_to(sweep_dir).as_posix()})
    rows.sort(key=lambda r: (r["method"], r["length_power"], r["beta"]))
    return rows, baselines


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


def selection_key(rows: list[dict[str, Any]]) -> str:
    """Best beta by the gold judge where every job has it (the real objective), else by the proxy."""
    return "gold_reward" if all(r["gold_reward"] is not None for r in rows) else "proxy_reward"


def best_rows(groups: dict[str, list[dict[str, Any]]], key: str) -> dict[str, dict[str, Any]]:
    return {name: max(group, key=lambda r: r[key]) for name, group in groups.items()}


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


def write_sweep_report(sweep_dir: Path, out: Path | None = None) -> Path | None:
    """Gather the jobs under ``sweep_dir`` into ``out`` (default ``<sweep_dir>/sweep_report``).

    Returns the report folder, or None when no job has evaluated anything (a sweep of upstream
    stages only, or jobs that all failed).
    """
    sweep_dir = Path(sweep_dir)
    rows, baselines = collect_jobs(sweep_dir)
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
    key = selection_key(rows)
    best = best_rows(groups, key)
    lines = [
        f"# Sweep report: {sweep_dir}",
        "",
        f"{len(rows)} aligned policies from {len({r['job'] for r in rows})} jobs.",
        f"Best beta per method, by final {key.replace('_', ' ')}:",
        "",
        *(f"- **{name}**: beta {row['beta']:g} ({key} {row[key]:.4g})" for name, row in best.items()),
        "",
        "| " + " | ".join(SWEEP_COLUMNS) + " |",
        "|" + "---|" * len(SWEEP_COLUMNS),
        *("| " + " | ".join(format_cell(r[c]) for c in SWEEP_COLUMNS) + " |" for r in rows),
        "",
        "![reward vs beta](reward_vs_beta.png)",
        "",
        "![reward vs step at the best beta](reward_vs_step_best_beta.png)",
        "",
    ]
    (out / "sweep_summary.md").write_text("\n".join(lines))
    plot_reward_vs_beta(groups, baselines, out / "reward_vs_beta.png")
    if any(row["curve"] for row in best.values()):
        plot_best_curves(best, out / "reward_vs_step_best_beta.png")
    log.info("sweep report of %d policies written to %s", len(rows), out)
    return out


class SweepReport(Callback):
    """Hydra callback: write the sweep report once every job of a multirun has returned.

    Hydra calls it in the process that ran the sweep; under DDP the other ranks run the sweep too
    and skip it.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if is_rank_zero():
            write_sweep_report(Path(config.hydra.sweep.dir))
