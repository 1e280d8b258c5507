"""Stage 2: a Bradley-Terry reward model on preference pairs (``preferences.py`` says where they come
from), checked on held-out pairs against the labels and, where there is one, the gold judge, and
calibrated on them: one temperature puts its scores on the labeller's log-odds scale.

``reward_model=pretrained`` takes an existing reward model instead: it is not trained, every pair is held
out to check and calibrate it, and the manifest records where it came from (``origin``)."""

import logging
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from directalign.artifacts import RewardArtifact
from directalign.calibration import fit_calibration
from directalign.distributed import is_rank_zero
from directalign.errors import DataError
from directalign.lit.reward import RewardModule
from directalign.models import build_reward_model, reward_model_origin
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


def train_reward_model(
    ctx: StageContext, folder: Path, sft_dir: Path, train_rows: list[Pair], val_rows: list[Pair], seed: int
) -> tuple[PreTrainedModel | None, PreTrainedTokenizerBase]:
    """The reward model fitted on ``train_rows`` (validated on ``val_rows``); None on ranks other than 0."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.reward

    def build():
        return build_reward_model(cfg.reward_model, sft_dir, seed)[0]

    model, tokenizer = build_reward_model(cfg.reward_model, sft_dir, seed)
    collate = partial(collate_preferences, tokenizer=tokenizer, max_length=stage_cfg.max_length)
    _, model = fit_stage(
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
    return model, tokenizer


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
    if cfg.reward_model.source == "pretrained":
        # An existing reward model is not trained: every pair is held out, to check and calibrate it.
        if not is_rank_zero():
            return {}
        val, train_rows, val_rows = np.arange(len(rows)), [], rows
        model, tokenizer = build_reward_model(cfg.reward_model, sft.model_dir, seed)
        origin = {"origin": reward_model_origin(cfg.reward_model, model)}
    else:
        order = np.random.default_rng(seed).permutation(len(rows))
        n_val = max(1, int(len(rows) * stage_cfg.validation_fraction))
        val, train_rows = order[:n_val], [rows[i] for i in order[n_val:]]
        val_rows = [rows[i] for i in val]
        model, tokenizer = train_reward_model(ctx, folder, sft.model_dir, train_rows, val_rows, seed)
        if model is None:
            return {}  # rank 0 scores the held-out pairs and saves the model
        origin = {}
    model.cpu()
    sources = [s for s, _, _ in val_rows]
    chosen = reward_scores(model, tokenizer, sources, [c for _, c, _ in val_rows], stage_cfg.max_length)
    rejected = reward_scores(model, tokenizer, sources, [r for _, _, r in val_rows], stage_cfg.max_length)
    metrics = {
        **origin,
        "n_train_pairs": len(train_rows),
        "n_val_pairs": len(val_rows),
        "n_dropped_pairs": sum(pairs.dropped.values()),
        **{f"n_dropped_{reason}": n for reason, n in pairs.dropped.items()},
        **pairs.counts,
        **held_out_metrics(pairs, val, chosen, rejected),
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
