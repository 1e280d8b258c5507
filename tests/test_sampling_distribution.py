"""Every sampling path of ``generation.sample_completions`` draws from the policy's own distribution:
sample frequencies on a tiny model against the exact probabilities of every completion, enumerated
(a chi-square test at a fixed seed), and a control showing the test rejects a wrong distribution."""

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from directalign.generation import sample_completions
from directalign.prompt_cache import build_prompt_cache
from tests.conftest import tiny_llama

EOS, PAD, VOCAB, NEW_TOKENS = 1, 0, 6, 2
TOKENIZER = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
# Two prompts of different lengths, so batches are left-padded.
PROMPTS = [[2, 3, 4], [5]]
SAMPLES = 1600  # of each prompt's distribution
ALPHA = 1e-3


@pytest.fixture(scope="module")
def model():
    """tiny_llama with its LM head scaled up: a random init is near uniform over the vocabulary, which a
    sampler ignoring the logits would also match."""
    model = tiny_llama(vocab_size=VOCAB, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def completions() -> list[tuple[int, ...]]:
    """Every completion of at most NEW_TOKENS tokens that ends at its first eos or at the budget."""
    others = [t for t in range(VOCAB) if t != EOS]
    return [(EOS,)] + [(a, b) for a, b in itertools.product(others, range(VOCAB))]


@torch.no_grad()
def exact_probabilities(model, prompt: list[int], temperature: float, top_p: float) -> np.ndarray:
    """P(completion | prompt) for ``completions()``, from the model's next-token distributions after
    ``generate``'s own warpers (temperature, then top-p)."""

    def next_token(prefix: list[int]) -> torch.Tensor:
        scores = model(input_ids=torch.tensor([prefix])).logits[:, -1].float()
        scores = TemperatureLogitsWarper(temperature)(None, scores) if temperature != 1.0 else scores
        scores = TopPLogitsWarper(top_p)(None, scores) if top_p < 1.0 else scores
        return torch.softmax(scores, dim=-1)[0]

    first = next_token(prompt)
    probabilities = []
    for completion in completions():
        p = first[completion[0]]
        if len(completion) > 1:
            p = p * next_token(prompt + [completion[0]])[completion[1]]
        probabilities.append(float(p))
    return np.array(probabilities)


def chi_square_p(observed: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's test of counts against probabilities, the cells expecting fewer than 5 pooled into one.
    A completion of probability 0 (cut by top-p) drawn even once fails outright."""
    possible = probabilities > 0
    if observed[~possible].sum() > 0:
        return 0.0
    observed, probabilities = observed[possible], probabilities[possible]
    expected = probabilities / probabilities.sum() * observed.sum()
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(chisquare(observed, expected).pvalue)


def copies(num_samples: int) -> int:
    """Copies of each prompt in the batch: SAMPLES of each distribution in all."""
    return SAMPLES // num_samples


def sampled_counts(model, **options) -> list[np.ndarray]:
    """Counts of each of ``completions()`` among the samples of each prompt, from one call."""
    n = copies(options["num_samples"])
    if "cache_layer" in options:  # sample from the model's own prompt cache, built at that layer
        options = dict(options)
        layer = options.pop("cache_layer")
        options["prompt_cache"] = build_prompt_cache(model, PROMPTS, layer, PAD, batch_size=2)
    samples = sample_completions(
        model,
        TOKENIZER,
        [PROMPTS[0]] * n + [PROMPTS[1]] * n,
        max_new_tokens=NEW_TOKENS,
        do_sample=True,
        seed=0,
        desc="test",
        **options,
    )
    if isinstance(samples, tuple):
        samples = samples[0]
    index = {c: i for i, c in enumerate(completions())}
    counts = [np.zeros(len(index)) for _ in PROMPTS]
    for row, group in enumerate(samples):
        for completion in group:
            counts[row // n][index[tuple(completion)]] += 1
    return counts


# Each path the stages take: one sample a prompt (no shared prefill), K from one shared prefill, the
# log-prob recorder among the processors, the trunk recorder (evaluation), the prefill from the
# reference's prompt cache (evaluation of a policy sharing its trunk), temperature, and top-p.
PATHS = {
    "one_sample": {"num_samples": 1, "batch_size": 200},
    "shared_prefill": {"num_samples": 8, "batch_size": 50},
    "logps": {"num_samples": 8, "batch_size": 50, "return_logps": True},
    "layer_inputs": {"num_samples": 8, "batch_size": 50, "return_logps": True, "layer_inputs": 1},
    "prompt_cache": {
        "num_samples": 8,
        "batch_size": 50,
        "return_logps": True,
        "layer_inputs": 1,
        "cache_layer": 1,
    },
    "temperature": {"num_samples": 8, "batch_size": 50, "return_logps": True, "temperature": 0.7},
    "top_p": {"num_samples": 8, "batch_size": 50, "return_logps": True, "temperature": 1.3, "top_p": 0.8},
}


@pytest.mark.parametrize("path", PATHS)
def test_samples_follow_the_exact_distribution(model, path):
    options = PATHS[path]
    for prompt, counts in zip(PROMPTS, sampled_counts(model, **options), strict=True):
        assert counts.sum() == SAMPLES
        exact = exact_probabilities(model, prompt, options.get("temperature", 1.0), options.get("top_p", 1.0))
        assert exact.max() < 0.5 and (exact > 0.02).sum() >= 6, "the test distribution is too flat or peaked"
        assert chi_square_p(counts, exact) > ALPHA, (path, prompt)


def test_the_test_rejects_a_wrong_distribution(model):
    """The controls: samples at temperature 0.7 against temperature 1's probabilities, and samples cut by
    top-p against the uncut distribution."""
    counts = sampled_counts(model, **PATHS["temperature"])[0]
    assert chi_square_p(counts, exact_probabilities(model, PROMPTS[0], 1.0, 1.0)) < ALPHA
    counts = sampled_counts(model, **PATHS["top_p"])[0]
    assert chi_square_p(counts, exact_probabilities(model, PROMPTS[0], 1.3, 1.0)) < ALPHA
