"""The frontier report of a sweep (``make headlines``, ``make length``): every evaluated policy's per-prompt
results, the claims read off them (``frontier.py``), whether each reaches its power target, and reward
against KL with a standard-error band per method, the best-of-n frontier and the matched KLs marked.

Files in ``out``: ``per_prompt.csv`` and ``best_of_n.csv`` (the data), ``claims_spec.json`` (what is
claimed, where, and each method's picked beta), and from those three alone ``claims.json``/``claims.md``
(``recompute_claims``), ``power.md`` and ``frontier.png``; beside them the sweep report
(``sweep.write_sweep_report``).
"""

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from directalign.claims import Claim, claims_table, family, write_claims
from directalign.errors import DataError
from directalign.frontier import (
    SFT,
    ClaimSpec,
    Point,
    curves_of,
    estimates,
    per_prompt_rows,
    pick_betas,
    read_per_prompt,
    write_per_prompt,
)
from directalign.plots import plt, save_figure
from directalign.sweep import collect_jobs, method_groups, plot_best_of_n, write_sweep_report

log = logging.getLogger(__name__)

PER_PROMPT_FILE = "per_prompt.csv"
BEST_OF_N_FILE = "best_of_n.csv"
SPEC_FILE = "claims_spec.json"
CLAIMS_FILE = "claims.json"
BEST_OF_N_COLUMNS = ("method", "n_samples", "kl_to_ref", "proxy_reward", "proxy_se", "gold_reward", "gold_se")
PLOTTED = (("proxy_reward", "proxy reward (learned RM)"), ("gold_reward", "gold reward"))


def write_data(sweep_dir: Path, out: Path) -> list[dict[str, Any]]:
    """``per_prompt.csv`` and ``best_of_n.csv`` of every job under ``sweep_dir``; returns the aligned rows."""
    rows, baselines, frontier = collect_jobs(sweep_dir)
    if not rows:
        raise DataError(f"no evaluated job (results/policies.json) under {sweep_dir}")
    curve_names = {id(row): name for name, group in method_groups(rows).items() for row in group}
    records = baselines + rows
    names = {i: SFT if i < len(baselines) else curve_names[id(r)] for i, r in enumerate(records)}
    write_per_prompt(per_prompt_rows(records, names), out / PER_PROMPT_FILE)
    write_best_of_n(frontier, out / BEST_OF_N_FILE)
    return rows


def write_best_of_n(frontier: Sequence[dict[str, Any]], path: Path) -> None:
    """``best_of_n.csv``: the best-of-n rows over SFT samples, the frontier at small KL."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=BEST_OF_N_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{k: "" if r[k] is None else r[k] for k in BEST_OF_N_COLUMNS} for r in frontier])


def claim_specs(cfg: DictConfig) -> list[ClaimSpec]:
    """The config's claims, each read at the config's matched KLs unless it names its own points."""
    specs = []
    for spec in OmegaConf.to_container(cfg.claims, resolve=True):
        along = spec.get("along")
        default_at = cfg.matched_kl if along == "kl_to_ref" else []
        at = tuple(float(x) for x in spec.pop("at", default_at) or ())
        specs.append(ClaimSpec(**(spec | {"contrast": tuple(spec["contrast"]), "at": at})))
    return specs


def write_spec(
    specs: Sequence[ClaimSpec], picks: dict[str, float], power: dict[str, float], out: Path
) -> None:
    """``claims_spec.json``: the claims, each method's picked beta and the standard errors aimed at."""
    spec = {"claims": [asdict(s) for s in specs], "picks": picks, "power_targets": power}
    (out / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def read_spec(out: Path) -> tuple[list[ClaimSpec], dict[str, float], dict[str, float]]:
    spec = json.loads((out / SPEC_FILE).read_text())
    claims = [
        ClaimSpec(**(s | {"contrast": tuple(s["contrast"]), "at": tuple(s["at"])})) for s in spec["claims"]
    ]
    return claims, spec["picks"], spec["power_targets"]


def recompute_claims(out: Path) -> list[Claim]:
    """``claims.json`` and ``claims.md`` of ``out`` from its per-prompt table and claims spec alone."""
    specs, picks, _ = read_spec(out)
    points = read_per_prompt(out / PER_PROMPT_FILE)
    claims = family([row for spec in specs for row in estimates(spec, points, picks)])
    write_claims(claims, out / CLAIMS_FILE)
    (out / "claims.md").write_text(claims_table(claims))
    return claims


def power_table(claims: Sequence[Claim], targets: dict[str, float]) -> str:
    """Each read claim's standard error against the target for its metric, and the prompts that would
    reach it if the prompt term dominates (n scaled by (se / target)^2)."""
    lines = [
        "# Power: each contrast's standard error against its target",
        "",
        "| claim | protocol | metric | se | target | meets | prompts for the target |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in claims:
        if c.metric not in targets or c.n == 0:
            continue
        target = targets[c.metric]
        needed = math.ceil(c.n * (c.se / target) ** 2)
        where = c.protocol.replace("_", " ") + ("" if c.at is None else f" {c.at:g}")
        meets = "yes" if c.se <= target else "no"
        lines.append(f"| {c.claim} | {where} | {c.metric} | {c.se:.2g} | {target:g} | {meets} | {needed} |")
    return "\n".join(lines) + "\n"


def curve_band(seeds: dict[int, list[Point]], metric: str) -> tuple[list[float], list[float], list[float]]:
    """A method's points averaged over seeds at each beta (and step): KL, metric and its standard error
    over prompts (per-prompt means averaged over seeds) with the between-seed variance added."""
    places = sorted({(p.beta, p.step or 0) for points in seeds.values() for p in points})
    kls, values, errors = [], [], []
    for place in places:
        at_beta = [p for points in seeds.values() for p in points if (p.beta, p.step or 0) == place]
        prompts = sorted(set.intersection(*(set(p.means[metric]) for p in at_beta)))
        per_prompt = np.mean([[p.means[metric][q] for q in prompts] for p in at_beta], axis=0)
        variance = per_prompt.var(ddof=1) / len(prompts)
        if len(at_beta) > 1:
            variance += np.var([p.level(metric) for p in at_beta], ddof=1) / len(at_beta)
        kls.append(float(np.mean([p.level("kl_to_ref") for p in at_beta])))
        values.append(float(per_prompt.mean()))
        errors.append(float(math.sqrt(variance)))
    order = np.argsort(kls)
    return [kls[i] for i in order], [values[i] for i in order], [errors[i] for i in order]


def read_best_of_n(out: Path) -> list[dict[str, float]]:
    with (out / BEST_OF_N_FILE).open(newline="") as handle:
        return [
            {k: float(v) if v else math.nan for k, v in row.items() if k != "method"}
            for row in csv.DictReader(handle)
        ]


def plot_frontier(out: Path, matched_kl: Sequence[float], path: Path, points: str = "betas") -> None:
    """Proxy and gold against KL: each method's seed-averaged curve with a one-standard-error band,
    best-of-n over SFT samples dashed, the matched KLs as vertical lines."""
    curves = curves_of(read_per_prompt(out / PER_PROMPT_FILE))
    frontier = read_best_of_n(out)
    series = [
        (k, label)
        for k, label in PLOTTED
        if all(p.means[k] for s in curves.values() for ps in s.values() for p in ps)
    ]
    fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 4.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=True):
        for name, seeds in curves.items():
            kls, values, errors = curve_band(seeds, key)
            (line,) = ax.plot(kls, values, marker="o", ms=4, label=f"{name} ({len(seeds)} seeds)")
            low = [v - e for v, e in zip(values, errors, strict=True)]
            high = [v + e for v, e in zip(values, errors, strict=True)]
            ax.fill_between(kls, low, high, color=line.get_color(), alpha=0.2)
        plot_best_of_n(ax, frontier, key)
        for kl in matched_kl:
            ax.axvline(kl, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("KL(policy || SFT), nats (dotted: matched KLs of the claims)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, f"Reward against KL: each method across its {points}, mean over seeds ± 1 SE", path)


def log_frontier_wandb(claims: Sequence[Claim], out: Path, **init: Any) -> Path:
    """One wandb run with the report: the claims and every curve point as tables, proxy and gold
    against KL as native scatter plots (one chart across methods), and the frontier plot; ``init`` goes
    to ``wandb.init``. Returns the run's local folder."""
    import wandb  # here, so that reports without wandb logging never import it

    curves = curves_of(read_per_prompt(out / PER_PROMPT_FILE))
    columns = ["curve", "beta", "seed", "kl_to_ref", "proxy_reward", "gold_reward", "length_tokens"]
    points = wandb.Table(
        columns=columns,
        data=[
            [p.curve, p.beta, p.seed, *(p.level(m) if p.means[m] else None for m in columns[3:])]
            for seeds in curves.values()
            for ps in seeds.values()
            for p in ps
        ],
    )
    records = [asdict(c) for c in claims]
    table = wandb.Table(columns=list(records[0]), data=[list(r.values()) for r in records])
    logged: dict[str, Any] = {"frontier/claims": table, "frontier/points": points}
    for key, label in PLOTTED:
        logged[f"frontier/kl_vs_{key}"] = wandb.plot.scatter(points, "kl_to_ref", key, title=f"{label} vs KL")
    logged["frontier/plot"] = wandb.Image(str(out / "frontier.png"))
    Path(init.get("dir", ".")).mkdir(parents=True, exist_ok=True)
    with wandb.init(**init) as run:
        run.log(logged)
        return Path(run.dir).parent


def write_frontier_report(
    sweep_dir: Path,
    out: Path,
    specs: Sequence[ClaimSpec],
    picks: dict[str, float] | None,
    power_targets: dict[str, float],
    matched_kl: Sequence[float] = (),
) -> list[Claim]:
    """Everything the module docstring lists, into ``out``; returns the claims. ``picks`` None: each
    curve's beta of highest proxy reward."""
    out.mkdir(parents=True, exist_ok=True)
    write_data(Path(sweep_dir), out)
    write_sweep_report(Path(sweep_dir), out, matched_kl)
    if picks is None:
        picks = pick_betas(read_per_prompt(out / PER_PROMPT_FILE))
    write_spec(specs, picks, power_targets, out)
    claims = recompute_claims(out)
    (out / "power.md").write_text(power_table(claims, power_targets))
    marked = sorted({c.at for c in claims if c.protocol == "matched_kl" and c.at is not None})
    plot_frontier(out, marked, out / "frontier.png")
    log.info("frontier report: %d claims in %s", len(claims), out)
    return claims
