"""Activation checkpointing (``stage.align.activation_checkpointing``) changes the align step's memory,
never its result: on a tiny random Llama, whole-model and with LoRA on the top layer, the loss and every
gradient equal those of the step without it, to 1e-5, and every decoder layer the backward pass runs
through is recomputed there (else the equality would prove nothing). Checkpointed layers drop the KV
cache, so prompt sharing turns off and the frozen trunk trains without checkpointing, each with one log
line.
"""

import logging
import warnings

import pytest
import torch
from omegaconf import OmegaConf

from directalign.lit.align import AlignModule
from directalign.models import with_lora
from directalign.pairs import attach_trunk_states, build_prompt_groups, collate_prompt_groups
from directalign.trunk import causal_lm, trunk_states
from tests.conftest import TOP_LAYER_LORA, step_loss_and_grads, tiny_llama
from tests.test_align import BETA, PAD, STAGE, offpolicy_table
from tests.test_trunk import four_layer_llama, lora_on

METHOD = OmegaConf.create({"loss": "copg", "beta": BETA, "length_power": 1.0})
LOG = "directalign.lit.align"


def grouped_batch() -> dict[str, torch.Tensor]:
    """Prompts of different lengths with K = 2, 3 and 4 completions, one of a single token."""
    return collate_prompt_groups(build_prompt_groups(offpolicy_table(), drop_ties=False)[0], PAD)


def module(policy: torch.nn.Module, share_prompt: bool, checkpointing: bool, first_layer: int | None = None):
    stage = OmegaConf.merge(STAGE, {"share_prompt": share_prompt, "activation_checkpointing": checkpointing})
    return AlignModule(policy.train(), stage, METHOD, first_layer)


def step_and_recomputes(align: AlignModule, batch: dict) -> tuple[float, dict[str, torch.Tensor], int]:
    """``step_loss_and_grads``, and how many decoder layers ran again in the backward pass. Counted by
    the MLP's pre-hook: a recompute stops once it has what the backward needs, maybe inside the MLP,
    before a post-hook would run."""
    calls = []
    for layer in causal_lm(align.model).model.layers:
        layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer attached
        loss = align.training_step(batch, 0)
    forward_passes = len(calls)
    loss.backward()
    grads = {name: p.grad for name, p in align.named_parameters() if p.requires_grad}
    return loss.item(), grads, len(calls) - forward_passes


@pytest.mark.parametrize("lora", [None, TOP_LAYER_LORA], ids=["full", "lora"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "shared"])
def test_checkpointing_gives_the_same_loss_and_gradients(lora, share_prompt):
    """Tolerance: 1e-5 absolute on the loss and on every gradient entry."""
    batch, config = grouped_batch(), None if lora is None else OmegaConf.create(lora)
    plain = module(with_lora(tiny_llama(), config), share_prompt, checkpointing=False)
    plain_loss, plain_grads, plain_recomputes = step_and_recomputes(plain, batch)
    checkpointed = module(with_lora(tiny_llama(), config), share_prompt, checkpointing=True)
    loss, grads, recomputes = step_and_recomputes(checkpointed, batch)
    # Each layer the backward runs through, once: with LoRA on layer 1 only that one, as layer 0 and its
    # input need no gradient (the embedding hook transformers adds for reentrant checkpointing is off).
    assert (plain_recomputes, recomputes) == (0, 2 if lora is None else 1)
    assert plain_loss != 0.0
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=name)


def test_prompt_sharing_turns_off_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger=LOG):
        align = module(tiny_llama(), share_prompt=True, checkpointing=True)
    assert not align.share_prompt
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == [
        "activation_checkpointing: share_prompt off: checkpointed layers drop the KV cache that prompt"
        " sharing runs on, so every row runs its prompt"
    ]


def test_the_frozen_trunk_trains_without_checkpointing(caplog):
    """The trunk's top layers run on a prompt's KV cache, which a checkpointed layer would drop: the
    module leaves checkpointing off (one log line), and the step is the one without it."""
    lora, first_layer, table = OmegaConf.create(lora_on([2, 3])), 2, offpolicy_table()
    groups, _ = build_prompt_groups(table, drop_ties=False)
    states = trunk_states(
        four_layer_llama(),
        table["prompt_ids"],
        table["completion_ids"],
        first_layer,
        PAD,
        prompts_per_forward=2,
    )
    attach_trunk_states(groups, states)
    batch = collate_prompt_groups(groups, PAD)
    plain = module(with_lora(four_layer_llama(), lora), True, checkpointing=False, first_layer=first_layer)
    plain_loss, plain_grads = step_loss_and_grads(plain, batch)
    with caplog.at_level(logging.INFO, logger=LOG):
        trunk = module(with_lora(four_layer_llama(), lora), True, checkpointing=True, first_layer=first_layer)
    assert [r.getMessage() for r in caplog.records if r.name == LOG] == [
        "activation_checkpointing: not applied: the frozen trunk's top layers run on a shared prompt's KV"
        " cache, which checkpointed layers drop"
    ]
    assert not any(layer.gradient_checkpointing for layer in causal_lm(trunk.model).model.layers)
    loss, grads = step_loss_and_grads(trunk, batch)
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=0, msg=name)
