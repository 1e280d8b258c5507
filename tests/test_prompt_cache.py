"""The reference's prompt cache: a policy sharing the reference's trunk samples and scores from it what
it samples and scores from its own whole passes over the prompts."""

import math

import pytest
import torch

from directalign.generation import sample_completions, sampled_logratios
from directalign.logprobs import batched_completion_logps
from directalign.prompt_cache import build_prompt_cache
from directalign.stages.evaluate import reference_prompt_cache
from directalign.store import Artifact
from directalign.trunk import shared_trunk_layer
from tests.conftest import tiny_llama

VOCAB, EOS, PAD = 7, 1, 0
# Different lengths (one of a single token), so batches are left-padded and a prefix can be all pad.
PROMPTS = [[3, 4, 2, 5], [2, 3], [4], [6, 2, 3, 3, 5, 4]] * 2


class TinyTokenizer:
    eos_token_id, pad_token_id = EOS, PAD


@pytest.fixture(scope="module")
def pair():
    """A policy that differs from its reference in layer 1 only, as LoRA on the top layers leaves it."""
    reference = tiny_llama(vocab_size=VOCAB)
    policy = tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if name.startswith("model.layers.1."):
                weight.add_(0.3 * torch.randn_like(weight))
    assert shared_trunk_layer(policy, reference) == 1
    return policy, reference, build_prompt_cache(reference, PROMPTS, 1, PAD, batch_size=3)


def test_the_cache_holds_each_prompt_but_its_last_token(pair):
    _, reference, cache = pair
    assert set(cache.key_values) == {tuple(p) for p in PROMPTS}
    for prompt in PROMPTS:
        layers, two, kv_heads, length, head_dim = cache.key_values[tuple(prompt)].shape
        assert (layers, two, length) == (2, 2, len(prompt) - 1)
        assert cache.states[tuple(prompt)].shape == (len(prompt) - 1, reference.config.hidden_size)


@pytest.mark.parametrize("num_samples, do_sample", [(3, True), (1, True), (1, False)])
def test_sampling_from_the_cache_matches_sampling_from_the_prompts(pair, num_samples, do_sample):
    policy, _, cache = pair
    options = {"num_samples": num_samples, "seed": 0, "batch_size": 3, "max_new_tokens": 5}
    options |= {"do_sample": do_sample, "return_logps": True, "layer_inputs": 1}
    plain = sample_completions(policy, TinyTokenizer(), PROMPTS, **options)
    cached = sample_completions(policy, TinyTokenizer(), PROMPTS, prompt_cache=cache, **options)
    assert cached[0] == plain[0]
    for plain_group, cached_group in zip(plain[1], cached[1], strict=True):
        for a, b in zip(plain_group, cached_group, strict=True):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
    for plain_group, cached_group in zip(plain[2], cached[2], strict=True):
        for a, b in zip(plain_group, cached_group, strict=True):
            assert torch.allclose(a, b, atol=1e-5)


def test_cached_logratios_equal_the_reference_whole_forward(pair):
    policy, reference, cache = pair
    options = {"num_samples": 2, "seed": 0, "batch_size": 3, "max_new_tokens": 5, "do_sample": True}
    draws = sampled_logratios(policy, reference, TinyTokenizer(), PROMPTS, prompt_cache=cache, **options)
    samples, logps = sample_completions(policy, TinyTokenizer(), PROMPTS, return_logps=True, **options)
    flat_prompts = [p for p, group in zip(PROMPTS, samples, strict=True) for _ in group]
    flat = [c for group in samples for c in group]
    ref = iter(batched_completion_logps(reference, flat_prompts, flat, PAD, batch_size=5))
    for group, group_samples, group_logps in zip(draws, samples, logps, strict=True):
        for (completion, logratio), sample, sample_logps in zip(
            group, group_samples, group_logps, strict=True
        ):
            assert completion == sample
            assert math.isclose(logratio, sum(sample_logps) - sum(next(ref)), abs_tol=1e-5)
    assert any(abs(value) > 0.01 for group in draws for _, value in group)


def test_a_cache_of_other_prompts_or_another_layer_is_refused(pair):
    policy, reference, cache = pair
    options = {"num_samples": 2, "seed": 0, "batch_size": 3, "max_new_tokens": 2, "do_sample": True}
    with pytest.raises(ValueError, match="no entry"):
        sample_completions(policy, TinyTokenizer(), [[5, 5, 5]], prompt_cache=cache, **options)
    other_layer = build_prompt_cache(reference, PROMPTS[:2], 0, PAD, batch_size=3)
    with pytest.raises(ValueError, match="built at layer 0"):
        sampled_logratios(
            policy, reference, TinyTokenizer(), PROMPTS[:2], prompt_cache=other_layer, **options
        )


def test_evaluation_reuses_a_cache_only_for_the_same_model_layer_and_prompts(pair, tmp_path):
    _, reference, _ = pair
    sft = Artifact("sft", "key", tmp_path, {"metrics": {}})
    first = reference_prompt_cache(sft, reference, 1, PROMPTS, PAD, batch_size=3)
    assert reference_prompt_cache(sft, reference, 1, PROMPTS, PAD, batch_size=3) is first
    assert reference_prompt_cache(sft, reference, 1, PROMPTS[:3], PAD, batch_size=3) is not first
    retrained = Artifact("sft", "key", tmp_path, {"metrics": {"wall_seconds": 1}})
    second = reference_prompt_cache(retrained, reference, 1, PROMPTS, PAD, batch_size=3)
    assert second is not first
    assert reference_prompt_cache(retrained, reference, 0, PROMPTS, PAD, batch_size=3).first_layer == 0
