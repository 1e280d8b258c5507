"""The rounds report (``make rounds``): iterative against offline alignment on the reward-KL frontier.

Each job of the sweep is one method in ``pipeline.rounds`` rounds, its later rounds sampled from the
policy (iterative) or from SFT (offline, the same rounds otherwise); every round's policy was evaluated.
Each arm of each method and seed is a curve across KL whose points are its rounds (``step``: the
optimiser steps so far), and the claims are read on those curves at matched KL as the frontier report
reads betas (``frontier.py``).

Files in ``out``: ``per_prompt.csv``, ``best_of_n.csv`` and ``claims_spec.json`` (the data, from which
``claims.json``/``claims.md`` recompute), ``power.md``, ``frontier.png``; ``rounds.csv`` (what users of
online alignment watch, a row per arm, seed and round: KL to SFT and its growth that round, length, rate
of samples ending at eos, reward model against gold) and ``rounds.png`` (those against the round).
"""

import csv
import logging
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from directalign.claims import Claim
from directalign.errors import DataError
from directalign.frontier import SFT, ClaimSpec, per_prompt_rows, write_per_prompt
from directalign.frontier_report import (
    BEST_OF_N_FILE,
    PER_PROMPT_FILE,
    plot_frontier,
    power_table,
    recompute_claims,
    write_best_of_n,
    write_spec,
)
from directalign.plots import plt, save_figure
from directalign.sweep import collect_jobs

log = logging.getLogger(__name__)

ROUNDS_FILE = "rounds.csv"
# What sampled a later round's data, as the curve names it.
ARMS = {"policy": "iterative", "sft": "offline"}
ROUND_COLUMNS = (
    "curve",
    "seed",
    "round",
    "steps",
    "kl_to_ref",
    "kl_this_round",
    "length_tokens",
    "eos_rate",
    "proxy_reward",
    "gold_reward",
)
# rounds.png: a panel a column, its label.
PANELS = (
    ("kl_to_ref", "KL(policy || SFT), nats (cumulative)"),
    ("kl_this_round", "KL gained this round, nats"),
    ("length_tokens", "mean length (tokens)"),
    ("eos_rate", "samples ending at eos"),
    ("proxy_reward", "reward model (proxy)"),
    ("gold_reward", "gold reward"),
)


def curve_name(record: dict[str, Any]) -> str:
    """``<method> <arm>``: the method without its ``_round<r>`` suffix, the arm from the round's sampler."""
    if "round" not in record:
        raise DataError(
            f"job {record['job']}: policy {record['method']} has no round (a run with pipeline.rounds=1?);"
            " the rounds report reads runs of pipeline.rounds > 1"
        )
    method = re.sub(r"_round\d+$", "", record["method"])
    return f"{method} {ARMS[record['round']['sampler']]}"


def with_cumulative_steps(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each round's record with ``train_steps`` counting every round up to it (one seed's rounds train
    one after another), so a curve's points are told apart by the steps that trained them."""
    by_run: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_run[(curve_name(row), row.get("train_seed") or 0)].append(row)
    updated = []
    for (curve, seed), run in sorted(by_run.items()):
        run.sort(key=lambda r: r["round"]["index"])
        indices = [r["round"]["index"] for r in run]
        if indices != list(range(1, len(run) + 1)):
            raise DataError(f"{curve} seed {seed}: rounds {indices}, not 1 .. {len(run)} each once")
        if any(r["train_steps"] is None for r in run):
            raise DataError(f"job {run[0]['job']}: {curve} seed {seed} has a round without its train_steps")
        steps = np.cumsum([r["train_steps"] for r in run]).tolist()
        updated.extend(
            r | {"train_steps": int(s), "curve_name": curve} for r, s in zip(run, steps, strict=True)
        )
    return updated


def round_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rounds.csv``'s rows from the records ``with_cumulative_steps`` returns."""
    table, previous_kl = [], {}
    for row in rows:
        run = (row["curve_name"], row.get("train_seed") or 0)
        kl = row["kl_to_ref"]
        table.append(
            {
                "curve": run[0],
                "seed": run[1],
                "round": row["round"]["index"],
                "steps": row["train_steps"],
                "kl_to_ref": kl,
                "kl_this_round": kl - previous_kl.get(run, 0.0),
                "length_tokens": row["length_tokens"],
                "eos_rate": row["eos_rate"],
                "proxy_reward": row["proxy_reward"],
                "gold_reward": row["gold_reward"],
            }
        )
        previous_kl[run] = kl
    return table


def write_data(sweep_dir: Path, out: Path) -> list[dict[str, Any]]:
    """``per_prompt.csv``, ``best_of_n.csv`` and ``rounds.csv`` of every job under ``sweep_dir``;
    returns ``rounds.csv``'s rows."""
    aligned, baselines, frontier = collect_jobs(sweep_dir)
    if not aligned:
        raise DataError(f"no evaluated job (results/policies.json) under {sweep_dir}")
    # Round 1 is one policy in both arms: each arm's job reports it under its own arm.
    rows = with_cumulative_steps(aligned)
    records = baselines + rows
    names = {i: SFT if i < len(baselines) else r["curve_name"] for i, r in enumerate(records)}
    write_per_prompt(per_prompt_rows(records, names), out / PER_PROMPT_FILE)
    write_best_of_n(frontier, out / BEST_OF_N_FILE)
    table = round_rows(rows)
    with (out / ROUNDS_FILE).open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROUND_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    return table


def seed_means(table: Sequence[dict[str, Any]], column: str) -> dict[str, tuple[list[int], list[float]]]:
    """Each curve's ``column`` by round, averaged over its seeds."""
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in table:
        if row[column] is not None:
            values[row["curve"]][row["round"]].append(row[column])
    return {
        curve: (sorted(by_round), [float(np.mean(by_round[r])) for r in sorted(by_round)])
        for curve, by_round in sorted(values.items())
    }


def plot_rounds(table: Sequence[dict[str, Any]], path: Path) -> None:
    """Every column of ``PANELS`` against the round, a line per method and arm (seeds averaged): a solid
    line for the iterative arm, dashed for the offline one, one colour per method."""
    methods = sorted({row["curve"].rsplit(" ", 1)[0] for row in table})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    columns = 3
    fig, axes = plt.subplots(
        math.ceil(len(PANELS) / columns), columns, figsize=(5 * columns, 3.8 * 2), squeeze=False
    )
    for ax, (column, label) in zip(axes.flat, PANELS, strict=True):
        for curve, (rounds, values) in seed_means(table, column).items():
            method, arm = curve.rsplit(" ", 1)
            style = "-" if arm == ARMS["policy"] else "--"
            ax.plot(rounds, values, style, marker="o", ms=4, color=colours[method], label=curve)
        ax.set_xlabel("round")
        ax.set_xticks(sorted({row["round"] for row in table}))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, "Each round's policy: iterative (solid) and offline (dashed), mean over seeds", path)


def log_rounds_wandb(
    claims: Sequence[Claim], table: Sequence[dict[str, Any]], out: Path, **init: Any
) -> Path:
    """One wandb run with the round as the step axis: each method and arm's ``PANELS`` (seeds averaged)
    as ``<curve>/<column>`` series, the rounds and claims as tables, and both plots; ``init`` goes to
    ``wandb.init``. Returns the run's local folder."""
    import wandb  # here, so that reports without wandb logging never import it

    Path(init.get("dir", ".")).mkdir(parents=True, exist_ok=True)
    series = {column: seed_means(table, column) for column, _ in PANELS}
    rounds = sorted({row["round"] for row in table})
    with wandb.init(**init) as run:
        run.define_metric("round")
        run.define_metric("*", step_metric="round")
        for index in rounds:
            logged: dict[str, Any] = {"round": index}
            for column, curves in series.items():
                for curve, (curve_rounds, values) in curves.items():
                    if index in curve_rounds:
                        logged[f"{curve}/{column}"] = values[curve_rounds.index(index)]
            run.log(logged)
        tables = {
            "rounds/table": wandb.Table(
                columns=list(ROUND_COLUMNS), data=[[row[c] for c in ROUND_COLUMNS] for row in table]
            ),
            "rounds/plot": wandb.Image(str(out / "rounds.png")),
            "rounds/frontier": wandb.Image(str(out / "frontier.png")),
        }
        if records := [asdict(c) for c in claims]:
            tables["rounds/claims"] = wandb.Table(
                columns=list(records[0]), data=[list(r.values()) for r in records]
            )
        run.log(tables)
        return Path(run.dir).parent


def write_rounds_report(
    sweep_dir: Path, out: Path, specs: Sequence[ClaimSpec], power_targets: dict[str, float]
) -> tuple[list[Claim], list[dict[str, Any]]]:
    """Everything the module docstring lists, into ``out``; returns the claims and ``rounds.csv``'s rows."""
    out.mkdir(parents=True, exist_ok=True)
    table = write_data(Path(sweep_dir), out)
    write_spec(specs, {}, power_targets, out)
    claims = recompute_claims(out)
    (out / "power.md").write_text(power_table(claims, power_targets))
    marked = sorted({c.at for c in claims if c.protocol == "matched_kl" and c.at is not None})
    plot_frontier(out, marked, out / "frontier.png", points="rounds")
    plot_rounds(table, out / "rounds.png")
    log.info("rounds report: %d claims in %s", len(claims), out)
    return claims, table
