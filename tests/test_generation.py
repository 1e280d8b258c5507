"""Batched sampling: bucketed order restored, eos cut, and sampling log-probs equal a fresh forward."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from directalign.generation import sample_completions
from directalign.logprobs import batched_completion_logps
from tests.conftest import tiny_llama

EOS, PAD = 1, 0
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [15]]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama(vocab_size=40, eos_token_id=EOS, pad_token_id=PAD)


TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)


def sample(model, **kwargs):
    options = {"num_samples": 2, "max_new_tokens": 6, "batch_size": 3, "do_sample": True, "seed": 0} | kwargs
    return sample_completions(model, TOKENIZER, PROMPTS, **options)


def test_shapes_and_eos_cut(model):
    samples = sample(model)
    assert len(samples) == len(PROMPTS) and all(len(s) == 2 for s in samples)
    for completions in samples:
        for completion in completions:
            assert 1 <= len(completion) <= 6
            assert EOS not in completion[:-1]


def test_same_seed_same_samples_other_seed_differs(model):
    assert sample(model, seed=3) == sample(model, seed=3)
    assert sample(model, seed=3) != sample(model, seed=4)


def test_batching_does_not_change_greedy_output(model):
    one = sample(model, do_sample=False, num_samples=1, batch_size=1)
    many = sample(model, do_sample=False, num_samples=1, batch_size=4)
    assert one == many


def test_sampling_logps_equal_a_fresh_forward(model):
    samples, logps = sample(model, temperature=0.7, return_logps=True)
    prompts = [p for p, s in zip(PROMPTS, samples, strict=True) for _ in s]
    completions = [c for s in samples for c in s]
    fresh = batched_completion_logps(model, prompts, completions, PAD, batch_size=8)
    flat = [lp for row in logps for lp in row]
    for got, expected in zip(flat, fresh, strict=True):
        assert torch.allclose(torch.tensor(got), torch.tensor(expected), atol=1e-5)
