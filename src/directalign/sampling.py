"""How a stage samples, in one typed object built once from the stage's ``sampling`` block.

Every stage that samples (the reward stage's SFT pairs, generate, evaluate, and the align stage's
reward curve, which decodes greedily with the evaluation's batch size) has a block
``stage.<name>.sampling`` with the same four keys: ``num_samples`` (completions per prompt),
``temperature``, ``top_p`` and ``batch_size`` (prompts a batch). The completion budget is the task's,
``task.max_completion_tokens``: every stage samples to the one budget SFT trained to.
"""

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

SAMPLING_STAGES = ("reward", "generate", "evaluate")


@dataclass(frozen=True)
class Sampling:
    num_samples: int
    temperature: float
    top_p: float
    batch_size: int
    max_new_tokens: int

    @classmethod
    def of(cls, cfg: DictConfig, stage: str) -> "Sampling":
        """``stage.<stage>.sampling`` with the task's completion budget."""
        block = cfg.stage[stage].sampling
        return cls(
            num_samples=block.num_samples,
            temperature=block.temperature,
            top_p=block.top_p,
            batch_size=block.batch_size,
            max_new_tokens=cfg.task.max_completion_tokens,
        )

    def options(self) -> dict[str, Any]:
        """Keyword arguments of ``generation.sample_completions`` that draw these samples."""
        return {
            "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }

    def greedy(self) -> dict[str, Any]:
        """The same, decoding greedily: one completion a prompt, at this batch size and budget."""
        return {
            "num_samples": 1,
            "max_new_tokens": self.max_new_tokens,
            "batch_size": self.batch_size,
            "do_sample": False,
        }
