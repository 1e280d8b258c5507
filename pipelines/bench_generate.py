"""Sampling throughput of the generate stage: `python pipelines/bench_generate.py` (`make bench`).

``bucketed`` is ``generation.sample_completions`` as the stages call it: prompts sorted by length,
then batched, so a batch pads little. ``arrival_order`` batches the same prompts as they come (each
batch handed to sample_completions on its own). Both sample ``num_samples`` completions per prompt
with the KV cache; a random-init model hardly ever emits eos, so every completion has ``new_tokens``
tokens and tokens/s counts generated tokens only. Medians over ``repeats`` runs after a warm-up.

At ``prefill_samples`` (K) completions a prompt, ``prefill_once`` (``sample_completions``: each prompt
prefilled once, its KV cache copied to its K samples) runs against ``repeated_prefill``, the path it
replaced and which the library no longer has (``benchmarking.repeated_prefill_samples``, also the
tests' oracle): ``generate`` with ``num_return_sequences``, which repeats each prompt K times and
prefills every copy. Same prompts, same batches (by length), same tokens counted.
"""

import random
import statistics

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from directalign.benchmarking import (
    benchmark_architecture,
    repeated_prefill_samples,
    resolve_device,
    time_calls,
)
from directalign.generation import sample_completions


def padded_fraction(prompts: list[list[int]], batches: list[list[int]]) -> float:
    """Share of the prompt positions in the batches that are padding."""
    padded = sum(len(b) * max(len(prompts[i]) for i in b) for b in batches)
    return 1 - sum(len(p) for p in prompts) / padded


def timed(sample, device: str, repeats: int) -> tuple[float, int]:
    """Median wall seconds of ``sample()``, and the tokens its last run generated."""
    timing = time_calls(sample, device, repeats)
    return statistics.median(timing.seconds), sum(len(c) for group in timing.result for c in group)


@hydra.main(config_path="../conf", config_name="bench_generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from transformers import AutoModelForCausalLM

    plain = OmegaConf.to_container(cfg, resolve=True)
    device = resolve_device(cfg.device)
    config, tokenizer = benchmark_architecture(plain)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config).to(device).eval()
    rng = random.Random(cfg.seed)
    low, high = cfg.prompt_tokens
    lengths = [rng.randint(low, high) for _ in range(cfg.prompts)]
    prompts = [[rng.randrange(100, config.vocab_size) for _ in range(n)] for n in lengths]
    size = cfg.batch_size

    def run(batch: list[list[int]]) -> list[list[list[int]]]:
        return sample_completions(
            model,
            tokenizer,
            batch,
            num_samples=cfg.num_samples,
            max_new_tokens=cfg.new_tokens,
            batch_size=size,
            do_sample=True,
            seed=cfg.seed,
            desc="bench",
        )

    def arrival_order() -> list[list[list[int]]]:
        return [s for start in range(0, len(prompts), size) for s in run(prompts[start : start + size])]

    run(prompts[:size])  # warm-up
    by_length = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results = {
        "bucketed": (*timed(lambda: run(prompts), device, cfg.repeats), by_length),
        "arrival_order": (*timed(arrival_order, device, cfg.repeats), list(range(len(prompts)))),
    }
    print(f"device={device} prompts={len(prompts)} x {cfg.num_samples} samples")
    rates = {}
    for name, (seconds, generated, order) in results.items():
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        rates[name] = generated / seconds
        print(
            f"{name}: {rates[name]:.1f} tokens/s ({generated} tokens in {seconds:.1f} s),"
            f" prompt padding {padded_fraction(prompts, batches):.0%}"
        )
    speedup = rates["bucketed"] / rates["arrival_order"]
    print(f"generate_tokens_per_s bucketed={rates['bucketed']:.1f} speedup={speedup:.2f}")

    k, few = cfg.prefill_samples, prompts[: cfg.prefill_prompts]
    sampling = {"num_samples": k, "max_new_tokens": cfg.new_tokens, "batch_size": size, "seed": cfg.seed}
    paths = {
        "prefill_once": lambda: sample_completions(
            model, tokenizer, few, do_sample=True, desc="bench", **sampling
        ),
        "repeated_prefill": lambda: repeated_prefill_samples(
            model, few, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, **sampling
        ),
    }
    print(f"{len(few)} prompts x {k} samples")
    k_rates = {}
    for name, sample in paths.items():
        seconds, generated = timed(sample, device, cfg.repeats)
        k_rates[name] = generated / seconds
        print(f"{name}: {k_rates[name]:.1f} tokens/s ({generated} tokens in {seconds:.1f} s)")
    once, repeated = k_rates["prefill_once"], k_rates["repeated_prefill"]
    print(
        f"generate_tokens_per_s K={k} prefill_once={once:.1f} repeated_prefill={repeated:.1f}"
        f" ratio={once / repeated:.2f}"
    )


if __name__ == "__main__":
    main()
