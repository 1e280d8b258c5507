"""Prompt sharing (``stage.align.share_prompt``) changes the cost of the align step, never its result.

The same pair batch goes through ``AlignModule.training_step`` with and without sharing: the loss
and every parameter's gradient must agree to 1e-5. The batch has prompts and completions of
different lengths (left and right padding) and a completion of one token.
"""

import warnings

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from directalign.lit.align import AlignModule
from directalign.logprobs import completion_logps
from directalign.models import with_lora
from directalign.pairs import collate_pairs
from directalign.prefix import shared_prompt_completion_logps
from tests.conftest import TOP_LAYER_LORA, tiny_llama

PAD = 0
STAGE = {"lr": 1e-5, "weight_decay": 0.0, "warmup_ratio": 0.0, "scheduler": "constant"}


def tied_llama() -> LlamaForCausalLM:
    return tiny_llama(tie_word_embeddings=True)


def pair_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 64, (n,), generator=generator).tolist()

    shapes = [(7, 3, 5), (2, 1, 4), (5, 6, 2)]  # prompt, a and b lengths
    pairs = []
    for prompt, a, b in shapes:
        pairs.append(
            {
                "prompt": tokens(prompt),
                "a": tokens(a),
                "b": tokens(b),
                "ref_a": (-torch.rand(a, generator=generator) * 4).tolist(),
                "ref_b": (-torch.rand(b, generator=generator) * 4).tolist(),
                "reward_a": 1.0,
                "reward_b": 0.5,
            }
        )
    return collate_pairs(pairs, PAD)


def loss_and_grads(
    share_prompt: bool, loss: str, length_power: float, lora: dict | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    stage = OmegaConf.create({**STAGE, "share_prompt": share_prompt, "lora": lora})
    method = OmegaConf.create({"loss": loss, "beta": 0.1, "length_power": length_power})
    module = AlignModule(with_lora(tied_llama(), stage.lora), stage, method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer attached
        value = module.training_step(pair_batch(), 0)
    value.backward()
    return value.detach(), {
        name: p.grad.clone()
        for name, p in module.named_parameters()
        if p.requires_grad and p.grad is not None
    }


@pytest.mark.parametrize(
    ("loss", "length_power", "lora"),
    [("dpo", 0.0, None), ("ipo", 1.0, None), ("copg", 0.5, None), ("dpo", 1.0, TOP_LAYER_LORA)],
)
def test_shared_prompt_gives_same_loss_and_gradients(loss: str, length_power: float, lora: dict | None):
    plain_loss, plain_grads = loss_and_grads(False, loss, length_power, lora)
    shared_loss, shared_grads = loss_and_grads(True, loss, length_power, lora)
    assert plain_loss.item() != 0.0
    assert shared_loss.item() == pytest.approx(plain_loss.item(), abs=1e-5)
    assert plain_grads.keys() == shared_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(shared_grads[name], grad, atol=1e-5, rtol=0), name


def test_rows_said_to_share_a_prompt_must_hold_the_same_one():
    batch = pair_batch()
    prompt_index = torch.tensor([0, 1, 2, 0, 1, 1])  # the last b row is said to continue pair 1's prompt
    with pytest.raises(ValueError, match="same prompt"):
        shared_prompt_completion_logps(
            tied_llama(),
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"].shape[1],
            prompt_index,
        )


def test_shared_prompt_needs_pair_batch():
    batch = pair_batch()
    batch["input_ids"][-1, 0] = 5  # the last b row's prompt no longer matches its a row
    with pytest.raises(ValueError, match="same prompt"):
        shared_prompt_completion_logps(
            tied_llama(), batch["input_ids"], batch["attention_mask"], batch["completion_mask"].shape[1]
        )


@torch.no_grad()
def test_one_token_completions_need_only_the_prompt_pass():
    model = tied_llama()
    pairs = [
        {
            "prompt": [3, 4, 5],
            "a": [6],
            "b": [7],
            "ref_a": [0.0],
            "ref_b": [0.0],
            "reward_a": 1,
            "reward_b": 0,
        },
        {"prompt": [8], "a": [9], "b": [10], "ref_a": [0.0], "ref_b": [0.0], "reward_a": 1, "reward_b": 0},
    ]
    batch = collate_pairs(pairs, PAD)
    args = (batch["input_ids"], batch["attention_mask"], 1)
    assert torch.allclose(
        shared_prompt_completion_logps(model, *args), completion_logps(model, *args), atol=1e-5
    )


@torch.no_grad()
def test_completion_mask_runs_the_head_on_real_tokens_only():
    """With the completion mask, real tokens keep their log-probs exactly and padding reads 0."""
    model, batch = tied_llama(), pair_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"].shape[1])
    real = batch["completion_mask"].bool()
    assert not real.all()  # the batch has right padding
    every_position = shared_prompt_completion_logps(model, *args)
    real_only = shared_prompt_completion_logps(model, *args, completion_mask=batch["completion_mask"])
    assert torch.equal(real_only[real], every_position[real])
    assert torch.equal(real_only[~real], torch.zeros(int((~real).sum())))
