"""The results of an evaluated run, written as the results contract: ``summary.csv``/``.md`` (one row per
policy and per best-of-n size, means with standard errors over prompts), ``paired.csv``/``.md`` (paired
differences against SFT and the configured contrasts), ``claims.json`` (the papers' claims with a
verdict), the plots, ``samples.md``, ``policies.json`` (what a sweep report reads back) and a wandb run.

Policies trained with several seeds share a name: a contrast or claim about a name pools its seeds
(``estimates.py`` says how their standard errors combine).
"""

import csv
import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from directalign.artifacts import AlignedPolicy, EvalRecord
from directalign.best_of_n import best_of_n
from directalign.claims import Claim, build_claim, claims_table, family, win_tie_loss, write_claims
from directalign.estimates import mean_and_se, paired_difference, per_prompt_means
from directalign.plots import plot_against, plot_curves, scores_of
from directalign.prompts import Prompts

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
    "proxy_se",
    "gold_se",
    "kl_se",
    "temperature",
    "n_samples",
    "train_pairs",
    "train_steps",
    "length_se",
    "eos_rate",
    "train_seed",
    "wins",
    "ties",
    "losses",
    "sign_test_p",
)
GREEDY_COLUMNS = (
    "method",
    "beta",
    "length_power",
    "train_seed",
    "proxy_reward",
    "gold_reward",
    "length_tokens",
)
PAIRED_COLUMNS = ("policy", "against", "metric", "mean", "se", "n")
# Summary metric -> the per-sample field it averages.
SAMPLE_FIELDS = {
    "proxy_reward": "proxy_reward",
    "gold_reward": "gold_reward",
    "length_tokens": "length_tokens",
    "kl_to_ref": "logratio",
}


@dataclass
class PolicyResult:
    """One evaluated policy: its name, method settings and training seed, evaluation metrics, samples and
    greedy outputs, training curve and size, and the store artifact it came from (``<stage>/<key>``)."""

    method: str
    beta: float | None
    length_power: float | None
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    curve: list[dict[str, Any]] = field(default_factory=list)
    policy: str = ""
    train_seed: int | None = None
    train_pairs: int | None = None
    train_steps: int | None = None
    greedy: list[dict[str, Any]] = field(default_factory=list)
    # Under pipeline.rounds > 1: the round's index and what sampled its data ({"index", "sampler"}).
    round: dict[str, Any] | None = None

    @classmethod
    def of(cls, name: str, evaluation: EvalRecord, aligned: AlignedPolicy | None = None) -> "PolicyResult":
        """The SFT baseline (no ``aligned``) or an aligned policy, its settings read from its manifest."""
        result = cls(name, None, None, evaluation.metrics, evaluation.samples, policy=evaluation.policy)
        result.greedy = evaluation.greedy
        if aligned is not None:
            method = aligned.method
            result.beta, result.length_power = method["beta"], method["length_power"]
            result.train_seed = method.get("seed", 0)
            result.curve = aligned.curve()
            result.train_pairs = aligned.metrics.get("train_pairs", aligned.metrics.get("n_pairs"))
            result.train_steps = aligned.metrics.get("train_steps", aligned.metrics.get("steps"))
        return result

    @property
    def own_samples(self) -> list[dict[str, Any]]:
        """The samples this policy drew as every policy does (the SFT baseline draws more for best-of-n)."""
        n = self.metrics.get("n_samples")
        return [s for s in self.samples if n is None or s.get("sample", 0) < n]


def judge_key(results: list[PolicyResult]) -> str:
    """Wins are judged by the gold judge where the task has one, else by the proxy reward model."""
    return "gold_reward" if results[0].metrics["gold_reward"] is not None else "proxy_reward"


def matched(policy: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    """Samples of two policies drawn with the same random numbers: same prompt, same sample number."""
    base = {(s["id"], s.get("sample", 0)): s for s in baseline}
    return [(s, base[key]) for s in policy if (key := (s["id"], s.get("sample", 0))) in base]


def summary_row(result: PolicyResult, baseline: PolicyResult, key: str, seed: int) -> dict[str, Any]:
    m = result.metrics
    row = {column: m.get(column) for column in SUMMARY_COLUMNS} | {
        "method": result.method,
        "beta": result.beta,
        "length_power": result.length_power,
        "seed": seed,
        "train_seed": result.train_seed,
        "train_pairs": result.train_pairs,
        "train_steps": result.train_steps,
    }
    pairs = matched(result.own_samples, baseline.own_samples)
    if result is not baseline and pairs:
        outcome = win_tie_loss(
            [a["completion"] for a, _ in pairs],
            [b["completion"] for _, b in pairs],
            [a[key] for a, _ in pairs],
            [b[key] for _, b in pairs],
        )
        row |= {
            "win_rate_vs_sft": (outcome.wins + 0.5 * outcome.ties) / len(pairs),
            "wins": outcome.wins,
            "ties": outcome.ties,
            "losses": outcome.losses,
            "sign_test_p": outcome.p_value,
        }
    return row


def best_of_rows(baseline: PolicyResult, sizes: Sequence[int], seed: int) -> list[dict[str, Any]]:
    """Best-of-n over the SFT baseline's samples, picked by the proxy reward, with its exact KL."""
    if not sizes:
        return []
    prompts = sorted({s["id"] for s in baseline.samples})
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for sample in sorted(baseline.samples, key=lambda s: s["sample"]):
        by_prompt[sample["id"]].append(sample)
    fields = [
        f for f in ("proxy_reward", "gold_reward", "length_tokens") if baseline.samples[0][f] is not None
    ]
    table = {f: np.asarray([[s[f] for s in by_prompt[p]] for p in prompts], dtype=float) for f in fields}
    rows = []
    for pick in best_of_n(table["proxy_reward"], table, list(sizes)):
        means = {f: mean_and_se(pick.picked[f]) for f in fields}
        rows.append(
            {column: None for column in SUMMARY_COLUMNS}
            | {
                "method": f"best_of_{pick.n}",
                "proxy_reward": means["proxy_reward"][0],
                "proxy_se": means["proxy_reward"][1],
                "gold_reward": means["gold_reward"][0] if "gold_reward" in means else None,
                "gold_se": means["gold_reward"][1] if "gold_reward" in means else None,
                "length_tokens": means["length_tokens"][0],
                "length_se": means["length_tokens"][1],
                "kl_to_ref": pick.kl,
                "kl_se": 0.0,
                "n_prompts": len(prompts),
                "n_samples": pick.n,
                "temperature": baseline.metrics.get("temperature"),
                "seed": seed,
            }
        )
    return rows


def groups_of(results: list[PolicyResult]) -> dict[str, list[PolicyResult]]:
    """Policies by name: one per training seed."""
    groups: dict[str, list[PolicyResult]] = defaultdict(list)
    for result in results:
        groups[result.method].append(result)
    return dict(groups)


def paired_rows(results: list[PolicyResult], contrasts: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Every policy against SFT, then each contrast ``[a, b]`` (a minus b), for every summary metric."""
    groups = groups_of(results)
    baseline = results[0].method
    pairs = [(name, baseline) for name in groups if name != baseline] + [tuple(c) for c in contrasts]
    metrics = [m for m in SAMPLE_FIELDS if results[0].samples[0][SAMPLE_FIELDS[m]] is not None]
    rows = []
    for a, b in dict.fromkeys(pairs):
        for metric in metrics:
            field_name = SAMPLE_FIELDS[metric]
            difference = paired_difference(
                [r.own_samples for r in groups[a]], [r.own_samples for r in groups[b]], field_name
            )
            rows.append(
                {"policy": a, "against": b, "metric": metric}
                | {"mean": difference.mean, "se": difference.se, "n": difference.n}
            )
    return rows


def claim_records(results: list[PolicyResult], claims: Sequence[dict[str, Any]]) -> list[Claim]:
    """Each configured claim tested on its contrast's paired difference (each method at its configured
    beta), Holm-adjusted over the run's claims."""
    groups = groups_of(results)
    estimates = []
    for claim in claims:
        a, b = claim["contrast"]
        difference = paired_difference(
            [r.own_samples for r in groups[a]],
            [r.own_samples for r in groups[b]],
            SAMPLE_FIELDS[claim["metric"]],
        )
        estimates.append(
            build_claim(
                claim["claim"],
                claim["paper"],
                f"{a} - {b}",
                claim["metric"],
                claim["direction"],
                difference,
                seeds=min(len(groups[a]), len(groups[b])),
            )
        )
    return family(estimates)


def format_cell(value: Any) -> str:
    """A markdown table cell: floats to 4 significant digits, None empty."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)


def write_table(rows: list[dict[str, Any]], columns: Sequence[str], csv_path: Path, title: str = "") -> None:
    """``rows`` as CSV and as a markdown table beside it (same stem, ``.md``)."""
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ([f"# {title}", ""] if title else []) + [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    csv_path.with_suffix(".md").write_text("\n".join(lines) + "\n")


def write_samples(results: list[PolicyResult], prompts: Prompts, out: Path, n: int) -> None:
    """A few held-out sources with the human reference and every policy's first sample, to judge by eye."""
    by_policy = [{s["id"]: s for s in r.samples if s.get("sample", 0) == 0} for r in results]
    lines = ["# Samples on held-out prompts (each policy's first temperature-1 sample)", ""]
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
                seed = f" s{result.train_seed}" if result.train_seed else ""
                lines.append(
                    f"- **{result.method}{seed}** (proxy {s['proxy_reward']:.3f}{gold}): {s['completion']}"
                )
        lines.append("")
    (out / "samples.md").write_text("\n".join(lines))


def greedy_rows(results: list[PolicyResult]) -> list[dict[str, Any]]:
    return [
        {"method": r.method, "beta": r.beta, "length_power": r.length_power, "train_seed": r.train_seed}
        | {k: r.metrics["greedy"][k] for k in ("proxy_reward", "gold_reward", "length_tokens")}
        for r in results
        if r.metrics.get("greedy")
    ]


def write_report(
    results: list[PolicyResult],
    prompts: Prompts,
    out: Path,
    seed: int,
    contrasts: Sequence[Sequence[str]] = (),
    claims: Sequence[dict[str, Any]] = (),
    best_of: Sequence[int] = (),
    n_shown: int = 8,
) -> list[dict[str, Any]]:
    """Write every file of the results contract into ``out``; the first result is the SFT baseline.
    Returns the summary rows (policies, then best-of-n)."""
    out.mkdir(parents=True, exist_ok=True)
    key = judge_key(results)
    rows = [summary_row(r, results[0], key, seed) for r in results]
    frontier = best_of_rows(results[0], best_of, seed)
    write_table(rows + frontier, SUMMARY_COLUMNS, out / "summary.csv")
    paired = paired_rows(results, contrasts)
    write_table(paired, PAIRED_COLUMNS, out / "paired.csv", "Paired differences (mean ± SE over prompts)")
    if claims:
        records = claim_records(results, claims)
        write_claims(records, out / "claims.json")
        (out / "claims.md").write_text(claims_table(records))
    if greedy := greedy_rows(results):
        write_table(greedy, GREEDY_COLUMNS, out / "summary_greedy.csv", "Greedy outputs (secondary)")
    plot_against(
        rows,
        "length_tokens",
        "length_se",
        "mean length of samples (tokens)",
        out / PLOTS[0],
        "Length versus score",
    )
    plot_against(
        rows + frontier,
        "kl_to_ref",
        "kl_se",
        "KL(policy || SFT), nats",
        out / PLOTS[1],
        "Reward versus KL (best-of-n over SFT samples: the frontier)",
    )
    curves = [
        (f"{r.method} s{r.train_seed}" if r.train_seed else r.method, r.curve) for r in results if r.curve
    ]
    if curves:
        plot_curves(curves, key == "gold_reward", out / PLOTS[2])
    write_policies(results, rows, frontier, out)
    write_samples(results, prompts, out, n_shown)
    return rows + frontier


def write_policies(
    results: list[PolicyResult], rows: list[dict[str, Any]], frontier: list[dict[str, Any]], out: Path
) -> None:
    """Each policy's summary row with its curve, store artifact, per-prompt means and sample lengths, for
    the sweep report to read back (two jobs' policies answered the same prompts: their scores can be
    paired)."""
    records = [
        row
        | {"kind": "baseline" if r.beta is None else "aligned", "curve": r.curve, "policy": r.policy}
        | {"prompt_means": prompt_means(r.own_samples)}
        | {"sample_lengths": sorted(s["length_tokens"] for s in r.own_samples)}
        | ({"round": r.round} if r.round else {})
        for r, row in zip(results, rows, strict=True)
    ] + [row | {"kind": "best_of_n", "curve": [], "policy": results[0].policy} for row in frontier]
    (out / POLICIES_FILE).write_text(json.dumps(records, indent=2))


def prompt_means(samples: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Every summary metric the samples carry, as its mean over each prompt's samples (by prompt id)."""
    return {
        metric: per_prompt_means(samples, name)
        for metric, name in SAMPLE_FIELDS.items()
        if samples and samples[0].get(name) is not None
    }


def log_wandb(rows: list[dict[str, Any]], curves: list[tuple[str, list]], out: Path, **init: Any) -> Path:
    """One wandb run with the evaluation as tables, native scatter and line plots, and the PNGs.

    Native plots (not only images) let a project dashboard put every run of a sweep on one chart.
    ``init`` goes to ``wandb.init``; returns the run's local folder.
    """
    import wandb  # here, so that runs without wandb logging never import it

    scores = [key for key, _, _ in scores_of(rows)]
    summary = wandb.Table(
        columns=list(SUMMARY_COLUMNS), data=[[row[c] for c in SUMMARY_COLUMNS] for row in rows]
    )
    points = [
        [name, p["step"], *(p[key] for key in scores), p["length_tokens"]] for name, c in curves for p in c
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
    policies = [row for row in rows if not row["method"].startswith("best_of_")]
    prefixes = [[f"eval/{row['method']}"] for row in policies]
    if len(policies) == 2:
        prefixes[1].append("eval")
    for row, names in zip(policies, prefixes, strict=True):
        for column in METRIC_COLUMNS:
            if row[column] is not None:
                logged |= {f"{name}/{column}": row[column] for name in names}
    Path(init.get("dir", ".")).mkdir(parents=True, exist_ok=True)
    with wandb.init(**init) as run:
        run.log(logged)
        return Path(run.dir).parent
