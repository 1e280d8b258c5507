"""What every stage receives: the composed config, the store, the task, and the plumbing they share."""

import logging
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import PreTrainedTokenizerBase

from directalign.models import load_tokenizer
from directalign.prompts import Prompts, build_prompts, decode_completions
from directalign.scoring import Scorer
from directalign.store import Store
from directalign.tasks.base import Task
from directalign.validation import check_prompt_lengths

if TYPE_CHECKING:
    from directalign.artifacts import RewardArtifact

log = logging.getLogger(__name__)


def plain(node: Any) -> Any:
    """A resolved, JSON-able copy of a config node, for store keys and manifests."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


@dataclass
class StageContext:
    cfg: DictConfig
    store: Store
    task: Task
    # Scorers by reward artifact: loaded once per run, not once per stage or per call.
    scorers: dict[str, Scorer] = field(default_factory=dict, repr=False)

    def for_method(self, name: str, method: DictConfig, seed: int) -> "StageContext":
        """This context with ``method`` set to one method to align, under its one name, trained with one
        of its ``seeds`` (the list becomes that ``seed``)."""
        cfg = self.cfg.copy()
        with open_dict(cfg):
            cfg.method = method.copy()
            cfg.method.name = name
            cfg.method.seed = seed
            del cfg.method["seeds"]
        return replace(self, cfg=cfg)

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

    def prompts(self, split: str, limit: int | None, positions: int | None, offset: int = 0) -> Prompts:
        """``limit`` examples of ``split`` from ``offset`` as chat prompts, sources truncated to budget;
        each must leave a model of ``positions`` positions room for a whole completion."""
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
        check_prompt_lengths(
            f"task {self.cfg.task.name!r}, split {split!r}",
            prompt_ids,
            examples["id"],
            self.cfg.task.max_completion_tokens,
            positions,
        )
        return Prompts(split, prompt_ids, examples["id"], sources, examples["reference"], n_truncated)

    def decode(self, completions: list[list[int]]) -> list[str]:
        return decode_completions(self.tokenizer, completions)

    def scorer(self, reward: "RewardArtifact") -> Scorer:
        """The learned reward model and the task's gold judge, on this rank's device."""
        if reward.ref not in self.scorers:
            self.scorers[reward.ref] = reward.scorer(self.task.gold_judge(), self.device)
        return self.scorers[reward.ref]

    def seed(self, offset: int = 0) -> int:
        seed = self.cfg.seed + offset
        L.seed_everything(seed, workers=True, verbose=False)
        return seed
