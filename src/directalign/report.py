"""Tables and plots of the results contract (summary.csv/.md and the three plots), paired differences
between policies, the policy records a sweep report reads back, and the same as a wandb run."""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from directalign.artifacts import AlignedPolicy, EvalRecord
from directalign.prompts import Prompts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Every policy of a results folder as typed JSON (its summary row, curve and store artifact): what a
# sweep report reads, so no number round-trips through CSV text.
POLICIES_FILE = "policies.json"
PLOTS = ("length_vs_score.png", "reward_vs_kl.png", "reward_vs_step.png")
METRIC_COLUMNS = ("proxy_reward", "gold_reward", "length_tokens", "kl_to_ref", "win_rate_vs_sft")
SUMMARY_COLUMNS = (
    "method",
    "beta",
    "length_power",
    "proxy_reward",
    "gold_reward",
    "length_tokens",
    "kl_to_ref",
    "win_rate_vs_sft",
    "n_prompts",
    "seed",
)


@dataclass
class PolicyResult:
    """One evaluated policy: its name, method settings, evaluation metrics and per-prompt samples,
    training curve, and the store artifact it came from (``<stage>/<key>``)."""

    method: str
    beta: float | None
    length_power: float | None
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    policy: str = ""

    @classmethod
    def of(cls, name: str, evaluation: EvalRecord, aligned: AlignedPolicy | None = None) -> "PolicyResult":
        """The SFT baseline (no ``aligned``) or an aligned policy, its settings read from its manifest."""
        if aligned is None:
            return cls(name, None, None, evaluation.metrics, evaluation.samples, policy=evaluation.policy)
        method = aligned.method
        return cls(
            name,
            method["beta"],
            method["length_power"],
            evaluation.metrics,
            evaluation.samples,
            aligned.curve(),
            evaluation.policy,
        )

    @property
    def label(self) -> str:
        return self.method if self.beta is None else f"{self.method} b={self.beta:g} a={self.length_power:g}"


def win_rate(policy: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> float:
    """Fraction of prompts where the policy's sample beats the baseline's (ties count half).

    Judged by the gold judge where the task has one, else by the proxy reward model.
    """
    key = "gold_reward" if policy and policy[0]["gold_reward"] is not None else "proxy_reward"
    base = {s["id"]: s[key] for s in baseline}
    scores = [
        1.0 if s[key] > base[s["id"]] else 0.5 if s[key] == base[s["id"]] else 0.0
        for s in policy
        if s["id"] in base
    ]
    return sum(scores) / len(scores) if scores else math.nan


def paired_difference(
    policy: list[dict[str, Any]], baseline: list[dict[str, Any]], key: str
) -> tuple[float, float]:
    """Mean and standard error over the shared prompts of ``policy[key] - baseline[key]``: both
    policies answer the same prompts, so pairing removes the prompts' own spread."""
    base = {s["id"]: s[key] for s in baseline}
    diffs = np.asarray([s[key] - base[s["id"]] for s in policy if s["id"] in base], dtype=float)
    if diffs.size < 2:
        return math.nan, math.nan
    return float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(diffs.size))


def write_paired(results: list[PolicyResult], contrasts: list[list[str]], out: Path) -> None:
    """``paired.md``: every policy against SFT, then each configured contrast ``[a, b]`` (a minus b),
    as mean ± standard error over prompts, with the number of prompts whose outputs differ."""
    by_name = {r.method: r for r in results}
    pairs = [(r.method, results[0].method) for r in results[1:]]
    for a, b in contrasts:
        pairs.append((a, b))  # validate_config checked that both were evaluated
    keys = [key for key, _ in _scores(results)] + ["length_tokens"]
    header = ["policy", *(f"{key} difference" for key in keys), "outputs that differ"]
    lines = [
        "# Paired differences (mean ± standard error over the same prompts)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for a, b in pairs:
        cells = [f"{a} - {b}"]
        for key in keys:
            mean, error = paired_difference(by_name[a].samples, by_name[b].samples, key)
            cells.append(f"{mean:+.4f} ± {error:.4f}")
        other = {s["id"]: s["completion"] for s in by_name[b].samples}
        changed = sum(s["completion"] != other.get(s["id"]) for s in by_name[a].samples)
        cells.append(f"{changed}/{len(by_name[a].samples)}")
        lines.append("| " + " | ".join(cells) + " |")
    (out / "paired.md").write_text("\n".join(lines) + "\n")


def summary_rows(results: list[PolicyResult], seed: int) -> list[dict[str, Any]]:
    """One row per policy in SUMMARY_COLUMNS; None where a value does not apply (written empty)."""
    baseline = results[0].samples
    rows = []
    for result in results:
        m = result.metrics
        rows.append(
            {
                "method": result.method,
                "beta": result.beta,
                "length_power": result.length_power,
                "proxy_reward": m["proxy_reward"],
                "gold_reward": m["gold_reward"],
                "length_tokens": m["length_tokens"],
                "kl_to_ref": m["kl_to_ref"],
                "win_rate_vs_sft": win_rate(result.samples, baseline),
                "n_prompts": m["n_prompts"],
                "seed": seed,
            }
        )
    return rows


def format_cell(value: Any) -> str:
    """A markdown table cell: floats to 4 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def save_figure(fig: plt.Figure, title: str, path: Path) -> None:
    """Title, lay out, write at a fixed resolution and free the figure (plots run in long sweeps)."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in SUMMARY_COLUMNS) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _scores(results: list[PolicyResult]) -> list[tuple[str, str]]:
    has_gold = results[0].metrics["gold_reward"] is not None
    return [("proxy_reward", "proxy reward (learned RM)")] + (
        [("gold_reward", "gold reward")] if has_gold else []
    )


def _scatter(results: list[PolicyResult], x_key: str, x_label: str, path: Path, title: str) -> None:
    scores = _scores(results)
    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], scores, strict=True):
        for result in results:
            ax.scatter(result.metrics[x_key], result.metrics[key], s=40)
            ax.annotate(
                result.label,
                (result.metrics[x_key], result.metrics[key]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    save_figure(fig, title, path)


def plot_curves(results: list[PolicyResult], path: Path) -> None:
    curved = [r for r in results if r.curve]
    scores = [(k, label) for k, label in _scores(results)]
    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], scores, strict=True):
        for result in curved:
            ax.plot(
                [p["step"] for p in result.curve],
                [p[key] for p in result.curve],
                marker="o",
                ms=3,
                label=result.label,
            )
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, "Reward of greedy samples on held-out prompts during alignment", path)


def write_samples(results: list[PolicyResult], prompts: Prompts, out: Path, n: int) -> None:
    """A few held-out sources with the human reference and every policy's output, to judge by eye."""
    by_policy = [{s["id"]: s for s in r.samples} for r in results]
    lines = ["# Samples on held-out prompts", ""]
    for i in range(min(n, len(prompts))):
        sample_id = prompts.example_ids[i]
        lines += [
            f"## {sample_id}",
            "",
            f"> {prompts.sources[i]}",
            "",
            f"- **human**: {prompts.references[i]}",
        ]
        for result, samples in zip(results, by_policy, strict=True):
            if sample_id in samples:
                s = samples[sample_id]
                gold = "" if s["gold_reward"] is None else f", gold {s['gold_reward']:.3f}"
                lines.append(f"- **{result.label}** (proxy {s['proxy_reward']:.3f}{gold}): {s['completion']}")
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines))


def write_report(
    results: list[PolicyResult],
    prompts: Prompts,
    out: Path,
    seed: int,
    contrasts: list[list[str]] = (),
    n_samples: int = 8,
) -> list[dict[str, Any]]:
    """Write every file of the results contract into ``out``; the first result is the SFT baseline."""
    out.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(results, seed)
    write_tables(rows, out)
    write_paired(results, list(contrasts), out)
    _scatter(
        results,
        "length_tokens",
        "mean length of samples (tokens)",
        out / "length_vs_score.png",
        "Length versus score",
    )
    _scatter(
        results,
        "kl_to_ref",
        "KL to SFT (mean summed log-ratio on samples)",
        out / "reward_vs_kl.png",
        "Reward versus KL",
    )
    if any(r.curve for r in results):
        plot_curves(results, out / "reward_vs_step.png")
    write_policies(results, rows, out)
    write_samples(results, prompts, out, n_samples)
    return rows


def write_policies(results: list[PolicyResult], rows: list[dict[str, Any]], out: Path) -> None:
    """Each policy's summary row with its curve and store artifact, for the sweep report to read back."""
    records = [
        row | {"curve": result.curve, "policy": result.policy}
        for result, row in zip(results, rows, strict=True)
    ]
    (out / POLICIES_FILE).write_text(json.dumps(records, indent=2))


def log_wandb(results: list[PolicyResult], rows: list[dict[str, Any]], out: Path, **init: Any) -> Path:
    """One wandb run with the evaluation as tables, native scatter and line plots, and the PNGs.

    Native plots (not only images) let a project dashboard put every run of a sweep on one chart.
    ``init`` goes to ``wandb.init``; returns the run's local folder.
    """
    import wandb  # here, so that runs without wandb logging never import it

    scores = [key for key, _ in _scores(results)]
    cells = [[row[c] for c in SUMMARY_COLUMNS] for row in rows]
    summary = wandb.Table(columns=list(SUMMARY_COLUMNS), data=cells)
    points = [
        [r.label, p["step"], *(p[key] for key in scores), p["length_tokens"]]
        for r in results
        for p in r.curve
    ]
    curve = wandb.Table(columns=["policy", "step", *scores, "length_tokens"], data=points)
    logged: dict[str, Any] = {"eval/summary": summary, "eval/reward_vs_step_table": curve}
    for key in scores:
        logged[f"eval/length_vs_{key}"] = wandb.plot.scatter(
            summary, "length_tokens", key, title=f"Length versus {key}"
        )
        logged[f"eval/kl_vs_{key}"] = wandb.plot.scatter(summary, "kl_to_ref", key, title=f"{key} versus KL")
        if points:
            logged[f"eval/{key}_vs_step"] = wandb.plot.line(
                curve, "step", key, stroke="policy", title=f"{key} versus step"
            )
    for name in PLOTS:
        if (out / name).is_file():
            logged[f"plots/{Path(name).stem}"] = wandb.Image(str(out / name))
    # Per policy, and once more without the name when a single method was aligned (a sweep job),
    # so every run of a sweep has the same keys for the dashboard to compare across runs.
    prefixes = [[f"eval/{row['method']}"] for row in rows]
    if len(rows) == 2:
        prefixes[1].append("eval")
    for row, names in zip(rows, prefixes, strict=True):
        for column in METRIC_COLUMNS:
            if row[column] is not None:
                logged |= {f"{name}/{column}": row[column] for name in names}
    Path(init.get("dir", ".")).mkdir(parents=True, exist_ok=True)
    with wandb.init(**init) as run:
        run.log(logged)
        return Path(run.dir).parent
