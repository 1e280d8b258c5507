"""The figures of the results contract: score against length, score against KL (with best-of-n over SFT
samples as the reference frontier), and score against optimiser step."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SCORES = (
    ("proxy_reward", "proxy_se", "proxy reward (learned RM)"),
    ("gold_reward", "gold_se", "gold reward"),
)


def save_figure(fig: plt.Figure, title: str, path: Path) -> None:
    """Title, lay out, write at a fixed resolution and free the figure (plots run in long sweeps)."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scores_of(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The score columns every row has (gold only where the task has a gold judge)."""
    return [score for score in SCORES if all(row[score[0]] is not None for row in rows)]


def label(row: dict[str, Any]) -> str:
    if row["beta"] is None:
        return row["method"]
    seed = f" s{row['train_seed']}" if row.get("train_seed") else ""
    return f"{row['method']} b={row['beta']:g} a={row['length_power']:g}{seed}"


def plot_against(
    rows: list[dict[str, Any]], x_key: str, x_se: str | None, x_label: str, path: Path, title: str
) -> None:
    """Each policy as a point with standard-error bars; best-of-n rows joined as a frontier line."""
    scores = scores_of(rows)
    frontier = [row for row in rows if row["method"].startswith("best_of_")]
    policies = [row for row in rows if row not in frontier]
    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    for ax, (key, se, y_label) in zip(axes[0], scores, strict=True):
        if frontier:
            ax.plot(
                [r[x_key] for r in frontier],
                [r[key] for r in frontier],
                "k--",
                marker="s",
                ms=4,
                label="best-of-n over SFT samples",
            )
        for row in policies:
            ax.errorbar(
                row[x_key],
                row[key],
                xerr=row.get(x_se) if x_se else None,
                yerr=row.get(se),
                fmt="o",
                ms=5,
                capsize=2,
            )
            ax.annotate(
                label(row), (row[x_key], row[key]), fontsize=7, xytext=(3, 3), textcoords="offset points"
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
        if frontier:
            ax.legend(fontsize=7)
    save_figure(fig, title, path)


def plot_curves(curves: list[tuple[str, list[dict[str, Any]]]], has_gold: bool, path: Path) -> None:
    """Reward of greedy outputs on the curve prompts against optimiser step, one line per policy."""
    scores = SCORES if has_gold else SCORES[:1]
    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    for ax, (key, _, y_label) in zip(axes[0], scores, strict=True):
        for name, points in curves:
            ax.plot([p["step"] for p in points], [p[key] for p in points], marker="o", ms=3, label=name)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, "Reward of greedy samples on held-out prompts during alignment", path)
