"""Batched KV-cache sampling, bucketed by prompt length so batches carry little padding, each prompt
prefilled once for all its samples."""

import gc
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from directalign.logprobs import batched_completion_logps, gather_token_logps
from directalign.prompt_cache import (
    PromptCache,
    cached_completion_logps,
    cached_prompt_prefill,
    left_padded,
    mask_positions,
)
from directalign.trunk import LayerInputs, shared_trunk_layer, top_layers_completion_logps


# no_grad, not inference_mode: FSDP2 allocates the storage of a layer's gathered weights once and
# reuses it, and storage allocated in inference mode refuses the in-place gathers of the next training step.
@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[list[int]],
    *,
    num_samples: int,
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str = "generate",
    return_logps: bool = False,
    synced_gpus: bool = False,
    layer_inputs: int | None = None,
    prompt_cache: PromptCache | None = None,
) -> list[list[list[int]]] | tuple:
    """``num_samples`` completions per prompt, each cut after its first eos (kept, as in training).

    Prompts are sorted by length and batched, then the results are put back in prompt order.
    Each prompt is prefilled once and its KV cache shared by its ``num_samples`` samples
    (``shared_prompt_cache``), rather than ``num_return_sequences`` prefilling every copy.
    With ``return_logps`` it also returns the sampling model's per-token log-probs (at
    temperature 1, from the raw logits), which spares a second forward pass over the samples.
    ``synced_gpus`` keeps every rank stepping until all are done, which FSDP's sharded layers need.
    With ``layer_inputs`` (and ``return_logps``) it also returns, for each sample, the hidden states that
    entered that decoder layer at the prompt's tokens and the completion's but its last (``[p + c - 1,
    H]``, as recorded while sampling): what the layers above need to score the sample again.
    With ``prompt_cache`` (``prompt_cache.py``: built by a model whose layers below its ``first_layer``
    are this model's), each prompt's prefill runs only the layers from ``first_layer`` up.
    """
    if num_samples > 1 and not do_sample:
        raise ValueError(f"greedy decoding gives one completion per prompt, not num_samples={num_samples}")
    if layer_inputs is not None and (synced_gpus or not return_logps):
        raise ValueError(
            "layer_inputs needs return_logps and no synced_gpus (whose extra steps it would record)"
        )
    if prompt_cache is not None and not prompt_cache.covers(prompt_ids):
        raise ValueError("prompt_cache holds no entry for some of the prompts to sample")
    if prompt_cache is not None and layer_inputs is not None and layer_inputs < prompt_cache.first_layer:
        raise ValueError(
            f"layer_inputs={layer_inputs} lies in the trunk that prompt_cache skips (below layer"
            f" {prompt_cache.first_layer})"
        )
    model.eval()
    device = next(model.parameters()).device
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[list[int]]] = [[] for _ in prompt_ids]
    logps: list[list[list[float]]] = [[] for _ in prompt_ids]
    states: list[list[torch.Tensor]] = [[] for _ in prompt_ids]
    generator_seed = torch.Generator().manual_seed(seed)
    share_prefill = num_samples > 1 or prompt_cache is not None
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        rows = order[start : start + batch_size]
        # A shared prefill caches every column but the last, so it needs two: a batch of one-token prompts
        # gets a masked pad column rather than skipping that forward, which FSDP ranks must all run.
        batch_prompts = [prompt_ids[i] for i in rows]
        input_ids, attention_mask = left_padded(batch_prompts, pad_id, min_width=2 if share_prefill else 1)
        width = input_ids.shape[1]
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        recorder = LayerInputs(model, layer_inputs) if layer_inputs is not None else nullcontext()
        with recorder:
            if prompt_cache is not None:
                prefill = cached_prompt_prefill(
                    model, prompt_cache, batch_prompts, attention_mask, num_samples
                )
            elif share_prefill:
                prefill = shared_prompt_cache(model, input_ids, attention_mask, num_samples)
            else:
                prefill = None
            torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator_seed)))
            step_logps = SampledTokenLogps() if return_logps else None
            output = model.generate(
                return_dict_in_generate=True,
                logits_processor=sampling_processors(step_logps, do_sample, temperature, top_p),
                do_sample=do_sample,
                input_ids=input_ids.repeat_interleave(num_samples, dim=0),
                attention_mask=attention_mask.repeat_interleave(num_samples, dim=0),
                cache=prefill,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                top_k=None,
                synced_gpus=synced_gpus,
                # The warpers come in logits_processor; these keep the model's generation_config out.
                **({"temperature": 1.0, "top_p": 1.0} if do_sample else {}),
            )
        sequences = output.sequences[:, width:].cpu()
        if return_logps:
            token_logps = step_logps.finish(output.sequences, sequences.shape[1]).cpu()
        if layer_inputs is not None:
            batch_states = recorded_states(recorder, num_samples if share_prefill else 1, output.sequences)
        for j, sequence in enumerate(sequences):
            completion = cut_after_eos(sequence.tolist(), eos_id)
            results[rows[j // num_samples]].append(completion)
            if return_logps:
                logps[rows[j // num_samples]].append(token_logps[j, : len(completion)].tolist())
            if layer_inputs is not None:
                prompt_length = len(prompt_ids[rows[j // num_samples]])
                span = slice(width - prompt_length, width + len(completion) - 1)
                states[rows[j // num_samples]].append(batch_states[j, span].clone())
    if layer_inputs is not None:
        return results, logps, states
    return (results, logps) if return_logps else results


class SampledTokenLogps(LogitsProcessor):
    """The log-prob of each sampled token under the raw logits (temperature 1), gathered one step late:
    a step's logits are kept until the next step's ``input_ids`` show which token was drawn from them.
    Only one step's ``[R, V]`` logits are held at a time, where ``output_logits`` would hold them all
    and stack them again to gather (~0.5 GB at an evaluation batch of 128 rows x 20 steps).
    It must run before any warper, on the logits the model returned."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.pending is not None:
            self.steps.append(gather_token_logps(self.pending, input_ids[:, -1]))
        self.pending = scores
        return scores

    def finish(self, sequences: torch.Tensor, generated: int) -> torch.Tensor:
        """``[R, T]`` log-probs of the ``T = generated`` last tokens of ``sequences``, the last one read off
        them (unless a step ``generate`` ran and undid already showed it)."""
        if len(self.steps) < generated:
            self.steps.append(gather_token_logps(self.pending, sequences[:, -1]))
        self.pending = None
        return torch.stack(self.steps[:generated], dim=1)


def sampling_processors(
    token_logps: SampledTokenLogps | None, do_sample: bool, temperature: float, top_p: float
) -> LogitsProcessorList:
    """``generate``'s processors: the log-prob recorder first, on the raw logits, then the warpers that
    ``generate`` itself would build from ``temperature`` and ``top_p``, in its order. Passing them here
    rather than as ``generate``'s arguments keeps the recorder ahead of them."""
    processors = LogitsProcessorList([token_logps] if token_logps is not None else [])
    if do_sample and temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if do_sample and top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def recorded_states(recorder: LayerInputs, prefill_copies: int, sequences: torch.Tensor) -> torch.Tensor:
    """The states ``LayerInputs`` recorded over one ``generate`` call, ``[R, T - 1, H]`` for its ``[R, T]``
    sequences: the prefill's rows repeated ``prefill_copies`` times (a shared prompt cache), then every
    step's position. Refuses a record of another length (a forward that was not one of the sampling's)."""
    first, *steps = recorder.chunks
    joined = torch.cat([first.repeat_interleave(prefill_copies, dim=0), *steps], dim=1)
    if joined.shape[:2] != (sequences.shape[0], sequences.shape[1] - 1):
        raise RuntimeError(
            f"recorded layer inputs {tuple(joined.shape[:2])} do not fit sequences {tuple(sequences.shape)}"
        )
    return joined


def shared_prompt_cache(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int
) -> DynamicCache:
    """The KV cache of each left-padded prompt but its last token, computed once and repeated ``copies``
    times in the batch dimension (each prompt's copies side by side, as ``num_return_sequences`` lays
    them out).

    The last token stays out because ``generate`` must run at least one uncached input position: that
    step yields the first sampled token's logits. Position ids follow the mask, as ``generate`` sets them.
    """
    prefix_mask = attention_mask[:, :-1]
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    model(
        input_ids=input_ids[:, :-1],
        attention_mask=prefix_mask,
        position_ids=mask_positions(prefix_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(copies)
    return cache


def release_accelerator_memory() -> None:
    """Hand freed GPU memory back once a stage is done sampling, for its scorer (or Lightning)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cut_after_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


# One sample: its completion and its summed log-ratio to the reference (0 for the reference itself).
Draw = tuple[list[int], float]


def sample_with_reference(
    model: PreTrainedModel,
    ref_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    num_samples: int,
    seed: int,
    batch_size: int,
    prompt_cache: PromptCache | None = None,
    **sampling: Any,
) -> tuple[list, list, list]:
    """``num_samples`` completions per prompt with the policy's and the reference's per-token log-probs
    of each (three lists of groups, a group a prompt).

    When the two models share a trunk (``trunk.shared_trunk_layer``: an aligned policy with LoRA on the
    top layers and its SFT model), the reference runs only its layers above it, on the hidden states
    the policy computed there while sampling; otherwise a whole forward pass. A ``prompt_cache`` built by
    ``ref_model`` at that layer (``prompt_cache.py``) spares both models their passes over the prompts."""
    layer = shared_trunk_layer(model, ref_model)
    if prompt_cache is not None and prompt_cache.first_layer != layer:
        raise ValueError(
            f"prompt_cache was built at layer {prompt_cache.first_layer}, but the policy and its reference"
            f" share their layers below {layer}"
        )
    sampled = sample_completions(
        model,
        tokenizer,
        prompts,
        num_samples=num_samples,
        batch_size=batch_size,
        seed=seed,
        return_logps=True,
        layer_inputs=layer,
        prompt_cache=prompt_cache,
        **sampling,
    )
    samples, sample_logps = sampled[:2]
    flat_prompts = [prompt for prompt, group in zip(prompts, samples, strict=True) for _ in group]
    flat = [c for group in samples for c in group]
    pad_id = tokenizer.pad_token_id
    if layer is None:
        ref_logps = batched_completion_logps(ref_model, flat_prompts, flat, pad_id, batch_size)
    elif prompt_cache is not None:
        states = [s for group in sampled[2] for s in group]
        ref_logps = cached_completion_logps(ref_model, prompt_cache, flat_prompts, flat, states, batch_size)
    else:
        states = [s for group in sampled[2] for s in group]
        ref_logps = top_layers_completion_logps(
            ref_model, layer, flat_prompts, flat, states, pad_id, batch_size
        )
    ref = iter(ref_logps)
    return samples, sample_logps, [[next(ref) for _ in group] for group in samples]


def sampled_logratios(
    model: PreTrainedModel,
    ref_model: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    num_samples: int,
    seed: int,
    batch_size: int,
    prompt_cache: PromptCache | None = None,
    **sampling: Any,
) -> list[list[Draw]]:
    """``num_samples`` completions per prompt and ``log pi(y) - log pi_ref(y)`` summed over each: on the
    policy's own temperature-1 samples its mean estimates KL(pi || pi_ref) without bias. The reference's
    log-probs come as ``sample_with_reference`` computes them; no reference: every log-ratio 0."""
    options = {"num_samples": num_samples, "seed": seed, "batch_size": batch_size} | sampling
    if ref_model is None and prompt_cache is not None:
        raise ValueError("a prompt_cache serves a policy and its reference; there is no reference here")
    if ref_model is None:
        samples = sample_completions(model, tokenizer, prompts, return_logps=True, **options)[0]
        return [[(c, 0.0) for c in group] for group in samples]
    samples, sample_logps, ref_logps = sample_with_reference(
        model, ref_model, tokenizer, prompts, prompt_cache=prompt_cache, **options
    )
    return [
        [(c, float(sum(logps) - sum(ref))) for c, logps, ref in zip(*groups, strict=True)]
        for groups in zip(samples, sample_logps, ref_logps, strict=True)
    ]
