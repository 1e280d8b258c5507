"""Score completions with the learned reward model (the proxy) and the task's gold judge."""

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from directalign.tasks.base import GoldJudge


def finite_mask(*scores: np.ndarray | None) -> np.ndarray:
    """True where every given score array (None: absent) is finite: a pair or sample with a NaN or
    infinite score cannot be ranked or averaged."""
    present = [np.asarray(s, dtype=np.float64) for s in scores if s is not None]
    return np.logical_and.reduce([np.isfinite(s) for s in present])


@torch.inference_mode()
def reward_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    completions: list[str],
    max_length: int,
    batch_size: int = 64,
) -> np.ndarray:
    """Reward-model score of each (source, completion) text pair."""
    model.eval()
    device = next(model.parameters()).device
    scores = []
    for start in range(0, len(sources), batch_size):
        encoded = encode_pairs(
            tokenizer,
            sources[start : start + batch_size],
            completions[start : start + batch_size],
            max_length,
        )
        scores.append(model(**{k: v.to(device) for k, v in encoded.items()}).logits.squeeze(-1).float().cpu())
    return torch.cat(scores).numpy() if scores else np.zeros(0)


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, sources: list[str], completions: list[str], max_length: int
) -> dict[str, torch.Tensor]:
    """The reward model reads (source, completion) as a text pair; only the source is truncated."""
    return tokenizer(
        sources,
        completions,
        truncation="only_first",
        max_length=max_length,
        padding=True,
        return_tensors="pt",
        return_token_type_ids=False,
    )


class Scores(NamedTuple):
    """Calibrated proxy rewards, gold scores (None without a gold judge) and the uncalibrated proxy."""

    proxy: np.ndarray
    gold: np.ndarray | None
    raw_proxy: np.ndarray


class Scorer:
    """The proxy reward model of a completed reward stage, its scores multiplied by a calibration
    ``scale``, plus the task's gold judge if any."""

    def __init__(self, reward_dir: Path, max_length: int, gold: GoldJudge | None, scale: float = 1.0):
        self.tokenizer = AutoTokenizer.from_pretrained(reward_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(reward_dir)
        self.max_length = max_length
        self.gold = gold
        self.scale = scale

    def to(self, device: torch.device) -> "Scorer":
        self.model.to(device)
        return self

    def __call__(self, sources: list[str], references: list[str], completions: list[str]) -> Scores:
        raw = reward_scores(self.model, self.tokenizer, sources, completions, self.max_length)
        gold = self.gold.score(sources, references, completions) if self.gold else None
        return Scores(self.scale * raw, gold, raw)
