"""What every stage receives: the composed config, the store, the task, and shared helpers."""

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from directalign.models import load_tokenizer
from directalign.prompts import build_prompts
from directalign.store import Store
from directalign.tasks.base import Task

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A resolved, JSON-able copy of a config node, for store keys and manifests."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@dataclass
class StageContext:
    cfg: DictConfig
    store: Store
    task: Task

    @property
    def task_key(self) -> dict[str, Any]:
        return plain(self.cfg.task)

    @cached_property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.cfg.model, self.store.root)

    @cached_property
    def device(self) -> torch.device:
        """Where the stages sample and score outside ``trainer.fit``: this rank's GPU whenever the
        trainer may use one (``accelerator`` gpu, cuda or auto) and one is visible, else the CPU.
        Lightning selects the rank's GPU once training has started; before that, the launcher's
        local rank tells it."""
        if self.cfg.trainer.accelerator not in ("gpu", "cuda", "auto") or not torch.cuda.is_available():
            return torch.device("cpu")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
        local_rank = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        return torch.device("cuda", int(local_rank))

    def prompts(
        self, split: str, limit: int | None, offset: int = 0
    ) -> tuple[list[list[int]], dict[str, list], int]:
        """Prompt ids and the examples of a split (``limit`` of them from ``offset``), sources
        truncated to budget."""
        examples = self.task.examples(split)
        end = len(examples) if limit is None else min(offset + limit, len(examples))
        examples = examples.select(range(min(offset, end), end))
        prompt_ids, sources, n_truncated = build_prompts(
            self.task,
            self.tokenizer,
            examples["source"],
            self.cfg.task.max_source_tokens,
            self.cfg.model.system_prompt,
        )
        columns = {"id": examples["id"], "source": sources, "reference": examples["reference"]}
        return prompt_ids, columns, n_truncated

    def seed(self, offset: int = 0) -> int:
        seed = self.cfg.seed + offset
        L.seed_everything(seed, workers=True, verbose=False)
        return seed
