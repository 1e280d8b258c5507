"""Best-of-n over reference samples: the classic frontier of reward against KL that aligned policies are
judged against.

Best-of-n needs no training: draw n samples from the base (SFT) policy, keep the one the proxy reward
model scores highest. Its KL to the base policy has a closed form, so each n is one point (KL, gold
reward) a trained policy should beat at the same KL; picking by the proxy and reading the gold score
shows over-optimisation of the proxy.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from directalign.errors import ConfigError, DataError

CONFIG_KEY = "stage.evaluate.best_of_n"


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base) = log n - (n - 1) / n in nats.

    Exact when the base policy's scores are continuous (no score has positive probability, so the n
    draws' scores are distinct); for a base policy with atoms it is an upper bound.
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ConfigError(f"{CONFIG_KEY}: n={n!r} must be an integer >= 1")
    return float(math.log(n) - (n - 1) / n)


@dataclass(frozen=True)
class BestOfN:
    """Best-of-n for one n: the sample picked per prompt (``index``, shape [prompts]) and each metric's
    value at the pick (``picked[name]``, shape [prompts])."""

    n: int
    kl: float
    index: np.ndarray
    picked: dict[str, np.ndarray]


def best_of_n(
    proxy_scores: np.ndarray, metrics: Mapping[str, np.ndarray], sizes: Sequence[int]
) -> list[BestOfN]:
    """For each n in ``sizes``, pick per prompt the sample with the highest proxy score among the first n
    samples (the first on ties), and read every metric there.

    ``proxy_scores`` and every array of ``metrics`` (gold reward, length, the proxy itself...) have shape
    [prompts, samples], the samples drawn independently from the base policy, so the first n of them are
    n draws.
    """
    proxy_scores = np.asarray(proxy_scores)
    if proxy_scores.ndim != 2 or proxy_scores.shape[0] == 0:
        raise DataError(
            f"{CONFIG_KEY}: proxy scores must have shape [prompts, samples], got {proxy_scores.shape}"
        )
    not_finite = np.argwhere(~np.isfinite(proxy_scores))
    if not_finite.size:
        prompt, sample = not_finite[0]
        raise DataError(
            f"{CONFIG_KEY}: proxy score of prompt {prompt}, sample {sample} is {proxy_scores[prompt, sample]}"
        )
    metrics = {name: np.asarray(values) for name, values in metrics.items()}
    for name, values in metrics.items():
        if values.shape != proxy_scores.shape:
            raise DataError(
                f"{CONFIG_KEY}: metric {name!r} has shape {values.shape}, "
                f"the proxy scores {proxy_scores.shape}"
            )
    available = proxy_scores.shape[1]
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= available:
            raise ConfigError(
                f"{CONFIG_KEY}={list(sizes)}: n={n!r} must be an integer in [1, {available}], "
                "the samples per prompt"
            )
    picks = []
    for n in sizes:
        index = np.argmax(proxy_scores[:, :n], axis=1)
        picked = {
            name: np.take_along_axis(values, index[:, None], axis=1)[:, 0] for name, values in metrics.items()
        }
        picks.append(BestOfN(n=int(n), kl=best_of_n_kl(n), index=index, picked=picked))
    return picks
