"""The preference pairs the reward model learns from.

Tasks with human pairs (tldr) use them. Offline tasks simulate the human labeller: two SFT samples per
prompt, labelled by sampling Bradley-Terry on the labeller's scores divided by a label temperature. The
labeller's score is the gold judge's, plus the task's ``label_length_bias`` per word of the completion
(0 unless configured): a verbosity preference that only the labels (and the generate stage's oracle
rewards) see, never the gold reported in evaluation.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from directalign.artifacts import PolicyArtifact
from directalign.distributed import map_sharded, rank_seed
from directalign.errors import ConfigError, DataError
from directalign.generation import sample_completions
from directalign.sampling import Sampling
from directalign.scoring import finite_mask
from directalign.tasks.base import PREFERENCE_COLUMNS, words
from directalign.validation import require_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preferences:
    """Pairs of completions of a source, chosen first; ``gold_margin`` (the unbiased gold judge's, chosen
    minus rejected) where a gold judge labelled them."""

    sources: list[str]
    chosen: list[str]
    rejected: list[str]
    dropped: dict[str, int]
    gold_margin: list[float] | None = None
    counts: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sources)


def human_preferences(ctx) -> Preferences | None:
    """The task's human pairs; pairs with an empty text, or the same text twice, are dropped and counted."""
    pairs = ctx.task.human_preferences()
    if pairs is None:
        return None
    require_columns(f"task {ctx.cfg.task.name!r}, preference pairs", pairs.column_names, PREFERENCE_COLUMNS)
    limit = ctx.cfg.stage.reward.max_prompts
    if limit is not None:
        pairs = pairs.select(range(min(limit, len(pairs))))
    rows = zip(pairs["source"], pairs["chosen"], pairs["rejected"], strict=True)
    keep = [
        (source, chosen, rejected)
        for source, chosen, rejected in rows
        if all(isinstance(t, str) and t.strip() for t in (source, chosen, rejected)) and chosen != rejected
    ]
    dropped = {"empty_or_identical": len(pairs) - len(keep)}
    log.info("human preference pairs: kept %d of %d, dropped %s", len(keep), len(pairs), dropped)
    return Preferences([s for s, _, _ in keep], [c for _, c, _ in keep], [r for _, _, r in keep], dropped)


def labeller_scores(gold: np.ndarray, completions: Sequence[str], length_bias: float) -> np.ndarray:
    """What the simulated labeller ranks by: ``gold + length_bias * words(completion)``. A bias of 0
    changes no label."""
    return gold + length_bias * np.asarray([len(words(text)) for text in completions], dtype=np.float64)


def bradley_terry_labels(
    first: np.ndarray, second: np.ndarray, temperature: float, rng: np.random.Generator
) -> np.ndarray:
    """Whether each first completion wins: drawn with probability sigmoid((first - second) / temperature)."""
    prob_first = 1.0 / (1.0 + np.exp(-(first - second) / temperature))
    return rng.random(len(first)) < prob_first


def simulated_preferences(ctx, sft: PolicyArtifact, seed: int) -> Preferences:
    """Pairs of SFT samples labelled by a noisy Bradley-Terry labeller on the gold judge (length-biased
    where the task says so)."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.reward
    gold = ctx.task.gold_judge()
    if gold is None:
        raise ConfigError(f"task {cfg.task.name!r} has neither human preferences nor a gold judge")
    prompts = ctx.prompts("preference", stage_cfg.max_prompts, sft.context_length)
    policy, sampling = sft.load(ctx.device), Sampling.of(cfg, "reward")
    samples = map_sharded(
        prompts.ids,
        lambda shard: sample_completions(
            policy,
            ctx.tokenizer,
            shard,
            seed=rank_seed(seed),
            desc="preference samples",
            **sampling.options(),
        ),
    )
    texts = [ctx.decode(pair) for pair in samples]
    keep = [i for i, (a, b) in enumerate(texts) if a and b and a != b]
    if not keep:
        raise DataError(f"reward stage: all {len(texts)} pairs of preference samples are empty or identical")
    first, second = [texts[i][0] for i in keep], [texts[i][1] for i in keep]
    sources = [prompts.sources[i] for i in keep]
    references = [prompts.references[i] for i in keep]
    gold_first = gold.score(sources, references, first)
    gold_second = gold.score(sources, references, second)
    # A judge that returns NaN or inf cannot label a pair: such pairs are dropped and counted.
    finite = np.flatnonzero(finite_mask(gold_first, gold_second))
    sources = [sources[i] for i in finite]
    first, second = [first[i] for i in finite], [second[i] for i in finite]
    gold_first, gold_second = gold_first[finite], gold_second[finite]
    dropped = {"empty_or_identical": len(texts) - len(keep), "nonfinite_gold": len(keep) - len(finite)}
    log.info("preference pairs: kept %d of %d, dropped %s", len(finite), len(texts), dropped)
    bias = ctx.task.label_length_bias()
    label_first = labeller_scores(gold_first, first, bias)
    label_second = labeller_scores(gold_second, second, bias)
    first_wins = bradley_terry_labels(
        label_first, label_second, stage_cfg.label_temperature, np.random.default_rng(seed)
    )
    # Pairs the length bias turned against the gold judge's order: what the bias did to the labeller.
    reversed_by_bias = int(
        np.sum(np.sign(label_first - label_second) * np.sign(gold_first - gold_second) < 0)
    )
    return Preferences(
        sources,
        [a if w else b for a, b, w in zip(first, second, first_wins, strict=True)],
        [b if w else a for a, b, w in zip(first, second, first_wins, strict=True)],
        dropped,
        np.where(first_wins, gold_first - gold_second, gold_second - gold_first).tolist(),
        {"n_truncated_sources": prompts.n_truncated, "n_pairs_reversed_by_length_bias": reversed_by_bias},
    )
