"""Means and standard errors of evaluation metrics, over prompts (and training seeds).

A policy answers each held-out prompt with several temperature-1 samples; samples of one prompt are not
independent draws of the population of prompts, so every standard error is taken over per-prompt means.
Two policies answer the same prompts (with the same random numbers), so a difference is taken per prompt
first: pairing removes the prompts' own spread. A method trained with several seeds is one estimate: its
per-prompt values are averaged over seeds, and the spread between seeds is added to the standard error
(``se**2 = se_prompts**2 + var_seeds / n_seeds``, conservative: the between-seed variance also holds the
sampling noise it repeats).
"""

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Samples = list[dict[str, Any]]


def per_prompt_means(samples: Samples, key: str) -> dict[str, float]:
    """The mean of ``key`` over each prompt's samples, by prompt id."""
    values: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        values[sample["id"]].append(sample[key])
    return {prompt: float(np.mean(v)) for prompt, v in values.items()}


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of independent values (NaN below two values)."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return (float(values.mean()) if values.size else math.nan), math.nan
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def prompt_mean_and_se(samples: Samples, key: str) -> tuple[float, float]:
    """A metric's mean over samples and its standard error over prompts."""
    return mean_and_se(list(per_prompt_means(samples, key).values()))


@dataclass(frozen=True)
class PairedDifference:
    """``policy - baseline``: per-prompt differences (seeds averaged), their mean and its standard error."""

    differences: list[float]
    mean: float
    se: float

    @property
    def n(self) -> int:
        return len(self.differences)


def paired_difference(policy: Sequence[Samples], baseline: Sequence[Samples], key: str) -> PairedDifference:
    """``policy - baseline`` on ``key``, each side given as one sample list per training seed; prompts
    that either side lacks are left out."""
    policy_means = [per_prompt_means(samples, key) for samples in policy]
    baseline_means = [per_prompt_means(samples, key) for samples in baseline]
    prompts = sorted(set.intersection(*(set(means) for means in policy_means + baseline_means)))

    def seed_average(side: list[dict[str, float]]) -> np.ndarray:
        return np.asarray([np.mean([means[p] for means in side]) for p in prompts])

    differences = seed_average(policy_means) - seed_average(baseline_means)
    mean, se = mean_and_se(differences)
    for side in (policy_means, baseline_means):
        if len(side) > 1 and prompts:
            seed_levels = [np.mean([means[p] for p in prompts]) for means in side]
            se = math.sqrt(se**2 + float(np.var(seed_levels, ddof=1)) / len(side))
    return PairedDifference(differences.tolist(), mean, se)


def sample_metrics(records: list[dict[str, Any]], has_gold: bool) -> dict[str, Any]:
    """Means over samples with standard errors over prompts."""
    metrics: dict[str, Any] = {}
    for key, name in (
        ("proxy_reward", "proxy"),
        ("gold_reward", "gold"),
        ("length_tokens", "length"),
        ("logratio", "kl"),
    ):
        mean, se = prompt_mean_and_se(records, key) if key != "gold_reward" or has_gold else (None, None)
        metrics[{"logratio": "kl_to_ref"}.get(key, key)] = mean
        metrics[f"{name}_se"] = se
    metrics["eos_rate"] = float(np.mean([r["ended"] for r in records]))
    metrics["n_prompts"] = len({r["id"] for r in records})
    return metrics
