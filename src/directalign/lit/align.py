"""Alignment on the off-policy dataset with one loss of ``losses.py``.

Reference log-probs were stored per token by the generate stage, so no reference model runs
here. Each batch holds pairs ``(a, b)`` with ``reward_a >= reward_b``; a is the "chosen" one.
With ``share_prompt`` each prompt runs once for both completions of its pair (``prefix.py``).
"""

import torch
from omegaconf import DictConfig

from directalign.lit.base import TrainModule
from directalign.logprobs import completion_logps
from directalign.losses import PAIRWISE_PREFERENCE_LOSSES, copg_loss, sequence_logratio
from directalign.prefix import shared_prompt_completion_logps


def pair_losses(
    method: DictConfig,
    logratio_a: torch.Tensor,
    logratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
) -> torch.Tensor:
    """Per-pair loss of the configured method; preference losses treat a as chosen."""
    if method.loss == "copg":
        return copg_loss(logratio_a, logratio_b, reward_a, reward_b, method.beta)
    return PAIRWISE_PREFERENCE_LOSSES[method.loss](logratio_a, logratio_b, method.beta)


class AlignModule(TrainModule):
    def __init__(self, model: torch.nn.Module, stage_cfg: DictConfig, method: DictConfig):
        super().__init__(model, stage_cfg)
        self.method = method
        self.completion_logps = shared_prompt_completion_logps if stage_cfg.share_prompt else completion_logps

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask = batch["completion_mask"]
        policy_logps = self.completion_logps(
            self.model, batch["input_ids"], batch["attention_mask"], mask.shape[1]
        )
        logratio = sequence_logratio(policy_logps, batch["ref_logps"], mask, self.method.length_power)
        logratio_a, logratio_b = logratio.chunk(2)
        reward_a, reward_b = batch["reward_a"], batch["reward_b"]
        loss = pair_losses(self.method, logratio_a, logratio_b, reward_a, reward_b).mean()
        self._log_step(loss, logratio_a, logratio_b, reward_a, reward_b, mask)
        return loss

    def _log_step(self, loss, logratio_a, logratio_b, reward_a, reward_b, mask) -> None:
        beta, size = self.method.beta, logratio_a.shape[0]
        metrics = {
            "train/loss": loss.detach(),
            "logratio/a": logratio_a.mean(),
            "logratio/b": logratio_b.mean(),
            "implicit_reward/margin": (beta * (logratio_a - logratio_b)).mean(),
            "implicit_reward/accuracy": (logratio_a > logratio_b).float().mean(),
            "completion_length": mask.float().sum(-1).mean(),
        }
        if self.method.loss == "copg":
            metrics["reward_beta/a"] = (reward_a - beta * logratio_a).mean()
            metrics["reward_beta/b"] = (reward_b - beta * logratio_b).mean()
        self.log_dict({k: v.detach() for k, v in metrics.items()}, batch_size=size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=size)
