"""Stage 2: a Bradley-Terry reward model on preference pairs.

Tasks with human pairs (tldr) use them. Offline tasks simulate the human labeller: two SFT
samples per prompt, labelled by sampling Bradley-Terry on the gold judge's scores.
"""

import logging
from typing import Any

import numpy as np
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from directalign.distributed import map_sharded, rank_seed
from directalign.generation import sample_completions
from directalign.lit.reward import RewardModule
from directalign.models import build_reward_model
from directalign.scoring import encode_pairs, reward_scores
from directalign.stages.context import StageContext, plain
from directalign.stages.sft import POLICY_DIR
from directalign.store import Artifact
from directalign.tasks.base import PREFERENCE_COLUMNS
from directalign.training import build_trainer, finish_wandb, resume_checkpoint, trained_model
from directalign.validation import DataError, check_prompt_lengths, finite_mask, require_columns

log = logging.getLogger(__name__)

REWARD_DIR = "model"


def simulated_preferences(ctx: StageContext, sft: Artifact, seed: int) -> dict[str, Any]:
    """Pairs of SFT samples labelled by a noisy Bradley-Terry labeller on the gold judge."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.reward
    gold = ctx.task.gold_judge()
    if gold is None:
        raise ValueError(f"task {cfg.task.name!r} has neither human preferences nor a gold judge")
    prompt_ids, examples, n_truncated = ctx.prompts("preference", stage_cfg.max_pairs)
    policy = AutoModelForCausalLM.from_pretrained(sft.path / POLICY_DIR).to(ctx.device)
    check_prompt_lengths(
        f"task {cfg.task.name!r}, split 'preference'",
        prompt_ids,
        examples["id"],
        cfg.task.max_completion_tokens,
        getattr(policy.config, "max_position_embeddings", None),
    )
    samples = map_sharded(
        prompt_ids,
        lambda prompts: sample_completions(
            policy,
            ctx.tokenizer,
            prompts,
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
    texts = [[ctx.tokenizer.decode(c, skip_special_tokens=True).strip() for c in pair] for pair in samples]
    keep = [i for i, (a, b) in enumerate(texts) if a and b and a != b]
    if not keep:
        raise DataError(f"reward stage: all {len(texts)} pairs of preference samples are empty or identical")
    first = [texts[i][0] for i in keep]
    second = [texts[i][1] for i in keep]
    sources = [examples["source"][i] for i in keep]
    references = [examples["reference"][i] for i in keep]
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
    return {
        "source": sources,
        "chosen": [a if w else b for a, b, w in zip(first, second, first_wins, strict=True)],
        "rejected": [b if w else a for a, b, w in zip(first, second, first_wins, strict=True)],
        "gold_margin": np.where(first_wins, gold_first - gold_second, gold_second - gold_first).tolist(),
        "dropped": dropped,
        "n_truncated_sources": n_truncated,
    }


def human_preferences(ctx: StageContext) -> dict[str, Any] | None:
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
    return {
        "source": [s for s, _, _ in keep],
        "chosen": [c for _, c, _ in keep],
        "rejected": [r for _, _, r in keep],
        "dropped": dropped,
    }


def _loader(tokenizer, rows: list[tuple[str, str, str]], batch_size: int, max_length: int, shuffle: bool):
    def collate(batch):
        sources = [s for s, _, _ in batch]
        chosen = encode_pairs(tokenizer, sources, [c for _, c, _ in batch], max_length)
        rejected = encode_pairs(tokenizer, sources, [r for _, _, r in batch], max_length)
        return {f"chosen_{k}": v for k, v in chosen.items()} | {
            f"rejected_{k}": v for k, v in rejected.items()
        }

    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def run(ctx: StageContext, sft: Artifact) -> Artifact:
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.reward
    config = {
        "task": ctx.task_key,
        "reward_model": plain(cfg.reward_model),
        "reward": plain(stage_cfg),
        "seed": cfg.seed,
    }

    def compute(folder):
        seed = ctx.seed(1)
        pairs = human_preferences(ctx) or simulated_preferences(ctx, sft, seed)
        rows = list(zip(pairs["source"], pairs["chosen"], pairs["rejected"], strict=True))
        if len(rows) < 4:
            raise DataError(
                f"reward stage: only {len(rows)} usable preference pairs (dropped {pairs['dropped']});"
                " need at least 4"
            )
        order = np.random.default_rng(seed).permutation(len(rows))
        n_val = max(1, int(len(rows) * stage_cfg.validation_fraction))
        val_rows = [rows[i] for i in order[:n_val]]
        train_rows = [rows[i] for i in order[n_val:]]
        model, tokenizer = build_reward_model(cfg.reward_model, sft.path / POLICY_DIR, seed)
        trainer = build_trainer(
            cfg, stage_cfg, folder, "reward", {"stage": "reward", "reward_model": cfg.reward_model.name}
        )
        trainer.fit(
            RewardModule(model, stage_cfg),
            train_dataloaders=_loader(
                tokenizer, train_rows, stage_cfg.batch_size, stage_cfg.max_length, True
            ),
            val_dataloaders=_loader(tokenizer, val_rows, stage_cfg.batch_size, stage_cfg.max_length, False),
            ckpt_path=resume_checkpoint(folder),
        )
        finish_wandb(trainer)
        model = trained_model(
            trainer, model, lambda: build_reward_model(cfg.reward_model, sft.path / POLICY_DIR, seed)[0]
        )
        if not trainer.is_global_zero:
            return {}  # rank 0 scores the held-out pairs and saves the model
        model.cpu()
        sources = [s for s, _, _ in val_rows]
        chosen = reward_scores(model, tokenizer, sources, [c for _, c, _ in val_rows], stage_cfg.max_length)
        rejected = reward_scores(model, tokenizer, sources, [r for _, _, r in val_rows], stage_cfg.max_length)
        metrics = {
            "n_train_pairs": len(train_rows),
            "n_val_pairs": len(val_rows),
            "n_dropped_pairs": sum(pairs["dropped"].values()),
            **{f"n_dropped_{reason}": n for reason, n in pairs["dropped"].items()},
            "val_accuracy": float(np.mean(chosen > rejected)),
        }
        if "n_truncated_sources" in pairs:
            metrics["n_truncated_sources"] = pairs["n_truncated_sources"]
        if "gold_margin" in pairs:
            # Agreement with the gold judge's own ordering, not with the noisy sampled labels.
            margin = np.asarray(pairs["gold_margin"])[order[:n_val]]
            decided = margin != 0
            agree = (chosen > rejected) == (margin > 0)
            metrics["val_gold_accuracy"] = float(np.mean(agree[decided])) if decided.any() else float("nan")
            metrics["val_label_gold_agreement"] = (
                float(np.mean(margin[decided] > 0)) if decided.any() else float("nan")
            )
        if trainer.is_global_zero:
            model.save_pretrained(folder / REWARD_DIR)
            tokenizer.save_pretrained(folder / REWARD_DIR)
        log.info("reward model: %s", metrics)
        return metrics

    return ctx.store.run("reward", config, [sft], compute)
