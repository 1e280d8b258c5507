"""Stage 2: a Bradley-Terry reward model on preference pairs (``preferences.py`` says where they come
from), checked on held-out pairs against the labels and, where there is one, the gold judge, and
calibrated on them: one temperature puts its scores on the labeller's log-odds scale."""

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from directalign.artifacts import RewardArtifact
from directalign.calibration import fit_calibration
from directalign.errors import DataError
from directalign.lit.reward import RewardModule
from directalign.models import build_reward_model
from directalign.preferences import Preferences, human_preferences, simulated_preferences
from directalign.scoring import encode_pairs, reward_scores
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.training import CHECKPOINT_DIR, fit_stage

log = logging.getLogger(__name__)

Pair = tuple[str, str, str]  # source, chosen, rejected


def collate_preferences(batch: list[Pair], tokenizer, max_length: int) -> dict:
    sources = [s for s, _, _ in batch]
    chosen = encode_pairs(tokenizer, sources, [c for _, c, _ in batch], max_length)
    rejected = encode_pairs(tokenizer, sources, [r for _, _, r in batch], max_length)
    return {f"chosen_{k}": v for k, v in chosen.items()} | {f"rejected_{k}": v for k, v in rejected.items()}


def held_out_metrics(pairs: Preferences, val: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> dict:
    """Accuracy on the held-out pairs' labels, and agreement with the gold judge's own ordering (not
    with the noisy sampled labels) where a gold judge labelled them."""
    metrics = {"val_accuracy": float(np.mean(chosen > rejected))}
    if pairs.gold_margin is not None:
        margin = np.asarray(pairs.gold_margin)[val]
        decided = margin != 0
        agree = (chosen > rejected) == (margin > 0)
        metrics["val_gold_accuracy"] = float(np.mean(agree[decided])) if decided.any() else float("nan")
        metrics["val_label_gold_agreement"] = (
            float(np.mean(margin[decided] > 0)) if decided.any() else float("nan")
        )
    return metrics


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    cfg, stage_cfg, sft = ctx.cfg, ctx.cfg.stage.reward, inputs["sft"]
    seed = ctx.seed(1)
    pairs = human_preferences(ctx) or simulated_preferences(ctx, sft, seed)
    rows = list(zip(pairs.sources, pairs.chosen, pairs.rejected, strict=True))
    if len(rows) < 4:
        raise DataError(
            f"reward stage: only {len(rows)} usable preference pairs (dropped {pairs.dropped});"
            " need at least 4"
        )
    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, int(len(rows) * stage_cfg.validation_fraction))
    val_rows, train_rows = [rows[i] for i in order[:n_val]], [rows[i] for i in order[n_val:]]

    def build():
        return build_reward_model(cfg.reward_model, sft.model_dir, seed)[0]

    model, tokenizer = build_reward_model(cfg.reward_model, sft.model_dir, seed)
    collate = partial(collate_preferences, tokenizer=tokenizer, max_length=stage_cfg.max_length)
    trainer, model = fit_stage(
        cfg,
        stage_cfg,
        folder,
        RewardModule(model, stage_cfg),
        build,
        "reward",
        {"stage": "reward", "reward_model": cfg.reward_model.name},
        train=DataLoader(train_rows, batch_size=stage_cfg.batch_size, shuffle=True, collate_fn=collate),
        val=DataLoader(val_rows, batch_size=stage_cfg.batch_size, shuffle=False, collate_fn=collate),
    )
    if model is None:
        return {}  # rank 0 scores the held-out pairs and saves the model
    model.cpu()
    sources = [s for s, _, _ in val_rows]
    chosen = reward_scores(model, tokenizer, sources, [c for _, c, _ in val_rows], stage_cfg.max_length)
    rejected = reward_scores(model, tokenizer, sources, [r for _, _, r in val_rows], stage_cfg.max_length)
    metrics = {
        "n_train_pairs": len(train_rows),
        "n_val_pairs": len(val_rows),
        "n_dropped_pairs": sum(pairs.dropped.values()),
        **{f"n_dropped_{reason}": n for reason, n in pairs.dropped.items()},
        **pairs.counts,
        **held_out_metrics(pairs, order[:n_val], chosen, rejected),
    }
    if stage_cfg.calibration:
        # One temperature that makes the scores Bradley-Terry log-odds of the labeller, so that a reward
        # gap means what CoPG's beta assumes; refused if the model orders held-out pairs at chance.
        metrics["calibration"] = asdict(fit_calibration(chosen - rejected))
    RewardArtifact.save(folder, model, tokenizer)
    log.info("reward model: %s", metrics)
    return metrics


REWARD = Stage(
    name="reward",
    inputs=("sft",),
    key=("task", "reward_model", "stage.reward", "seed", "trainer.precision"),
    excluded=("stage.reward.checkpoint_every_n_steps",),
    output=RewardArtifact,
    ranks=Ranks.COLLECTIVE,
    compute=compute,
    scratch=(CHECKPOINT_DIR,),
)
