"""Completion-only log-probs: prompt and padding tokens never count, whatever the padding."""

import pytest
import torch
from transformers import LlamaForCausalLM

from directalign.logprobs import collate_prompt_completion, completion_logps, gather_token_logps
from tests.conftest import tiny_llama

PAD = 0


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(vocab_size=50)


def naive_logps(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """One unpadded sequence, full log-softmax: the plain computation to match."""
    ids = torch.tensor([prompt + completion])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    targets = ids[0, 1:]
    return logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :]


def test_collate_layout():
    batch = collate_prompt_completion([[5, 6, 7], [8]], [[9], [10, 11]], PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, 0], [0, 0, 8, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[1, 0], [1, 1]]


def test_gather_matches_log_softmax():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 50)
    labels = torch.randint(50, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    assert torch.allclose(gather_token_logps(logits, labels), expected, atol=1e-5)


@torch.no_grad()
def test_completion_logps_match_unpadded_sequences(model):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    completions = [[13, 14], [15, 16, 17, 18], [19]]
    batch = collate_prompt_completion(prompts, completions, PAD)
    width = batch["completion_mask"].shape[1]
    got = completion_logps(model, batch["input_ids"], batch["attention_mask"], width)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        expected = naive_logps(model, prompt, completion)
        assert torch.allclose(got[row, : len(completion)], expected, atol=1e-5), row


@torch.no_grad()
def test_padding_does_not_change_sums(model):
    prompt, completion = [3, 4, 5], [6, 7]
    alone = collate_prompt_completion([prompt], [completion], PAD)
    padded = collate_prompt_completion([prompt, [1] * 9], [completion, [2] * 6], PAD)
    sum_alone = (
        completion_logps(model, alone["input_ids"], alone["attention_mask"], 2) * alone["completion_mask"]
    ).sum()
    logps = completion_logps(
        model, padded["input_ids"], padded["attention_mask"], padded["completion_mask"].shape[1]
    )
    sum_padded = (logps[0] * padded["completion_mask"][0]).sum()
    assert sum_alone.item() == pytest.approx(sum_padded.item(), abs=1e-5)
