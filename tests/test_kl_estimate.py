"""The evaluation's KL estimator: the mean summed log-ratio on the policy's own temperature-1 samples
equals KL(policy || reference) computed exactly by enumerating every completion of a tiny model."""

import itertools
import math

import pytest
import torch

from directalign.generation import sample_completions, sample_with_reference, sampled_logratios
from directalign.logprobs import batched_completion_logps
from directalign.trunk import shared_trunk_layer
from tests.conftest import tiny_llama

VOCAB, EOS, PAD, MAX_NEW = 5, 1, 0, 2
PROMPT = [3, 4, 2]


class TinyTokenizer:
    eos_token_id, pad_token_id = EOS, PAD


def completion_logprob(model, completion: list[int]) -> float:
    """log p(completion | PROMPT) under the model's raw softmax (temperature 1)."""
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + completion])).logits[0].double()
    logps = torch.log_softmax(logits, dim=-1)
    return sum(float(logps[len(PROMPT) - 1 + t, token]) for t, token in enumerate(completion))


def every_completion() -> list[list[int]]:
    """Every sequence generation can return: cut after eos, or at MAX_NEW tokens."""
    ends = [[EOS]]
    more = [list(c) for c in itertools.product(range(VOCAB), repeat=MAX_NEW) if c[0] != EOS]
    return ends + more


def test_sampled_logratio_estimates_the_exact_kl():
    policy = tiny_llama(vocab_size=VOCAB)
    reference = tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():  # a reference near the policy, as SFT is to an aligned policy
        for weight in reference.parameters():
            weight.add_(0.3 * torch.randn_like(weight))
    completions = every_completion()
    policy_logps = [completion_logprob(policy, c) for c in completions]
    assert math.isclose(sum(math.exp(lp) for lp in policy_logps), 1.0, rel_tol=1e-6)
    exact = sum(
        math.exp(lp) * (lp - completion_logprob(reference, c))
        for lp, c in zip(policy_logps, completions, strict=True)
    )

    draws = sampled_logratios(
        policy,
        reference,
        TinyTokenizer(),
        [PROMPT] * 500,
        num_samples=8,
        seed=0,
        batch_size=250,
        max_new_tokens=MAX_NEW,
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
    )
    values = torch.tensor([value for group in draws for _, value in group], dtype=torch.float64)
    estimate, error = values.mean().item(), (values.std() / math.sqrt(values.numel())).item()
    assert exact > 0.05, "the two models must differ for the test to mean anything"
    assert abs(estimate - exact) < 4 * error, (estimate, exact, error)
    assert error < 0.1 * exact


def trunk_sharing_pair() -> tuple:
    """A policy that differs from its reference above layer 1 only, as LoRA on the top layers makes it."""
    reference = tiny_llama(vocab_size=VOCAB)
    policy = tiny_llama(vocab_size=VOCAB)
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            if name.startswith("model.layers.1."):
                weight.add_(0.3 * torch.randn_like(weight))
    assert shared_trunk_layer(policy, reference) == 1
    return policy, reference


def test_a_shared_trunk_gives_the_whole_forward_logratios():
    """A policy that differs from its reference above layer 1 only (LoRA on the top layers): the
    reference then runs layer 1 alone on the policy's recorded states, and the log-ratios equal those
    of the reference's whole forward pass on the same samples."""
    policy, reference = trunk_sharing_pair()
    prompts = [PROMPT, [2, 3], [4]] * 3
    options = {"num_samples": 2, "seed": 0, "batch_size": 4, "max_new_tokens": 4, "do_sample": True}
    draws = sampled_logratios(policy, reference, TinyTokenizer(), prompts, **options)
    samples, logps = sample_completions(policy, TinyTokenizer(), prompts, return_logps=True, **options)
    flat_prompts = [p for p, group in zip(prompts, samples, strict=True) for _ in group]
    flat = [c for group in samples for c in group]
    ref = iter(batched_completion_logps(reference, flat_prompts, flat, PAD, batch_size=4))
    for group, group_samples, group_logps in zip(draws, samples, logps, strict=True):
        for (completion, logratio), sample, sample_logps in zip(
            group, group_samples, group_logps, strict=True
        ):
            assert completion == sample
            assert math.isclose(logratio, sum(sample_logps) - sum(next(ref)), abs_tol=1e-5)
    assert any(abs(value) > 0.01 for group in draws for _, value in group)


def test_the_reference_log_probs_of_a_shared_trunk_are_the_whole_forward_ones_token_by_token():
    """What a later round stores as SFT's reference (``sample_with_reference``, the generate stage's
    path): on a policy that shares its reference's trunk, the reference's per-token log-probs from its top
    layer on the recorded states equal its whole forward pass's, and the samples are the policy's own."""
    policy, reference = trunk_sharing_pair()
    prompts = [PROMPT, [2, 3], [4]] * 3
    options = {"num_samples": 2, "seed": 0, "batch_size": 4, "max_new_tokens": 4, "do_sample": True}
    samples, sample_logps, ref_logps = sample_with_reference(
        policy, reference, TinyTokenizer(), prompts, **options
    )
    own, own_logps = sample_completions(policy, TinyTokenizer(), prompts, return_logps=True, **options)
    assert samples == own and sample_logps == own_logps
    flat_prompts = [p for p, group in zip(prompts, samples, strict=True) for _ in group]
    whole = batched_completion_logps(
        reference, flat_prompts, [c for g in samples for c in g], PAD, batch_size=4
    )
    stored = [logps for group in ref_logps for logps in group]
    assert len(stored) == len(whole)
    for ours, theirs in zip(stored, whole, strict=True):
        assert ours == pytest.approx(theirs, abs=1e-5)
    assert any(
        abs(a - b) > 0.01
        for s, r in zip(sample_logps, ref_logps, strict=True)
        for x, y in zip(s, r, strict=True)
        for a, b in zip(x, y, strict=True)
    )
