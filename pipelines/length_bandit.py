"""The length study on the toy bandit: the exact optimum of CoPG (and population DPO, the same point) and of
population IPO against beta, for each length power a; writes summary.json, summary.md and length_bandit.png.

    python pipelines/length_bandit.py                                     # conf/length_bandit.yaml
    python pipelines/length_bandit.py study.reward_per_token=0.3 out_dir=...

No training: the optima are the closed forms and 1-D roots derived in src/directalign/bandit.py, where the
tests check that training reaches them. results/length_bandit/README.md reads the results.
"""

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import hydra
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from scipy.optimize import brentq
from scipy.special import kl_div, softmax

from directalign.bandit import PROBABILITY_SUM_TOLERANCE, arm_normalisers, copg_fixed_point, ipo_fixed_point
from directalign.errors import ConfigError
from directalign.losses import LOSSES, Optimum

METHOD_LABELS = {"copg": "CoPG / DPO", "ipo": "IPO"}
METHOD_STYLES = {"copg": "-", "ipo": "--"}


@dataclass(frozen=True)
class LengthStudy:
    """The ``study`` config section, validated on construction so bad input fails in one line."""

    lengths: tuple[int, ...]
    quality: tuple[float, ...]
    reward_per_token: float
    ref: tuple[float, ...] | None
    length_powers: tuple[float, ...]
    beta_min: float
    beta_max: float
    n_betas: int
    table_betas: tuple[float, ...]
    score_fractions: tuple[float, ...]

    def __post_init__(self) -> None:
        n_arms = len(self.lengths)
        _require(
            "lengths", self.lengths, _every(self.lengths, lambda n: _integer(n) and n >= 1), "integers >= 1"
        )
        _require("quality", self.quality, len(self.quality) == n_arms, f"{n_arms} numbers, one per length")
        _require("quality", self.quality, _every(self.quality, _finite), "finite numbers")
        _require("reward_per_token", self.reward_per_token, _finite(self.reward_per_token), "a finite number")
        if self.ref is not None:
            positive = len(self.ref) == n_arms and _every(self.ref, lambda p: _finite(p) and p > 0)
            _require("ref", self.ref, positive, f"null or {n_arms} probabilities > 0")
            _require("ref", self.ref, abs(sum(self.ref) - 1) <= PROBABILITY_SUM_TOLERANCE, "summing to 1")
        _require("length_powers", self.length_powers, _every(self.length_powers, _unit), "in [0, 1]")
        _require("beta_min", self.beta_min, _positive(self.beta_min), "a number > 0")
        beta_max_ok = _positive(self.beta_max) and self.beta_max > self.beta_min
        _require("beta_max", self.beta_max, beta_max_ok, "a number > beta_min")
        _require("n_betas", self.n_betas, _integer(self.n_betas) and self.n_betas >= 2, "an integer >= 2")
        _require("table_betas", self.table_betas, _every(self.table_betas, _positive), "numbers > 0")
        inside = _every(self.score_fractions, lambda f: _finite(f) and 0 < f < 1)
        _require("score_fractions", self.score_fractions, inside, "numbers in (0, 1)")

    @property
    def reference(self) -> np.ndarray:
        """pi_ref, with ``ref: null`` read as uniform."""
        n_arms = len(self.lengths)
        return np.asarray(self.ref) if self.ref is not None else np.full(n_arms, 1.0 / n_arms)

    @property
    def rewards(self) -> dict[str, np.ndarray]:
        """The two rewards compared: quality alone, and quality plus ``reward_per_token`` per token."""
        quality, lengths = np.asarray(self.quality), np.asarray(self.lengths)
        return {"length-neutral": quality, "grows with length": quality + self.reward_per_token * lengths}


def _every(values: Sequence, test: Callable[[object], bool]) -> bool:
    return len(values) > 0 and all(test(value) for value in values)


def _positive(value: object) -> bool:
    return _finite(value) and value > 0


def _unit(value: object) -> bool:
    return _finite(value) and 0 <= value <= 1


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _require(key: str, value: object, holds: bool, what: str) -> None:
    if not holds:
        shown = list(value) if isinstance(value, Sequence) else value
        raise ConfigError(f"study.{key} must be {what}, got {shown!r}")


def _sequence(key: str, value: object) -> tuple:
    _require(key, value, isinstance(value, Sequence) and not isinstance(value, str), "a list")
    return tuple(value)


def load_study(section: dict) -> LengthStudy:
    """``LengthStudy`` from the ``study`` config section, lists read as tuples."""
    keys = [field.name for field in fields(LengthStudy)]
    missing, unknown = [k for k in keys if k not in section], [k for k in section if k not in keys]
    if missing or unknown:
        raise ConfigError(f"study: missing keys {missing}, unknown keys {unknown}")
    lists = ("lengths", "quality", "ref", "length_powers", "table_betas", "score_fractions")
    read = {key: _sequence(key, section[key]) for key in lists if not (key == "ref" and section[key] is None)}
    return LengthStudy(**{**section, **read})


def optimum(study: LengthStudy, rewards: np.ndarray, method: str, length_power: float, beta: float) -> dict:
    """``method``'s exact optimum at one ``(a, beta)`` and what it scores: mean length, E_pi[R],
    KL(pi || pi_ref), J = E_pi[R] - beta KL and the regret J(pi*) - J (pi* the maximiser of J, CoPG's
    optimum at a = 0), computed as the identical beta KL(pi || pi*). Both KLs sum ``kl_div`` terms, each
    >= 0, so they keep their precision near 0."""
    log_ref = np.log(study.reference)
    normalisers = arm_normalisers(study.lengths, length_power)
    if LOSSES[method].optimum is Optimum.TILTED:
        policy = copg_fixed_point(rewards, log_ref, normalisers, beta)
    else:
        policy = ipo_fixed_point(rewards, log_ref, normalisers, beta, study.reference, study.reference)
    expected_reward = float(policy @ rewards)
    kl = float(kl_div(policy, study.reference).sum())
    value = expected_reward - beta * kl
    return {
        "beta": float(beta),
        "policy": policy.tolist(),
        "mean_length": float(policy @ np.asarray(study.lengths)),
        "expected_reward": expected_reward,
        "kl": kl,
        "J": value,
        "regret": float(beta * kl_div(policy, softmax(log_ref + rewards / beta)).sum()),
    }


def sweep(study: LengthStudy, betas: Sequence[float]) -> dict:
    """``{reward: {method: {a: [optimum at each beta]}}}`` over both rewards, both methods and every a."""
    return {
        name: {
            method: {
                str(power): [optimum(study, rewards, method, power, beta) for beta in betas]
                for power in study.length_powers
            }
            for method in METHOD_LABELS
        }
        for name, rewards in study.rewards.items()
    }


def score_target(study: LengthStudy, rewards: np.ndarray, fraction: float) -> float:
    """The E_pi[R] a ``fraction`` of the way from pi_ref's to the best arm's reward."""
    start = float(study.reference @ rewards)
    return start + fraction * (float(rewards.max()) - start)


def optimum_at_score(
    study: LengthStudy, rewards: np.ndarray, method: str, length_power: float, target: float
) -> dict | None:
    """The optimum whose E_pi[R] is ``target``, the beta that gives it found in [beta_min, beta_max] as a
    1-D root in log beta; None when that range does not reach ``target``. Comparing a at equal score
    separates what averaging does to length from what it does to the strength of the regularisation."""

    def shortfall(log_beta: float) -> float:
        return optimum(study, rewards, method, length_power, math.exp(log_beta))["expected_reward"] - target

    low, high = math.log(study.beta_min), math.log(study.beta_max)
    if shortfall(low) * shortfall(high) > 0:
        return None
    return optimum(study, rewards, method, length_power, math.exp(brentq(shortfall, low, high, xtol=1e-12)))


def equal_score(study: LengthStudy) -> dict:
    """``{reward: {method: {fraction: {a: optimum at that score or None}}}}``."""
    return {
        name: {
            method: {
                str(fraction): {
                    str(power): optimum_at_score(
                        study, rewards, method, power, score_target(study, rewards, fraction)
                    )
                    for power in study.length_powers
                }
                for fraction in study.score_fractions
            }
            for method in METHOD_LABELS
        }
        for name, rewards in study.rewards.items()
    }


def summary_table(study: LengthStudy, table: dict, at_score: dict) -> str:
    """Per reward, two markdown tables: each method's optimum at each table beta and a, and the mean length
    (and beta) of the optimum at equal scores E_pi[R]."""
    ref_length = float(study.reference @ np.asarray(study.lengths))
    lines = [
        f"Toy length bandit: |y| = {list(study.lengths)}, quality = {list(study.quality)}, "
        f"pi_ref = {study.reference.round(4).tolist()} (mean length {ref_length:.3g}); IPO's pairs "
        "y, y' ~ pi_ref. Exact optima (no training). J = E_pi[R] - beta KL(pi || pi_ref); "
        "regret = J(pi*) - J with pi* the optimum of J (CoPG / DPO at a = 0).",
    ]
    columns = ("mean length", "E_pi[R]", "KL", "J", "regret")
    for name, rewards in study.rewards.items():
        lines += [
            "",
            f"**Reward {name}**: R = {rewards.round(4).tolist()}",
            "",
            "| method | beta | a | " + " | ".join(columns) + " |",
            "|---|---:|---:|" + "---:|" * len(columns),
        ]
        for method, label in METHOD_LABELS.items():
            for index, beta in enumerate(study.table_betas):
                for power, rows in table[name][method].items():
                    row = rows[index]
                    numbers = (row["mean_length"], row["expected_reward"], row["kl"], row["J"], row["regret"])
                    cells = " | ".join(f"{number:.4g}" for number in numbers)
                    lines.append(f"| {label} | {beta:g} | {power} | {cells} |")
        powers = [str(power) for power in study.length_powers]
        lines += [
            "",
            "Mean length (beta) of the optimum at equal score E_pi[R]:",
            "",
            "| method | E_pi[R] | " + " | ".join(f"a = {power}" for power in powers) + " |",
            "|---|---:|" + "---:|" * len(powers),
        ]
        for method, label in METHOD_LABELS.items():
            for fraction in study.score_fractions:
                rows = at_score[name][method][str(fraction)]
                cells = " | ".join(
                    "beyond the beta range" if rows[power] is None else _length_and_beta(rows[power])
                    for power in powers
                )
                lines.append(f"| {label} | {score_target(study, rewards, fraction):.4g} | {cells} |")
    return "\n".join(lines) + "\n"


def _length_and_beta(row: dict) -> str:
    return f"{row['mean_length']:.4g} ({row['beta']:.3g})"


def study_figure(study: LengthStudy, curves: dict) -> Figure:
    """Per reward (rows): mean length and J against beta, and mean length against E_pi[R] (the
    length-versus-score frontier); colour a, solid CoPG / DPO, dashed IPO."""
    figure = Figure(figsize=(13, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(curves), 3, squeeze=False)
    ref_length = float(study.reference @ np.asarray(study.lengths))
    colours = {str(power): f"C{i}" for i, power in enumerate(study.length_powers)}
    for (name, methods), (length_axes, value_axes, frontier_axes) in zip(curves.items(), grid, strict=True):
        for method, by_power in methods.items():
            for power, rows in by_power.items():
                style = {"color": colours[power], "linestyle": METHOD_STYLES[method]}
                label = f"{METHOD_LABELS[method]}, a = {power}"
                betas = [row["beta"] for row in rows]
                lengths = [row["mean_length"] for row in rows]
                length_axes.plot(betas, lengths, label=label, **style)
                value_axes.plot(betas, [row["J"] for row in rows], **style)
                frontier_axes.plot([row["expected_reward"] for row in rows], lengths, **style)
        for axes in (length_axes, frontier_axes):
            axes.axhline(ref_length, color="grey", linewidth=0.8, linestyle=":")
        for axes in (length_axes, value_axes):
            axes.set_xscale("log")
            axes.set_xlabel("beta")
        length_axes.set_ylabel("mean length E_pi|y| (dotted: pi_ref)")
        value_axes.set_ylabel("J = E_pi[R] - beta KL(pi || pi_ref)")
        frontier_axes.set_xlabel("E_pi[R] (over the beta grid)")
        frontier_axes.set_ylabel("mean length E_pi|y|")
        length_axes.set_title(f"reward {name}")
    grid[0][0].legend(fontsize="small")
    figure.suptitle(f"Toy length bandit, |y| = {list(study.lengths)}, quality = {list(study.quality)}")
    return figure


@hydra.main(config_path="../conf", config_name="length_bandit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        study = load_study(OmegaConf.to_container(cfg.study, resolve=True))
    except ConfigError as error:
        # Bad input is the user's to fix: one line naming it, not a traceback.
        raise SystemExit(f"directalign: {error}") from None
    started = time.perf_counter()
    betas = np.geomspace(study.beta_min, study.beta_max, study.n_betas)
    summary = {
        "config": asdict(study),
        "rewards": {name: rewards.tolist() for name, rewards in study.rewards.items()},
        "curves": sweep(study, betas),
        "table": sweep(study, study.table_betas),
        "equal_score": equal_score(study),
    }
    summary["compute_seconds"] = round(time.perf_counter() - started, 2)

    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    table = summary_table(study, summary["table"], summary["equal_score"])
    (out_dir / "summary.md").write_text(table)
    study_figure(study, summary["curves"]).savefig(out_dir / "length_bandit.png", dpi=150)
    written = ", ".join(("summary.json", "summary.md", "length_bandit.png"))
    print(table, f"Computed in {summary['compute_seconds']} s; wrote {written} to {out_dir}")


if __name__ == "__main__":
    main()
