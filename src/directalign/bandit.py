"""Paper B's toy bandit (CoPG, section 5, Figure 1), generalised to any arms, distributions and lengths.

The policy is a softmax over per-arm logits. Arm ``y`` is a completion of ``|y|`` tokens (``lengths``,
default 1) whose first token carries its whole log-probability, so the losses trained here are the very
functions of ``directalign.losses`` used on language models, on the normalised log-ratio
``g(y) = h(y) / |y|^a`` of ``sequence_logratio``, with ``h = log pi - log pi_ref`` and
``a = length_power`` (0: summed, 1: averaged). Every seed trains its own row of a ``[seeds, arms]``
logit matrix at once; Adam is elementwise and the loss is a sum of per-seed means, so the rows are
exactly independent runs.

Population fixed points (``fixed_point``). Write ``n(y) = |y|^a``, ``u = R / beta``,
``m = mu1 + mu2`` (how often an arm appears in a pair) and call two arms joined when
``mu1(y) mu2(y') > 0`` for ``y != y'``. The CoPG, DPO and IPO fixed points have the form
``pi(y) = pi_ref(y) exp(n(y) (g0(y) + C))``: those losses see only differences ``g(y) - g(y')``, and the
one constant ``C`` with ``sum_y pi(y) = 1`` is a 1-D root, monotone because every ``n(y) > 0``. If the
joined arms form more than one group, each group has its own free constant: no unique fixed point (null).

- CoPG, ``(R(y) - R(y') - beta (g(y) - g(y')))^2 / (2 beta)`` per pair: zero on every pair iff
  ``g(y) - g(y') = u(y) - u(y')``, so ``g0 = u`` and ``h(y) = |y|^a (R(y) / beta + C)``. At ``a = 0``
  this is ``pi* = softmax(log pi_ref + R / beta)``, the maximiser of
  ``J(pi) = E_pi[R] - beta KL(pi || pi_ref)``; at equal lengths ``L`` it is that of ``beta / L^a``.
  Every pair is fitted exactly, so any sample whose pairs join all arms has this fixed point, whatever
  ``mu1`` and ``mu2``.
- DPO on Bradley-Terry preferences ``P(y > y') = sigmoid(R(y) - R(y'))``: a pair's population loss is
  the cross-entropy of ``sigmoid(beta d)`` against that probability, ``d = g(y) - g(y')``, least at
  ``beta d = R(y) - R(y')``: CoPG's condition, so CoPG's fixed point. On a finite sample the optimum is
  instead the Bradley-Terry fit of the drawn labels, which is finite only if every split of the arms
  into two groups has a win each way (else ``h`` diverges); training reaches that, up to sampling noise.
- IPO on the same preferences: ``p (d - tau)^2 + (1 - p) (d + tau)^2 = (d - tau (2p - 1))^2 + const``
  with ``tau = 1 / (2 beta)`` and ``2p - 1 = tanh((R(y) - R(y')) / 2)``, so population IPO is least
  squares of ``g(y) - g(y')`` onto ``t(y, y') = tanh((R(y) - R(y')) / 2) / (2 beta)`` with weights
  ``w(y, y') = mu1(y) mu2(y') + mu1(y') mu2(y)``: ``g0`` solves the linear (Laplacian) system
  ``sum_y' w(y, y') (g0(y) - g0(y') - t(y, y')) = 0``. It depends on ``mu1`` and ``mu2``, and is not
  ``pi*`` even at ``a = 0``: its targets are a quarter of CoPG's for small reward gaps, and below ``tau``.
- PG, baseline 0: the expected update ascends ``Phi = sum_y m(y) (R(y) g(y) - beta g(y)^2 / 2)`` and is
  zero iff ``m(y) (R(y) - beta g(y)) / n(y) = S pi(y)`` on every arm for one number ``S``. If
  ``F = sum_y pi_ref(y) exp(n(y) u(y)) > 1`` then ``S > 0`` and Lambert's W solves each arm:
  ``h(y) = n(y) u(y) - omega(log S + c(y))`` with ``c(y) = log(pi_ref(y) n(y)^2 / (m(y) beta)) + n(y) u(y)``
  and ``omega(x) = W(exp x)`` (Wright omega), ``log S`` being the 1-D monotone root of ``sum pi = 1``;
  ``S <= 0`` would need ``g >= u`` on every arm, so ``sum pi >= F``: this is the only stationary point,
  hence the limit (``Phi`` is bounded above). If ``F <= 1`` then ``S <= 0``, where an arm's
  equation can have two roots: not derived (null). An arm with ``m(y) = 0`` would need ``pi(y) = 0``:
  no finite fixed point (null).
- PG, value baseline ``b = E_pi[R]``: the same equations with ``R - b``, and ``b`` depends on ``pi``: a
  2-D root ``(S, b)``, not a closed form nor a 1-D root; not derived (null).

Modes (``mode``), as an alignment run samples its pairs. ``offline``: one round on the ``mu1``/``mu2``
pairs, everything above. ``iterative``: ``rounds`` rounds of ``epochs`` passes over ``n_pairs`` pairs each,
round 1 on the ``mu1``/``mu2`` pairs and round ``r >= 2`` on pairs ``y, y' ~ pi_{r-1}`` (round ``r - 1``'s
trained policy), continuing its logits with a fresh Adam, the reference fixed at pi_ref (``reference:
sft``) or moved to ``pi_{r-1}`` (``previous``: mirror descent, where CoPG is REBEL's regression with
``1 / eta = beta``, divided by ``2 beta``). Round ``r``'s fixed point is the one above with
``mu1 = mu2 = pi*_{r-1}``, the previous round's fixed point, and that reference (``round_fixed_points``).
As the tilted optimum ignores the sampling, CoPG and DPO stay at ``pi_ref exp(|y|^a (R / beta + C))`` with
``sft``, and with ``previous`` reach ``pi_ref exp(|y|^a (r R / beta + C))`` after ``r`` rounds, the tilt at
``beta / r``; IPO and PG follow their sampling round by round. ``online``: every optimiser step draws
``batch_size`` fresh pairs ``y, y' ~ pi`` from the current policy, as many steps as offline, against the
SFT reference only (one moved every step would leave no KL term). CoPG and DPO keep the tilted fixed point.
PG's expected update is then zero iff ``(R - b - beta g) / |y|^a`` is the same on every arm (``m = 2 pi``
above): ``h = |y|^a R / beta + C |y|^(2a)`` for baseline 0, a 1-D root; with the value baseline the same
at equal ``|y|^a``, else a 2-D root ``(b, C)``, not derived (null). At ``a = 0`` both are the tilted
point: on-policy PG follows the exact gradient of ``J``. IPO's fit is weighted by the policy itself, a
self-consistent point, not derived (null).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.optimize import brentq
from scipy.sparse.csgraph import connected_components
from scipy.special import logsumexp, wrightomega

from directalign.errors import ConfigError
from directalign.losses import LOSSES, Optimum, PairLoss, length_normaliser, sequence_logratio

METHOD_LABELS = {
    "copg": "CoPG",
    "pg": "PG, baseline 0",
    "pg_value": "PG, value baseline",
    "ipo": "IPO (Bradley-Terry preferences)",
    "dpo": "DPO (Bradley-Terry preferences)",
}
MODES = ("offline", "iterative", "online")
REFERENCES = ("sft", "previous")
# Distributions are typed by hand in YAML or on the command line: allow thirds written 0.3333333.
PROBABILITY_SUM_TOLERANCE = 1e-6
CONFIG_KEYS = (
    "rewards",
    "lengths",
    "length_power",
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
    "mode",
    "reference",
    "rounds",
)
# Left out of an offline run's summary, so it keeps the layout it had before the modes existed.
ROUND_KEYS = ("mode", "reference", "rounds")


@dataclass(frozen=True)
class BanditConfig:
    """The ``bandit`` config section, validated on construction so bad input fails before any compute."""

    rewards: tuple[float, ...]
    lengths: tuple[int, ...] | None
    length_power: float
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
    mode: str
    reference: str
    rounds: int

    @classmethod
    def from_mapping(cls, section: Mapping) -> BanditConfig:
        """Build from the ``bandit`` section; ``seed``, when set, replaces the list ``seeds``."""
        missing = [key for key in CONFIG_KEYS if key not in section]
        unknown = [key for key in section if key not in CONFIG_KEYS]
        if missing or unknown:
            raise ConfigError(f"bandit: missing keys {missing}, unknown keys {unknown}")
        seed = section["seed"]
        seeds = section["seeds"] if seed is None else [seed]
        return cls(
            rewards=_numbers("rewards", section["rewards"]),
            lengths=None if section["lengths"] is None else _sequence("lengths", section["lengths"]),
            length_power=section["length_power"],
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
            mode=section["mode"],
            reference=section["reference"],
            rounds=section["rounds"],
        )

    def __post_init__(self) -> None:
        n_arms = len(self.rewards)
        if not self.rewards or not all(math.isfinite(r) for r in self.rewards):
            raise ConfigError(
                f"bandit.rewards must be a non-empty list of finite numbers, got {self.rewards}"
            )
        if self.lengths is not None:
            if len(self.lengths) != n_arms:
                raise ConfigError(
                    f"bandit.lengths has {len(self.lengths)} entries but bandit.rewards has {n_arms} arms"
                )
            if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.lengths):
                raise ConfigError(
                    f"bandit.lengths must be token counts, integers >= 1, got {list(self.lengths)}"
                )
        power = self.length_power
        if isinstance(power, bool) or not isinstance(power, int | float) or not 0 <= power <= 1:
            raise ConfigError(f"bandit.length_power must be a number in [0, 1], got {power!r}")
        _check_distribution("mu1", self.mu1, n_arms, strictly_positive=False)
        _check_distribution("mu2", self.mu2, n_arms, strictly_positive=False)
        if self.ref is not None:
            _check_distribution("ref", self.ref, n_arms, strictly_positive=True)
        for key in ("beta", "lr"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"bandit.{key} must be a number > 0, got {value!r}")
        for key in ("n_pairs", "batch_size", "epochs", "log_every", "rounds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"bandit.{key} must be an integer >= 1, got {value!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(
                f"bandit.seeds (or bandit.seed) must be a non-empty list of integers, got {list(self.seeds)}"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"bandit.seeds must not repeat a seed, got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in METHOD_LABELS]
        if not self.methods or unknown or len(set(self.methods)) != len(self.methods):
            raise ConfigError(
                f"bandit.methods must be distinct names among {list(METHOD_LABELS)}, got {list(self.methods)}"
            )
        for key, choices in (("mode", MODES), ("reference", REFERENCES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"bandit.{key} must be one of {list(choices)}, got {getattr(self, key)!r}")
        if self.mode != "iterative" and self.rounds != 1:
            raise ConfigError(
                f"bandit.rounds={self.rounds} needs bandit.mode=iterative: {self.mode} trains a single round"
            )
        if self.mode != "iterative" and self.reference == "previous":
            why = {
                "offline": "offline trains one round, with no previous policy",
                "online": "online would move the reference every step, which leaves no KL term",
            }[self.mode]
            raise ConfigError(f"bandit.reference=previous needs bandit.mode=iterative: {why}")

    @property
    def pi_ref(self) -> tuple[float, ...]:
        """pi_ref, with ``ref: null`` read as uniform."""
        n_arms = len(self.rewards)
        return self.ref if self.ref is not None else (1.0 / n_arms,) * n_arms

    @property
    def completion_lengths(self) -> tuple[int, ...]:
        """``|y|`` per arm, with ``lengths: null`` read as all 1 (paper B's bandit)."""
        return self.lengths if self.lengths is not None else (1,) * len(self.rewards)


def _sequence(key: str, value: object) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigError(f"bandit.{key} must be a list, got {value!r}")
    return tuple(value)


def _numbers(key: str, value: object) -> tuple[float, ...]:
    items = _sequence(key, value)
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in items):
        raise ConfigError(f"bandit.{key} must be a list of numbers, got {list(items)}")
    return tuple(float(x) for x in items)


def _check_distribution(key: str, probs: tuple[float, ...], n_arms: int, strictly_positive: bool) -> None:
    if len(probs) != n_arms:
        raise ConfigError(f"bandit.{key} has {len(probs)} entries but bandit.rewards has {n_arms} arms")
    if not all(math.isfinite(p) for p in probs) or min(probs) < 0:
        raise ConfigError(f"bandit.{key} must not have negative entries, got {list(probs)}")
    if strictly_positive and min(probs) == 0:
        raise ConfigError(f"bandit.{key} must be > 0 on every arm (its log is taken), got {list(probs)}")
    if abs(sum(probs) - 1.0) > PROBABILITY_SUM_TOLERANCE:
        raise ConfigError(f"bandit.{key} must sum to 1, got sum {sum(probs)!r} for {list(probs)}")


def completion_mask(lengths: Sequence[int]) -> torch.Tensor:
    """``[arms, max length]`` float64 mask, 1 on the ``|y|`` tokens of each arm's completion."""
    return (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).to(torch.float64)


def arm_normalisers(lengths: Sequence[int], length_power: float) -> np.ndarray:
    """``|y|^a`` per arm, as ``losses.length_normaliser`` computes it for training (in float32), so a
    fixed point is that of the very loss trained."""
    return length_normaliser(completion_mask(lengths), length_power).double().numpy()


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


def total_variation(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """``TV(p, q) = sum |p - q| / 2``: the largest gap in probability over any set of arms."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


@dataclass(frozen=True)
class FixedPoint:
    """A method's population fixed point: ``policy`` with its formula in ``note``, or ``None`` with the
    reason in ``note``."""

    policy: np.ndarray | None
    note: str


def normalised_policy(log_ref: np.ndarray, normalisers: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``pi = pi_ref exp(n (g0 + C))`` for ``g0 = shape`` and the one ``C`` with ``sum pi = 1``. The log of
    the sum rises strictly with ``C`` (every ``n > 0``), is < 0 once every ``g0 + C < 0`` and > 0 once every
    ``g0 + C > 0``: that brackets the root."""

    def log_total(shift: float) -> float:
        return logsumexp(log_ref + normalisers * (shape + shift))

    shift = brentq(log_total, -shape.max() - 1.0, -shape.min() + 1.0, xtol=1e-15)
    log_policy = log_ref + normalisers * (shape + shift)
    return np.exp(log_policy - logsumexp(log_policy))


def copg_fixed_point(
    rewards: np.ndarray, log_ref: np.ndarray, normalisers: np.ndarray, beta: float
) -> np.ndarray:
    """CoPG's fixed point, and population DPO's: ``h(y) = |y|^a (R(y) / beta + C)``."""
    return normalised_policy(log_ref, normalisers, rewards / beta)


def ipo_fixed_point(
    rewards: np.ndarray,
    log_ref: np.ndarray,
    normalisers: np.ndarray,
    beta: float,
    mu1: np.ndarray,
    mu2: np.ndarray,
) -> np.ndarray:
    """Population IPO's fixed point: ``g0`` the least-squares fit of the gaps onto
    ``tanh((R(y) - R(y')) / 2) / (2 beta)`` weighted by the pair probabilities, whose normal equations are
    a Laplacian system (singular along constants: ``lstsq`` picks one ``g0``, ``C`` absorbs the rest)."""
    weights = np.outer(mu1, mu2)
    weights = weights + weights.T
    np.fill_diagonal(weights, 0.0)
    targets = np.tanh((rewards[:, None] - rewards[None, :]) / 2) / (2 * beta)
    laplacian = np.diag(weights.sum(1)) - weights
    shape = np.linalg.lstsq(laplacian, (weights * targets).sum(1), rcond=None)[0]
    return normalised_policy(log_ref, normalisers, shape)


def pg_fixed_point(
    rewards: np.ndarray, log_ref: np.ndarray, normalisers: np.ndarray, beta: float, visits: np.ndarray
) -> np.ndarray:
    """PG's (baseline 0) stationary point when ``F = sum pi_ref exp(n R / beta) > 1`` and every arm is
    visited: ``h = n R / beta - omega(log S + c)``. ``sum pi`` falls strictly with ``log S`` (omega rises);
    as ``omega(x) <= exp(x)`` it is > 1 while every ``omega <= log(F) / 2``, and as ``omega(y + log y) = y``
    it is < 1 once ``omega >= n R / beta`` on every arm: that brackets the root."""
    scaled = normalisers * rewards / beta
    offsets = log_ref + scaled + np.log(normalisers**2 / (visits * beta))

    def log_total(log_s: float) -> float:
        return logsumexp(log_ref + scaled - wrightomega(log_s + offsets))

    rewarded = scaled > 0  # F > 1 needs one
    low = math.log(logsumexp(log_ref + scaled) / 2) - offsets.max()
    high = np.max(scaled[rewarded] + np.log(scaled[rewarded]) - offsets[rewarded]) + 1.0
    log_s = brentq(log_total, low, high, xtol=1e-15)
    log_policy = log_ref + scaled - wrightomega(log_s + offsets)
    return np.exp(log_policy - logsumexp(log_policy))


def fixed_point(config: BanditConfig, method: str) -> FixedPoint:
    """``method``'s population fixed point at the config's lengths, length power and mode (module
    docstring); for ``iterative``, that of the last round."""
    if config.mode == "iterative":
        return round_fixed_points(config, method)[-1]
    rewards = np.asarray(config.rewards)
    log_ref = np.log(config.pi_ref)
    normalisers = arm_normalisers(config.completion_lengths, config.length_power)
    if config.mode == "online":
        return online_fixed_point(method, rewards, log_ref, normalisers, config.beta)
    return population_fixed_point(
        method, rewards, log_ref, normalisers, config.beta, np.asarray(config.mu1), np.asarray(config.mu2)
    )


def round_fixed_points(config: BanditConfig, method: str) -> list[FixedPoint]:
    """Each round's fixed point in ``iterative`` mode: round 1 the offline one, round ``r`` that of pairs
    drawn from round ``r - 1``'s fixed point, against pi_ref or that point (``reference``). The list
    ends at the first round without one (null), as every later round would depend on it."""
    rewards = np.asarray(config.rewards)
    log_sft = np.log(config.pi_ref)
    normalisers = arm_normalisers(config.completion_lengths, config.length_power)
    mu1, mu2, log_ref = np.asarray(config.mu1), np.asarray(config.mu2), log_sft
    points: list[FixedPoint] = []
    for round_number in range(1, config.rounds + 1):
        point = population_fixed_point(method, rewards, log_ref, normalisers, config.beta, mu1, mu2)
        sampled = "mu1, mu2" if round_number == 1 else f"round {round_number - 1}'s fixed point"
        reference = "pi_ref" if round_number == 1 or config.reference == "sft" else sampled
        points.append(
            FixedPoint(
                point.policy,
                f"round {round_number}, pairs from {sampled}, reference {reference}: {point.note}",
            )
        )
        if point.policy is None:
            break
        mu1 = mu2 = point.policy
        if config.reference == "previous":
            log_ref = np.log(point.policy)
    return points


def online_fixed_point(
    method: str, rewards: np.ndarray, log_ref: np.ndarray, normalisers: np.ndarray, beta: float
) -> FixedPoint:
    """``online`` mode's fixed point, pairs drawn from the policy itself (module docstring)."""
    if method in LOSSES:
        if LOSSES[method].optimum is not Optimum.TILTED:
            return FixedPoint(
                None, "not derived: the pairs' weights are the policy itself, a self-consistent fit"
            )
        return FixedPoint(
            copg_fixed_point(rewards, log_ref, normalisers, beta),
            "pi = pi_ref exp(|y|^a (R / beta + C)), C the 1-D root of sum pi = 1, whatever the sampling",
        )
    if method == "pg_value" and np.ptp(normalisers) > 0:
        return FixedPoint(None, "not derived: the baseline E_pi[R] and C form a 2-D root at unequal |y|^a")
    return FixedPoint(
        normalised_policy(log_ref, normalisers**2, rewards / (beta * normalisers)),
        "pi = pi_ref exp(|y|^a R / beta + C |y|^(2a)), C the 1-D root of sum pi = 1, where on-policy PG's "
        "expected update is zero: (R - beta h / |y|^a) / |y|^a the same on every arm",
    )


def population_fixed_point(
    method: str,
    rewards: np.ndarray,
    log_ref: np.ndarray,
    normalisers: np.ndarray,
    beta: float,
    mu1: np.ndarray,
    mu2: np.ndarray,
) -> FixedPoint:
    """``method``'s fixed point on pairs ``y ~ mu1``, ``y' ~ mu2`` (module docstring)."""
    if method == "pg_value":
        return FixedPoint(
            None,
            "not derived: the baseline E_pi[R] couples the arms' stationarity equations into a 2-D root "
            "(S, b), neither a closed form nor a 1-D root",
        )
    if method == "pg":
        unvisited = np.flatnonzero(mu1 + mu2 == 0).tolist()
        if unvisited:
            return FixedPoint(
                None, f"none finite: arms {unvisited} never appear in a pair, where stationarity needs pi = 0"
            )
        if logsumexp(log_ref + normalisers * rewards / beta) <= 0:
            return FixedPoint(
                None,
                "not derived: sum pi_ref exp(|y|^a R / beta) <= 1 puts it at S <= 0, where an arm's "
                "stationarity equation can have two roots",
            )
        return FixedPoint(
            pg_fixed_point(rewards, log_ref, normalisers, beta, mu1 + mu2),
            "h = |y|^a R / beta - omega(log S + log(pi_ref |y|^(2a) / ((mu1 + mu2) beta)) + |y|^a R / beta), "
            "omega the Wright omega function, log S the 1-D root of sum pi = 1",
        )
    joined = np.outer(mu1 > 0, mu2 > 0)
    np.fill_diagonal(joined, False)
    groups = connected_components(joined, directed=False)[0]
    if groups > 1:
        return FixedPoint(
            None, f"not unique: the pairs join the arms into {groups} separate groups, each with its own C"
        )
    loss = LOSSES[method]
    if loss.optimum is None:
        return FixedPoint(None, "not derived for this loss")
    if loss.optimum is Optimum.PREFERENCE_REGRESSION:
        return FixedPoint(
            ipo_fixed_point(rewards, log_ref, normalisers, beta, mu1, mu2),
            "pi = pi_ref exp(|y|^a (g0 + C)), g0 the least-squares fit of g(y) - g(y') onto "
            "tanh((R(y) - R(y')) / 2) / (2 beta) weighted by mu1(y) mu2(y'), C the 1-D root of sum pi = 1",
        )
    population = (
        "" if loss.needs_rewards else " (population; on a finite sample, the Bradley-Terry fit of its labels)"
    )
    return FixedPoint(
        copg_fixed_point(rewards, log_ref, normalisers, beta),
        f"pi = pi_ref exp(|y|^a (R / beta + C)), C the 1-D root of sum pi = 1{population}",
    )


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


def sample_pairs(
    rewards: torch.Tensor, mu1: torch.Tensor, mu2: torch.Tensor, n_pairs: int, generator: torch.Generator
) -> PairData:
    """One seed's ``n_pairs`` pairs ``y ~ mu1``, ``y' ~ mu2`` and the Bradley-Terry winner of each,
    ``P(y > y') = sigmoid(R(y) - R(y'))``, as a labeller with that reward would rank them."""
    first = torch.multinomial(mu1, n_pairs, replacement=True, generator=generator)
    second = torch.multinomial(mu2, n_pairs, replacement=True, generator=generator)
    first_wins = torch.rand(n_pairs, generator=generator, dtype=torch.float64) < torch.sigmoid(
        rewards[first] - rewards[second]
    )
    return PairData(
        first=first,
        second=second,
        chosen=torch.where(first_wins, first, second),
        rejected=torch.where(first_wins, second, first),
    )


@dataclass(frozen=True)
class ArmTensors:
    """What the losses read of the arms: rewards, the reference's log-probs (``[arms]``, or ``[seeds, arms]``
    for a reference of its own per seed), and each arm's completion mask and the length power that
    normalise its log-ratio."""

    rewards: torch.Tensor
    log_ref: torch.Tensor
    completion_mask: torch.Tensor
    length_power: float

    @classmethod
    def from_config(cls, config: BanditConfig) -> ArmTensors:
        return cls(
            rewards=torch.tensor(config.rewards, dtype=torch.float64),
            log_ref=torch.tensor(config.pi_ref, dtype=torch.float64).log(),
            completion_mask=completion_mask(config.completion_lengths),
            length_power=config.length_power,
        )

    def logratio(
        self, logits: torch.Tensor, arms: torch.Tensor, loss: PairLoss | None = None
    ) -> torch.Tensor:
        """``g(y) = h(y) / |y|^a`` for ``arms`` (``[seeds, batch]``), computed by the LLM code path:
        ``sequence_logratio`` (or a registry ``loss``'s own ``sequence_terms``) over each arm's ``|y|``
        completion tokens, the first carrying the arm's log-probability and the others 0, so the mask
        alone sets ``|y|``."""
        policy_logps = torch.log_softmax(logits, dim=-1).gather(1, arms).reshape(-1, 1)
        ref_logps = self.log_ref.expand_as(logits).gather(1, arms).reshape(-1, 1)
        mask = self.completion_mask[arms.reshape(-1)]
        padding = (0, mask.shape[1] - 1)
        terms = sequence_logratio if loss is None else loss.sequence_terms
        padded = (F.pad(policy_logps, padding), F.pad(ref_logps, padding))
        return terms(*padded, mask, self.length_power).view_as(arms)


def policy_gradient_loss(
    logratio_a: torch.Tensor,
    logratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    beta: float,
    baseline: torch.Tensor,
) -> torch.Tensor:
    """Off-policy PG surrogate of paper B's baselines, per pair, to minimise. Its gradient is
    ``-[(R_beta(y) - b) grad g(y) + (R_beta(y') - b) grad g(y')]`` with ``R_beta = R - beta*g``: the
    coefficients are detached (a REINFORCE weight, not a target), and ``grad g = grad log pi / |y|^a``
    since pi_ref is frozen (``g = h`` at ``a = 0``). Without importance weights this is biased
    off-policy, which is the point."""
    weight_a = (reward_a - beta * logratio_a - baseline).detach()
    weight_b = (reward_b - beta * logratio_b - baseline).detach()
    return -(weight_a * logratio_a + weight_b * logratio_b)


def pair_loss(
    method: str, logits: torch.Tensor, arms: ArmTensors, beta: float, batch: PairData
) -> torch.Tensor:
    """Per-pair loss ``[seeds, batch]`` of ``method``, a loss of the registry or a PG baseline: a ranked
    loss (DPO, IPO) sees only the Bradley-Terry ranking of a pair, the others see both rewards."""
    loss = LOSSES.get(method)
    ranked = loss is not None and not loss.needs_rewards
    first, second = (batch.chosen, batch.rejected) if ranked else (batch.first, batch.second)
    g_a, g_b = arms.logratio(logits, first, loss), arms.logratio(logits, second, loss)
    reward_a, reward_b = arms.rewards[first], arms.rewards[second]
    if loss is not None:
        return loss({"beta": beta}, g_a, g_b, reward_a, reward_b)
    if method == "pg_value":  # the exact value E_{y~pi}[R(y)] of each seed's current policy
        baseline = (torch.softmax(logits, dim=-1) * arms.rewards).sum(-1, keepdim=True)
    else:
        baseline = torch.zeros((), dtype=logits.dtype)
    return policy_gradient_loss(g_a, g_b, reward_a, reward_b, beta, baseline)


@dataclass(frozen=True)
class TrainResult:
    """One method over all seeds: final policies ``[seeds, arms]`` and their J ``[seeds]``, regrets
    ``[seeds, len(steps)]``, and the policy at the end of each round ``[rounds, seeds, arms]``."""

    policies: np.ndarray
    objectives: np.ndarray
    steps: list[int]
    regrets: np.ndarray
    round_policies: np.ndarray


def seed_streams(seed: int) -> tuple[torch.Generator, torch.Generator, torch.Generator]:
    """Independent generators for a seed's dataset, for its shuffles and for the pairs it draws from its
    own policy (iterative rounds after the first, online steps), so every method of a seed sees the same
    pairs in the same order and changing one draw never shifts another. ``spawn`` keys each child by its
    index alone, so the first two are those of the code before the third existed."""
    data_seed, shuffle_seed, policy_seed = (
        int(child.generate_state(1)[0]) for child in np.random.SeedSequence(seed).spawn(3)
    )
    return tuple(torch.Generator().manual_seed(s) for s in (data_seed, shuffle_seed, policy_seed))


def sample_datasets(config: BanditConfig) -> PairData:
    """Every seed's ``mu1``/``mu2`` dataset, stacked into ``[seeds, n_pairs]`` tensors."""
    rewards, mu1, mu2 = (
        torch.tensor(v, dtype=torch.float64) for v in (config.rewards, config.mu1, config.mu2)
    )
    per_seed = [
        sample_pairs(rewards, mu1, mu2, config.n_pairs, seed_streams(seed)[0]) for seed in config.seeds
    ]
    return stack_seeds(per_seed)


def stack_seeds(per_seed: Sequence[PairData]) -> PairData:
    """Seeds' pairs as one ``PairData`` of ``[seeds, n]`` tensors."""
    return PairData(*(torch.stack(column) for column in zip(*(d.tensors() for d in per_seed), strict=True)))


def policy_pairs(
    rewards: torch.Tensor, logits: torch.Tensor, n_pairs: int, generators: Sequence[torch.Generator]
) -> PairData:
    """``n_pairs`` pairs ``y, y' ~ pi`` per seed, each from its own row of ``logits`` and generator."""
    policies = torch.softmax(logits.detach(), dim=-1)
    return stack_seeds(
        [sample_pairs(rewards, pi, pi, n_pairs, g) for pi, g in zip(policies, generators, strict=True)]
    )


def steps_per_round(config: BanditConfig) -> int:
    """Optimiser steps of one round, ``epochs`` passes over ``n_pairs`` pairs (online: as many)."""
    return config.epochs * math.ceil(config.n_pairs / config.batch_size)


def shuffled_batches(
    config: BanditConfig, data: PairData, shufflers: Sequence[torch.Generator]
) -> Iterator[PairData]:
    """``epochs`` passes over ``data`` in ``batch_size`` batches, reshuffled every pass per seed."""
    for _ in range(config.epochs):
        order = torch.stack([torch.randperm(config.n_pairs, generator=g) for g in shufflers])
        for index in order.split(config.batch_size, dim=1):
            yield data.take(index)


def online_batches(
    config: BanditConfig, logits: torch.Tensor, rewards: torch.Tensor, samplers: Sequence[torch.Generator]
) -> Iterator[PairData]:
    """A fresh batch from the current policy per step: drawn lazily, after the previous step's update."""
    for _ in range(steps_per_round(config)):
        yield policy_pairs(rewards, logits, config.batch_size, samplers)


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
    """Adam on the logits (started at pi_ref), all seeds at once, in the config's mode: ``rounds`` rounds
    of ``epochs`` shuffled passes, round 1 over ``data`` (offline: the only one), or online one fresh batch
    per step; recording the regret ``J(pi*) - J(pi)`` every ``log_every`` steps and at the end."""
    arms = ArmTensors.from_config(config)
    rewards, log_ref = arms.rewards, arms.log_ref
    _, shufflers, samplers = zip(*(seed_streams(seed) for seed in config.seeds), strict=True)
    logits = log_ref.repeat(len(config.seeds), 1).requires_grad_()

    def current_regret() -> np.ndarray:
        with torch.no_grad():
            return regret(torch.log_softmax(logits, -1), rewards, log_ref, config.beta).numpy()

    steps, regrets, round_policies = [0], [current_regret()], []
    total_steps = config.rounds * steps_per_round(config)
    step = 0
    for round_number in range(1, config.rounds + 1):
        if config.mode == "online":
            batches = online_batches(config, logits, rewards, samplers)
        else:
            if round_number > 1:
                data = policy_pairs(rewards, logits, config.n_pairs, samplers)
                if config.reference == "previous":
                    arms = replace(arms, log_ref=torch.log_softmax(logits.detach(), -1))
            batches = shuffled_batches(config, data, shufflers)
        optimiser = torch.optim.Adam([logits], lr=config.lr)
        for batch in batches:
            loss = pair_loss(method, logits, arms, config.beta, batch).mean(-1).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            step += 1
            if step % config.log_every == 0 or step == total_steps:
                steps.append(step)
                regrets.append(current_regret())
        round_policies.append(torch.log_softmax(logits.detach(), -1).exp().numpy())
    log_policies = torch.log_softmax(logits.detach(), -1)
    return TrainResult(
        policies=log_policies.exp().numpy(),
        objectives=objective(log_policies, rewards, log_ref, config.beta).numpy(),
        steps=steps,
        regrets=np.stack(regrets, axis=1),
        round_policies=np.stack(round_policies),
    )


def _spread(values: np.ndarray) -> np.ndarray:
    """Sample standard deviation over seeds (axis 0); 0 for a single seed."""
    return values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros_like(values[0])


def round_entries(config: BanditConfig, method: str, round_policies: np.ndarray) -> list[dict]:
    """Per round of an ``iterative`` run, the seed-mean policy beside that round's fixed point and their
    total variation (null after the first round without a fixed point)."""
    targets = [point.policy for point in round_fixed_points(config, method)]
    targets += [None] * (len(round_policies) - len(targets))
    entries = []
    for round_number, (policies, target) in enumerate(zip(round_policies, targets, strict=True), start=1):
        policy = policies.mean(axis=0)
        entries.append(
            {
                "round": round_number,
                "policy": policy.tolist(),
                "fixed_point": None if target is None else target.tolist(),
                "fixed_point_tv": None if target is None else total_variation(policy, target),
            }
        )
    return entries


def run(config: BanditConfig) -> dict:
    """Train every method on the same per-seed datasets; return the JSON-ready summary: pi*, J(pi*)
    and per method the seed-mean final policy beside the method's fixed point (or null and why) and
    their total variation, J and regret, their spread, per-seed values and curves; for an ``iterative``
    run also each round's policy and fixed point."""
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    log_ref = torch.tensor(config.pi_ref, dtype=torch.float64).log()
    data = sample_datasets(config)
    methods = {}
    for method in config.methods:
        result = train(config, method, data)
        final = result.regrets[:, -1]
        policy = result.policies.mean(axis=0)
        point = fixed_point(config, method)
        methods[method] = {
            "label": METHOD_LABELS[method],
            "policy": policy.tolist(),
            "fixed_point": None if point.policy is None else point.policy.tolist(),
            "fixed_point_note": point.note,
            "fixed_point_tv": None if point.policy is None else total_variation(policy, point.policy),
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
        if config.mode == "iterative":
            methods[method]["rounds"] = round_entries(config, method, result.round_policies)
    settings = asdict(config)
    if config.mode == "offline":
        settings = {key: value for key, value in settings.items() if key not in ROUND_KEYS}
    return {
        "config": settings,
        "pi_star": log_optimal_policy(rewards, log_ref, config.beta).exp().tolist(),
        "J_star": float(optimal_value(rewards, log_ref, config.beta)),
        "methods": methods,
    }


def mode_description(config: Mapping) -> str:
    """How the run sampled its pairs, for the table and figure; empty offline (the summary's config then
    has no ``mode``), so an offline run's table and figure are those from before the modes existed."""
    if "mode" not in config:
        return ""
    if config["mode"] == "online":
        return "online, pairs from the current policy every step"
    reference = "pi_ref" if config["reference"] == "sft" else "the previous round's policy"
    return f"iterative, {config['rounds']} rounds, reference {reference}"


def tv_cell(row: Mapping) -> str:
    """A summary row's distance to its fixed point as a table cell ("none derived" without one)."""
    return "none derived" if row["fixed_point_tv"] is None else f"{row['fixed_point_tv']:.2g}"


def summary_table(summary: dict) -> str:
    """Markdown table of the final policy, J, regret and distance to the fixed point of each method: seed
    means, and the regret's sample std over seeds; for an iterative run, each round's distance too."""
    config = summary["config"]
    seeds = config["seeds"]
    arms = len(summary["pi_star"])
    lengths = config["lengths"] or [1] * arms
    mode = mode_description(config)
    lines = [
        f"Toy bandit (paper B, Figure 1, with lengths): R = {config['rewards']}, |y| = {lengths}, "
        f"length power a = {config['length_power']}, beta = {config['beta']}, "
        f"{config['n_pairs']} pairs, Adam lr {config['lr']}, batch {config['batch_size']}, "
        f"{config['epochs']} epochs; {len(seeds)} seed(s) {seeds}. J(pi*) = {summary['J_star']:.4f}."
        + (f" Mode {mode}." if mode else ""),
        "",
        "| method | "
        + " | ".join(f"pi(arm {i})" for i in range(arms))
        + " | J(pi) | final regret (mean ± std) | TV to its fixed point |",
        "|---|" + "---:|" * (arms + 3),
        "| pi* | "
        + " | ".join(f"{p:.4f}" for p in summary["pi_star"])
        + f" | {summary['J_star']:.4f} | 0 | |",
    ]
    for entry in summary["methods"].values():
        policy = " | ".join(f"{p:.4f}" for p in entry["policy"])
        regret = f"{entry['regret']:.4g} ± {entry['regret_std']:.2g}"
        lines.append(f"| {entry['label']} | {policy} | {entry['J']:.4f} | {regret} | {tv_cell(entry)} |")
    if config.get("mode") == "iterative":
        rounds = range(1, config["rounds"] + 1)
        lines += [
            "",
            "TV of each round's policy to that round's fixed point:",
            "",
            "| method | " + " | ".join(f"round {r}" for r in rounds) + " |",
            "|---|" + "---:|" * len(rounds),
        ]
        for entry in summary["methods"].values():
            lines.append(
                f"| {entry['label']} | " + " | ".join(tv_cell(row) for row in entry["rounds"]) + " |"
            )
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
    mode = mode_description(config)
    axes.set_title(
        f"Toy bandit, beta = {config['beta']}, lr {config['lr']}, {config['epochs']} epochs, "
        f"{len(config['seeds'])} seed(s)" + (f"\n{mode}" if mode else "")
    )
    axes.legend()
    return figure
