"""Batched sampling: bucketed order restored, eos cut, sampling log-probs equal a fresh forward, and a
prompt prefilled once for all its samples samples what ``num_return_sequences``' repeated prefill does."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaForCausalLM

from directalign.benchmarking import left_padded, repeated_prefill_samples
from directalign.generation import sample_completions, shared_prompt_cache
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


def sample_with_repeated_prefill(model, **options):
    """The oracle: ``sample_completions`` as it was, ``num_return_sequences`` prefilling every copy."""
    return repeated_prefill_samples(model, PROMPTS, pad_id=PAD, eos_id=EOS, **options)


# One batch; two batches of different widths; batches of one prompt, the one-token prompt among them.
@pytest.mark.parametrize("batch_size", [4, 3, 1])
@pytest.mark.parametrize("return_logps", [False, True])
def test_shared_prefill_samples_what_repeated_prefill_samples(model, batch_size, return_logps):
    options = {"num_samples": 4, "max_new_tokens": 8, "batch_size": batch_size, "temperature": 0.7}
    options["return_logps"] = return_logps
    for seed in range(3):
        got = sample(model, seed=seed, **options)
        expected = sample_with_repeated_prefill(model, seed=seed, **options)
        if return_logps:
            (got, got_logps), (expected, expected_logps) = got, expected
            flat_got = [torch.tensor(lp) for row in got_logps for lp in row]
            flat_expected = [torch.tensor(lp) for row in expected_logps for lp in row]
            pairs = zip(flat_got, flat_expected, strict=True)
            assert all(torch.allclose(got_lp, expected_lp, atol=1e-5) for got_lp, expected_lp in pairs)
        assert got == expected


@torch.inference_mode()
def generate_from_shared_prefill(model, input_ids, attention_mask, copies, **options):
    return model.generate(
        input_ids=input_ids.repeat_interleave(copies, dim=0),
        attention_mask=attention_mask.repeat_interleave(copies, dim=0),
        cache=shared_prompt_cache(model, input_ids, attention_mask, copies),
        **options,
    )


GENERATE = {"return_dict_in_generate": True, "output_logits": True, "max_new_tokens": 6}
GENERATE |= {"pad_token_id": PAD, "eos_token_id": EOS, "top_k": None}


def assert_same_steps(got, expected):
    """Equal sequences, and every step's logits (the first, from the prompt's last token, included)
    equal to float rounding: the same distributions were sampled from."""
    assert torch.equal(got.sequences, expected.sequences)
    for got_logits, expected_logits in zip(got.logits, expected.logits, strict=True):
        assert torch.allclose(got_logits, expected_logits, atol=1e-5)


def test_shared_prompt_cache_samples_like_a_repeated_prefill(model):
    input_ids, attention_mask = left_padded(PROMPTS, PAD)
    torch.manual_seed(0)
    with torch.inference_mode():
        repeated = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            num_return_sequences=4,
            do_sample=True,
            **GENERATE,
        )
    torch.manual_seed(0)
    shared = generate_from_shared_prefill(model, input_ids, attention_mask, 4, do_sample=True, **GENERATE)
    assert_same_steps(shared, repeated)


def test_greedy_from_a_shared_prompt_cache_equals_greedy_from_the_prompts(model):
    input_ids, attention_mask = left_padded(PROMPTS, PAD)
    with torch.inference_mode():
        single = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **GENERATE
        )
    shared = generate_from_shared_prefill(model, input_ids, attention_mask, 4, do_sample=False, **GENERATE)
    copies = SimpleNamespace(
        sequences=single.sequences.repeat_interleave(4, dim=0),
        logits=[logits.repeat_interleave(4, dim=0) for logits in single.logits],
    )
    assert_same_steps(shared, copies)


def test_greedy_asks_for_one_sample(model):
    with pytest.raises(ValueError, match="num_samples"):
        sample(model, do_sample=False, num_samples=4)


@pytest.mark.parametrize("num_samples, do_sample", [(2, True), (1, False)])
def test_layer_inputs_are_what_a_fresh_forward_feeds_that_layer(model, num_samples, do_sample):
    """Recorded while sampling (a shared prefill, then one position a step), each sample's states at
    the prompt and its completion but the last token equal the layer's input in one forward pass."""
    plain = sample(model, num_samples=num_samples, do_sample=do_sample, return_logps=True)
    samples, logps, states = sample(
        model, num_samples=num_samples, do_sample=do_sample, return_logps=True, layer_inputs=1
    )
    assert (samples, logps) == plain, "recording must not change what is sampled"
    for prompt, group, group_states in zip(PROMPTS, samples, states, strict=True):
        for completion, recorded in zip(group, group_states, strict=True):
            with torch.no_grad():
                fresh = model(torch.tensor([prompt + completion]), output_hidden_states=True)
            expected = fresh.hidden_states[1][0, : len(prompt) + len(completion) - 1]
            assert recorded.shape == expected.shape
            assert torch.allclose(recorded, expected, atol=1e-5)


def test_layer_inputs_need_the_sampling_logps(model):
    with pytest.raises(ValueError, match="layer_inputs"):
        sample(model, layer_inputs=1)
