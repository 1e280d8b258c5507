"""The preference pairs the reward model learns from.

Tasks with human pairs (tldr) use them. Offline tasks simulate the human labeller: two SFT samples per
prompt, labelled by sampling Bradley-Terry on the gold judge's scores divided by a label temperature.
"""

import logging
from dataclasses import dataclass, field

import numpy as np

from directalign.artifacts import PolicyArtifact
from directalign.distributed import map_sharded, rank_seed
from directalign.errors import ConfigError, DataError
from directalign.generation import sample_completions
from directalign.tasks.base import PREFERENCE_COLUMNS
from directalign.validation import finite_mask, require_columns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preferences:
    """Pairs of completions of a source, chosen first; ``gold_margin`` where a gold judge labelled them."""

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
    limit = ctx.cfg.stage.reward.max_pairs
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


def simulated_preferences(ctx, sft: PolicyArtifact, seed: int) -> Preferences:
    """Pairs of SFT samples labelled by a noisy Bradley-Terry labeller on the gold judge."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.reward
    gold = ctx.task.gold_judge()
    if gold is None:
        raise ConfigError(f"task {cfg.task.name!r} has neither human preferences nor a gold judge")
    prompts = ctx.prompts("preference", stage_cfg.max_pairs, sft.context_length)
    policy = sft.load(ctx.device)
    samples = map_sharded(
        prompts.ids,
        lambda shard: sample_completions(
            policy,
            ctx.tokenizer,
            shard,
            num_samples=2,
            max_new_tokens=cfg.task.max_completion_tokens,
            batch_size=stage_cfg.sampling.batch_size,
            do_sample=True,
            temperature=stage_cfg.sampling.temperature,
            top_p=stage_cfg.sampling.top_p,
            seed=rank_seed(seed),
            desc="preference samples",
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
    rng = np.random.default_rng(seed)
    prob_first = 1.0 / (1.0 + np.exp(-(gold_first - gold_second) / stage_cfg.label_temperature))
    first_wins = rng.random(len(finite)) < prob_first
    return Preferences(
        sources,
        [a if w else b for a, b, w in zip(first, second, first_wins, strict=True)],
        [b if w else a for a, b, w in zip(first, second, first_wins, strict=True)],
        dropped,
        np.where(first_wins, gold_first - gold_second, gold_second - gold_first).tolist(),
        {"n_truncated_sources": prompts.n_truncated},
    )
