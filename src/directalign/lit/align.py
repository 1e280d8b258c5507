"""Alignment on the off-policy dataset with one loss of ``losses.py``.

Reference log-probs were stored per token by the generate stage, so no reference model runs
here. Each batch (``pairs.py``) holds completions as rows and pairs ``(a, b)`` of them as row indices,
with ``reward_a >= reward_b``; a is the "chosen" one. Every row's log-ratio is computed once, however
many pairs it is in, and the loss is the mean over the batch's pairs. With ``share_prompt`` each
distinct prompt runs once for all the completions behind it (``prefix.py``); with the frozen trunk's
states in the batch, only the trained top layers run (``trunk.py``). With ``activation_checkpointing``
the decoder layers keep only their inputs and recompute the rest in the backward pass (less memory,
~1/3 more layer FLOPs).
"""

import logging

import torch
from omegaconf import DictConfig

from directalign.lit.base import TrainModule
from directalign.logprobs import completion_logps
from directalign.losses import LOSSES
from directalign.prefix import shared_prompt_completion_logps
from directalign.trunk import TopLayers, causal_lm

log = logging.getLogger(__name__)


class AlignModule(TrainModule):
    """``first_layer``: batches carry the frozen trunk's ``input_states`` and only layers
    ``first_layer`` and up run (``trunk.py``), sharing each prompt. ``stage_cfg.activation_checkpointing``
    (absent: off) turns on the model's own activation checkpointing (``checkpoint_activations``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        stage_cfg: DictConfig,
        method: DictConfig,
        first_layer: int | None = None,
    ):
        super().__init__(model, stage_cfg)
        self.method = method
        self.first_layer = first_layer
        self.share_prompt = bool(stage_cfg.share_prompt)
        if stage_cfg.get("activation_checkpointing", False):
            self.checkpoint_activations()

    def checkpoint_activations(self) -> None:
        """Checkpoint every decoder layer (transformers' own, non-reentrant): each keeps its input and
        recomputes the rest in the backward pass, trading ~1/3 more layer FLOPs for GPU memory. A
        checkpointed layer drops the KV cache (its recompute would write it twice), and prompt sharing
        runs on one: with ``share_prompt`` every row runs whole instead; on the frozen trunk (always
        shared) checkpointing is not applied. One log line each."""
        if self.first_layer is not None:
            log.warning(
                "activation_checkpointing: not applied: the frozen trunk's top layers run on a shared"
                " prompt's KV cache, which checkpointed layers drop"
            )
            return
        if self.share_prompt:
            log.warning(
                "activation_checkpointing: share_prompt off: checkpointed layers drop the KV cache that"
                " prompt sharing runs on, so every row runs its prompt"
            )
            self.share_prompt = False
        lm = causal_lm(self.model)
        lm.activation_checkpointing_enable({"use_reentrant": False})
        # Non-reentrant checkpointing needs no input that requires grad; the embedding hook transformers
        # adds for it would make backpropagation run through the frozen layers below LoRA adapters.
        lm.disable_input_require_grads()

    def policy_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-token log-probs ``[R, C]`` of every row's completion under the policy. On the frozen trunk
        the LM head reads only the real completion tokens (padding reads 0); the whole model's shared
        path keeps every position, as FSDP's hooks run on the model's own forward, not its decoder's."""
        mask = batch["completion_mask"]
        rows = (batch["input_ids"], batch["attention_mask"], mask.shape[1])
        if self.first_layer is not None:
            top_layers = TopLayers(self.model, self.first_layer)
            return shared_prompt_completion_logps(
                top_layers, *rows, batch["prompt_index"], batch["input_states"], mask
            )
        if self.share_prompt:
            return shared_prompt_completion_logps(self.model, *rows, batch["prompt_index"])
        return completion_logps(self.model, *rows)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask, loss_fn = batch["completion_mask"], LOSSES[self.method.loss]
        logratio = loss_fn.sequence_terms(
            self.policy_logps(batch), batch["ref_logps"], mask, self.method.length_power
        )
        a, b = batch["pair_a"], batch["pair_b"]
        logratio_a, logratio_b = logratio[a], logratio[b]
        reward_a, reward_b = batch["reward"][a], batch["reward"][b]
        loss = loss_fn(self.method, logratio_a, logratio_b, reward_a, reward_b).mean()
        lengths = mask.float().sum(-1)
        self._log_step(loss, logratio_a, logratio_b, reward_a, reward_b, torch.cat([lengths[a], lengths[b]]))
        return loss

    def _log_step(self, loss, logratio_a, logratio_b, reward_a, reward_b, pair_lengths) -> None:
        """Means over the batch's pairs; ``completion_length`` over both completions of every pair."""
        beta, size = self.method.beta, logratio_a.shape[0]
        metrics = {
            "train/loss": loss.detach(),
            "logratio/a": logratio_a.mean(),
            "logratio/b": logratio_b.mean(),
            "implicit_reward/margin": (beta * (logratio_a - logratio_b)).mean(),
            "implicit_reward/accuracy": (logratio_a > logratio_b).float().mean(),
            "completion_length": pair_lengths.mean(),
        }
        if LOSSES[self.method.loss].needs_rewards:
            metrics["reward_beta/a"] = (reward_a - beta * logratio_a).mean()
            metrics["reward_beta/b"] = (reward_b - beta * logratio_b).mean()
        self.log_dict({k: v.detach() for k, v in metrics.items()}, batch_size=size)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=size)
