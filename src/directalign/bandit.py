"""Paper B's toy bandit (CoPG, section 5, Figure 1), generalised to any arms and distributions.

The policy is a softmax over per-arm logits, treated as a batch of length-1 sequences so that the
losses trained here are the very functions of ``directalign.losses`` used on language models: the
bandit checks them where the optimum is known in closed form, ``pi* = softmax(log pi_ref + R/beta)``.
Every seed trains its own row of a ``[seeds, arms]`` logit matrix at once; Adam is elementwise and the
loss is a sum of per-seed means, so the rows are exactly independent runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from directalign.losses import PAIRWISE_PREFERENCE_LOSSES, copg_loss, sequence_logratio

METHOD_LABELS = {
    "copg": "CoPG",
    "pg": "PG, baseline 0",
    "pg_value": "PG, value baseline",
    "ipo": "IPO (Bradley-Terry preferences)",
    "dpo": "DPO (Bradley-Terry preferences)",
}
# Distributions are typed by hand in YAML or on the command line: allow thirds written 0.3333333.
PROBABILITY_SUM_TOLERANCE = 1e-6
CONFIG_KEYS = (
    "rewards",
    "mu1",
    "mu2",
    "ref",
    "beta",
    "n_pairs",
    "batch_size",
    "lr",
    "epochs",
    "seed",
    "seeds",
    "methods",
    "log_every",
)


@dataclass(frozen=True)
class BanditConfig:
    """The ``bandit`` config section, validated on construction so bad input fails before any compute."""

    rewards: tuple[float, ...]
    mu1: tuple[float, ...]
    mu2: tuple[float, ...]
    ref: tuple[float, ...] | None
    beta: float
    n_pairs: int
    batch_size: int
    lr: float
    epochs: int
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    log_every: int

    @classmethod
    def from_mapping(cls, section: Mapping) -> BanditConfig:
        """Build from the ``bandit`` section; ``seed``, when set, replaces the list ``seeds``."""
        missing = [key for key in CONFIG_KEYS if key not in section]
        unknown = [key for key in section if key not in CONFIG_KEYS]
        if missing or unknown:
            raise ValueError(f"bandit: missing keys {missing}, unknown keys {unknown}")
        seed = section["seed"]
        seeds = section["seeds"] if seed is None else [seed]
        return cls(
            rewards=_numbers("rewards", section["rewards"]),
            mu1=_numbers("mu1", section["mu1"]),
            mu2=_numbers("mu2", section["mu2"]),
            ref=None if section["ref"] is None else _numbers("ref", section["ref"]),
            beta=section["beta"],
            n_pairs=section["n_pairs"],
            batch_size=section["batch_size"],
            lr=section["lr"],
            epochs=section["epochs"],
            seeds=_sequence("seed" if seed is not None else "seeds", seeds),
            methods=_sequence("methods", section["methods"]),
            log_every=section["log_every"],
        )

    def __post_init__(self) -> None:
        if not self.rewards or not all(math.isfinite(r) for r in self.rewards):
            raise ValueError(f"bandit.rewards must be a non-empty list of finite numbers, got {self.rewards}")
        _check_distribution("mu1", self.mu1, len(self.rewards), strictly_positive=False)
        _check_distribution("mu2", self.mu2, len(self.rewards), strictly_positive=False)
        if self.ref is not None:
            _check_distribution("ref", self.ref, len(self.rewards), strictly_positive=True)
        for key in ("beta", "lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"bandit.{key} must be a number > 0, got {value!r}")
        for key in ("n_pairs", "batch_size", "epochs", "log_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"bandit.{key} must be an integer >= 1, got {value!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ValueError(
                f"bandit.seeds (or bandit.seed) must be a non-empty list of integers, got {list(self.seeds)}"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"bandit.seeds must not repeat a seed, got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in METHOD_LABELS]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ValueError(
                f"bandit.methods must be distinct names among {list(METHOD_LABELS)}, got {list(self.methods)}"
            )

    @property
    def reference(self) -> tuple[float, ...]:
        """pi_ref, with ``ref: null`` read as uniform."""
        n_arms = len(self.rewards)
        return self.ref if self.ref is not None else (1.0 / n_arms,) * n_arms


def _sequence(key: str, value: object) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ValueError(f"bandit.{key} must be a list, got {value!r}")
    return tuple(value)


def _numbers(key: str, value: object) -> tuple[float, ...]:
    items = _sequence(key, value)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in items):
        raise ValueError(f"bandit.{key} must be a list of numbers, got {list(items)}")
    return tuple(float(x) for x in items)


def _check_distribution(key: str, probs: tuple[float, ...], n_arms: int, strictly_positive: bool) -> None:
    if len(probs) != n_arms:
        raise ValueError(f"bandit.{key} has {len(probs)} entries but bandit.rewards has {n_arms} arms")
    if not all(math.isfinite(p) for p in probs) or min(probs) < 0:
        raise ValueError(f"bandit.{key} must not have negative entries, got {list(probs)}")
    if strictly_positive and min(probs) == 0:
        raise ValueError(f"bandit.{key} must be > 0 on every arm (its log is taken), got {list(probs)}")
    if abs(sum(probs) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ValueError(f"bandit.{key} must sum to 1, got sum {sum(probs)!r} for {list(probs)}")


def log_optimal_policy(rewards: torch.Tensor, log_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``log pi*`` with ``pi* = softmax(log pi_ref + R / beta)``, the optimum of regularised RL."""
    return torch.log_softmax(log_ref + rewards / beta, dim=-1)


def objective(
    log_policy: torch.Tensor, rewards: torch.Tensor, log_ref: torch.Tensor, beta: float
) -> torch.Tensor:
    """``J(pi) = E_pi[R] - beta * KL(pi || pi_ref)`` over the last dimension; from log-probs, so an arm
    whose probability underflows to 0 contributes 0 rather than ``0 * log 0``."""
    policy = log_policy.exp()
    return (policy * rewards).sum(-1) - beta * (policy * (log_policy - log_ref)).sum(-1)


def optimal_value(rewards: torch.Tensor, log_ref: torch.Tensor, beta: float) -> torch.Tensor:
    """``J(pi*) = beta * log E_{pi_ref}[exp(R / beta)]``, the closed form used for the regret."""
    return beta * torch.logsumexp(log_ref + rewards / beta, dim=-1)


def regret(
    log_policy: torch.Tensor, rewards: torch.Tensor, log_ref: torch.Tensor, beta: float
) -> torch.Tensor:
    """``J(pi*) - J(pi)``, computed as the identical ``beta * KL(pi || pi*)``: subtracting two values of J
    loses everything below ~1e-16 * J(pi*), while ``sum pi (d + expm1(-d))`` with ``d = log pi/pi*`` (each
    term >= 0, the added terms sum to 0) keeps full relative precision all the way to pi = pi*."""
    gap = log_policy - log_optimal_policy(rewards, log_ref, beta)
    return beta * (log_policy.exp() * (gap + torch.expm1(-gap))).sum(-1)


@dataclass(frozen=True)
class PairData:
    """Off-policy pairs, one row per seed: ``first ~ mu1`` and ``second ~ mu2`` (rewarded, for CoPG and
    PG), and the same pairs ranked by a Bradley-Terry draw (for DPO and IPO, which need a winner)."""

    first: torch.Tensor
    second: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors in field order (``dataclasses.astuple`` would deep-copy them)."""
        return tuple(getattr(self, field.name) for field in fields(self))

    def take(self, index: torch.Tensor) -> PairData:
        """The pairs at ``index`` (``[seeds, batch]``), row by row."""
        return PairData(*(tensor.gather(1, index) for tensor in self.tensors()))


def sample_pairs(config: BanditConfig, generator: torch.Generator) -> PairData:
    """One seed's dataset: ``n_pairs`` pairs ``(y, y')`` and the Bradley-Terry winner of each,
    ``P(y > y') = sigmoid(R(y) - R(y'))``, as a labeller with that reward would rank them."""
    mu1 = torch.tensor(config.mu1, dtype=torch.float64)
    mu2 = torch.tensor(config.mu2, dtype=torch.float64)
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    first = torch.multinomial(mu1, config.n_pairs, replacement=True, generator=generator)
    second = torch.multinomial(mu2, config.n_pairs, replacement=True, generator=generator)
    first_wins = torch.rand(config.n_pairs, generator=generator, dtype=torch.float64) < torch.sigmoid(
        rewards[first] - rewards[second]
    )
    return PairData(
        first=first,
        second=second,
        chosen=torch.where(first_wins, first, second),
        rejected=torch.where(first_wins, second, first),
    )


def arm_logratio(logits: torch.Tensor, log_ref: torch.Tensor, arms: torch.Tensor) -> torch.Tensor:
    """``h(y) = log pi(y) - log pi_ref(y)`` for ``arms`` (``[seeds, batch]``), computed by the LLM
    code path: each arm is a completion of one token, reduced by ``sequence_logratio``."""
    policy_logps = torch.log_softmax(logits, dim=-1).gather(1, arms).reshape(-1, 1)
    ref_logps = log_ref[arms].reshape(-1, 1)
    mask = torch.ones_like(policy_logps)
    return sequence_logratio(policy_logps, ref_logps, mask).view_as(arms)


def policy_gradient_loss(
    logratio_a: torch.Tensor,
    logratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    beta: float,
    baseline: torch.Tensor,
) -> torch.Tensor:
    """Off-policy PG surrogate of paper B's baselines, per pair, to minimise. Its gradient is
    ``-[(R_beta(y) - b) grad log pi(y) + (R_beta(y') - b) grad log pi(y')]`` with ``R_beta = R - beta*h``:
    the coefficients are detached (a REINFORCE weight, not a target), and ``grad h = grad log pi``
    since pi_ref is frozen. Without importance weights this is biased off-policy, which is the point."""
    weight_a = (reward_a - beta * logratio_a - baseline).detach()
    weight_b = (reward_b - beta * logratio_b - baseline).detach()
    return -(weight_a * logratio_a + weight_b * logratio_b)


def pair_loss(
    method: str,
    logits: torch.Tensor,
    log_ref: torch.Tensor,
    rewards: torch.Tensor,
    beta: float,
    batch: PairData,
) -> torch.Tensor:
    """Per-pair loss ``[seeds, batch]`` of ``method``: DPO and IPO see only the Bradley-Terry ranking of
    a pair, CoPG and the PG baselines see both rewards."""
    if method in PAIRWISE_PREFERENCE_LOSSES:
        h_chosen = arm_logratio(logits, log_ref, batch.chosen)
        h_rejected = arm_logratio(logits, log_ref, batch.rejected)
        return PAIRWISE_PREFERENCE_LOSSES[method](h_chosen, h_rejected, beta)
    h_a, h_b = arm_logratio(logits, log_ref, batch.first), arm_logratio(logits, log_ref, batch.second)
    reward_a, reward_b = rewards[batch.first], rewards[batch.second]
    if method == "copg":
        return copg_loss(h_a, h_b, reward_a, reward_b, beta)
    if method == "pg_value":  # the exact value E_{y~pi}[R(y)] of each seed's current policy
        baseline = (torch.softmax(logits, dim=-1) * rewards).sum(-1, keepdim=True)
    else:
        baseline = torch.zeros((), dtype=logits.dtype)
    return policy_gradient_loss(h_a, h_b, reward_a, reward_b, beta, baseline)


@dataclass(frozen=True)
class TrainResult:
    """One method over all seeds: final policies ``[seeds, arms]`` and their J ``[seeds]``, and regrets
    ``[seeds, len(steps)]``."""

    policies: np.ndarray
    objectives: np.ndarray
    steps: list[int]
    regrets: np.ndarray


def seed_streams(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for a seed's dataset and for its shuffles, so every method of a seed
    sees the same pairs in the same order and changing the data draw never shifts the shuffles."""
    data_seed, shuffle_seed = (
        int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(2)
    )
    return torch.Generator().manual_seed(data_seed), torch.Generator().manual_seed(shuffle_seed)


def sample_datasets(config: BanditConfig) -> PairData:
    """Every seed's dataset, stacked into ``[seeds, n_pairs]`` tensors."""
    per_seed = [sample_pairs(config, seed_streams(seed)[0]) for seed in config.seeds]
    return PairData(*(torch.stack(column) for column in zip(*(d.tensors() for d in per_seed), strict=True)))


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread: on ``[seeds, arms]`` tensors OpenMP's fork-join costs far more than
    the work, and stalls for milliseconds per op when another process holds the other cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@single_thread()
def train(config: BanditConfig, method: str, data: PairData) -> TrainResult:
    """Adam on the logits (started at pi_ref) for ``epochs`` shuffled passes over the pairs, all seeds
    at once, recording the regret ``J(pi*) - J(pi)`` every ``log_every`` steps and at the end."""
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    log_ref = torch.tensor(config.reference, dtype=torch.float64).log()
    shufflers = [seed_streams(seed)[1] for seed in config.seeds]
    logits = log_ref.repeat(len(config.seeds), 1).requires_grad_()
    optimiser = torch.optim.Adam([logits], lr=config.lr)

    def current_regret() -> np.ndarray:
        with torch.no_grad():
            return regret(torch.log_softmax(logits, -1), rewards, log_ref, config.beta).numpy()

    steps, regrets = [0], [current_regret()]
    total_steps = config.epochs * math.ceil(config.n_pairs / config.batch_size)
    step = 0
    for _ in range(config.epochs):
        order = torch.stack([torch.randperm(config.n_pairs, generator=g) for g in shufflers])
        for index in order.split(config.batch_size, dim=1):
            loss = pair_loss(method, logits, log_ref, rewards, config.beta, data.take(index)).mean(-1).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                steps.append(step)
                regrets.append(current_regret())
    log_policies = torch.log_softmax(logits.detach(), -1)
    return TrainResult(
        policies=log_policies.exp().numpy(),
        objectives=objective(log_policies, rewards, log_ref, config.beta).numpy(),
        steps=steps,
        regrets=np.stack(regrets, axis=1),
    )


def _spread(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over seeds (axis 0); 0 for a single seed."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])


def run(config: BanditConfig) -> dict:
    """Train every method on the same per-seed datasets; return the JSON-ready summary: pi*, J(pi*)
    and per method the seed-mean final policy, J and regret, their spread, per-seed values and curves."""
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    log_ref = torch.tensor(config.reference, dtype=torch.float64).log()
    data = sample_datasets(config)
    methods = {}
    for method in config.methods:
        result = train(config, method, data)
        final = result.regrets[:, -1]
        methods[method] = {
            "label": METHOD_LABELS[method],
            "policy": result.policies.mean(axis=0).tolist(),
            "policy_std": _spread(result.policies).tolist(),
            "J": float(result.objectives.mean()),
            "regret": float(final.mean()),
            "regret_std": float(_spread(final)),
            "per_seed": [
                {"seed": seed, "policy": policy.tolist(), "J": float(value), "regret": float(gap)}
                for seed, policy, value, gap in zip(
                    config.seeds, result.policies, result.objectives, final, strict=True
                )
            ],
            "regret_curve": [
                [s, float(r)] for s, r in zip(result.steps, result.regrets.mean(axis=0), strict=True)
            ],
            "regret_curve_min_max": [
                [s, float(lo), float(hi)]
                for s, lo, hi in zip(
                    result.steps, result.regrets.min(axis=0), result.regrets.max(axis=0), strict=True
                )
            ],
        }
    return {
        "config": asdict(config),
        "pi_star": log_optimal_policy(rewards, log_ref, config.beta).exp().tolist(),
        "J_star": float(optimal_value(rewards, log_ref, config.beta)),
        "methods": methods,
    }


def summary_table(summary: dict) -> str:
    """Markdown table of the final policy, J and regret of each method: seed means, and the regret's
    sample std over seeds."""
    config = summary["config"]
    seeds = config["seeds"]
    arms = len(summary["pi_star"])
    lines = [
        f"Toy bandit (paper B, Figure 1): R = {config['rewards']}, beta = {config['beta']}, "
        f"{config['n_pairs']} pairs, Adam lr {config['lr']}, batch {config['batch_size']}, "
        f"{config['epochs']} epochs; {len(seeds)} seed(s) {seeds}. J(pi*) = {summary['J_star']:.4f}.",
        "",
        "| method | "
        + " | ".join(f"pi(arm {i})" for i in range(arms))
        + " | J(pi) | final regret (mean ± std) |",
        "|---|" + "---:|" * (arms + 2),
        "| pi* | " + " | ".join(f"{p:.4f}" for p in summary["pi_star"]) + f" | {summary['J_star']:.4f} | 0 |",
    ]
    for entry in summary["methods"].values():
        policy = " | ".join(f"{p:.4f}" for p in entry["policy"])
        regret = f"{entry['regret']:.4g} ± {entry['regret_std']:.2g}"
        lines.append(f"| {entry['label']} | {policy} | {entry['J']:.4f} | {regret} |")
    return "\n".join(lines) + "\n"


def regret_figure(summary: dict) -> Figure:
    """Regret against optimiser step, one line per method (seed mean) over a min-max band across seeds,
    on a log scale where exact zeros (pi = pi* to the last bit) are left out: paper B's Figure 1."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for entry in summary["methods"].values():
        steps, mean = zip(*entry["regret_curve"], strict=True)
        _, low, high = zip(*entry["regret_curve_min_max"], strict=True)
        (line,) = axes.plot(steps, mean, label=entry["label"])
        low = np.asarray(low)
        axes.fill_between(steps, low, high, where=low > 0, color=line.get_color(), alpha=0.2, linewidth=0)
    config = summary["config"]
    axes.set_yscale("log", nonpositive="mask")
    axes.set_xlabel("optimiser step")
    axes.set_ylabel("regret  J(pi*) - J(pi)")
    axes.set_title(
        f"Toy bandit, beta = {config['beta']}, lr {config['lr']}, {config['epochs']} epochs, "
        f"{len(config['seeds'])} seed(s)"
    )
    axes.legend()
    return figure
