"""Reward-versus-step curves: sample fixed held-out prompts during training and score them."""

import logging
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback
from transformers import PreTrainedTokenizerBase

from directalign.generation import sample_completions
from directalign.prompts import Prompts, decode_completions
from directalign.scoring import Scorer
from directalign.sharding import is_sharded

log = logging.getLogger(__name__)


class RewardCurve(Callback):
    """Every ``every_n_steps`` optimiser steps (and at the start and end), greedy-decode the curve
    prompts on rank 0 and record the mean proxy reward, gold reward and length. Under FSDP every rank
    decodes along (the sharded layers gather their weights collectively)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Prompts,
        scorer: Scorer,
        every_n_steps: int,
        max_new_tokens: int,
        batch_size: int,
    ):
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.scorer = scorer
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.points: list[dict[str, Any]] = []

    def _measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        sharded = is_sharded(trainer.strategy)
        if not (trainer.is_global_zero or sharded) or (
            self.points and self.points[-1]["step"] == trainer.global_step
        ):
            return
        samples = sample_completions(
            module.model,
            self.tokenizer,
            self.prompts.ids,
            num_samples=1,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            do_sample=False,
            desc="reward curve",
            synced_gpus=sharded,
        )
        module.model.train()
        completions = [s[0] for s in samples]
        texts = decode_completions(self.tokenizer, completions)
        proxy, gold, _ = self.scorer.to(module.device)(self.prompts.sources, self.prompts.references, texts)
        point = {
            "step": trainer.global_step,
            "proxy_reward": float(np.mean(proxy)),
            "gold_reward": float(np.mean(gold)) if gold is not None else None,
            "length_tokens": float(np.mean([len(c) for c in completions])),
        }
        self.points.append(point)
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"curve/{k}": v for k, v in point.items() if k != "step" and v is not None},
                step=trainer.global_step,
            )
        log.info("reward curve: %s", point)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self.points:  # a resumed run already holds its curve up to the checkpoint
            self._measure(trainer, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._measure(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._measure(trainer, module)

    def state_dict(self) -> dict[str, Any]:
        return {"points": self.points}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = state_dict["points"]
