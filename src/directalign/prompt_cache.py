"""The reference model's work on each evaluation prompt, done once for every policy evaluated on it.

An aligned policy with LoRA on layers ``L`` and up shares its SFT model's trunk (``trunk.py``), and
the SFT model is the reference its KL is measured against. So on a prompt, every policy's KV cache at
layers ``0 .. L-1`` is the SFT model's, the hidden states entering layer ``L`` are the SFT model's, and
the reference's whole KV cache is the SFT model's: none depends on the policy. ``PromptCache`` holds
them for each prompt (all its tokens but the last, which ``generate`` must still feed); a policy's
prefill then runs only its top layers (``cached_prompt_prefill``), and the reference's log-probs of a
sample run only its top layers on the completion (``cached_completion_logps``). Evaluating twelve
policies on the same prompts, that is two of the three passes over every prompt saved per policy.
"""

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache

from directalign.logprobs import gather_token_logps
from directalign.trunk import LayerInputs, TopLayers, causal_lm


@dataclass(frozen=True, eq=False)
class PromptCache:
    """For each prompt (its token ids as a tuple), the reference's keys and values at every layer over the
    prompt's tokens but its last (``[layers, 2, kv_heads, p - 1, head_dim]``) and the hidden states
    entering ``first_layer`` at those tokens (``[p - 1, H]``)."""

    first_layer: int
    key_values: dict[tuple[int, ...], torch.Tensor]
    states: dict[tuple[int, ...], torch.Tensor]

    def covers(self, prompts: list[list[int]]) -> bool:
        return all(tuple(prompt) in self.key_values for prompt in prompts)


def left_padded(
    prompts: list[list[int]], pad_id: int, min_width: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts left-padded to the batch's width and their attention mask, the layout sampling uses. Two
    columns at least where a prefill caches all but the last: a one-token prompt's prefix is then a
    masked pad column."""
    width = max([min_width] + [len(prompt) for prompt in prompts])
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that follow a left-padded mask, as ``generate`` sets them."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def build_prompt_cache(
    reference: PreTrainedModel, prompts: list[list[int]], first_layer: int, pad_id: int, batch_size: int
) -> PromptCache:
    """The reference's ``PromptCache`` of ``prompts``, batched by length like the sampling."""
    reference.eval()
    device = next(reference.parameters()).device
    unique = sorted({tuple(prompt) for prompt in prompts}, key=len)
    key_values, states = {}, {}
    for start in range(0, len(unique), batch_size):
        batch = unique[start : start + batch_size]
        input_ids, attention_mask = left_padded([list(p) for p in batch], pad_id)
        width = input_ids.shape[1]
        prefix_mask = attention_mask[:, :-1].to(device)
        cache = DynamicCache(config=causal_lm(reference).config)
        with LayerInputs(reference, first_layer) as recorder:
            reference(
                input_ids=input_ids[:, :-1].to(device),
                attention_mask=prefix_mask,
                position_ids=mask_positions(prefix_mask),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        stacked = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
        for row, prompt in enumerate(batch):
            span = slice(width - len(prompt), width - 1)
            key_values[prompt] = stacked[:, :, row, :, span].cpu().clone()
            states[prompt] = recorder.chunks[0][row, span].cpu().clone()
    return PromptCache(first_layer, key_values, states)


def padded_cache_rows(
    prompt_cache: PromptCache, prompts: list[list[int]], width: int, layers: range, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values of ``layers`` for a batch of prompts, left-padded to ``width - 1`` columns (the
    pad columns are zeros, masked wherever they are read)."""
    first = prompt_cache.key_values[tuple(prompts[0])]
    _, _, kv_heads, _, head_dim = first.shape
    keys = first.new_zeros(len(layers), len(prompts), kv_heads, width - 1, head_dim)
    values = torch.zeros_like(keys)
    for row, prompt in enumerate(prompts):
        if len(prompt) > 1:
            stored = prompt_cache.key_values[tuple(prompt)][layers.start : layers.stop]
            keys[:, row, :, width - len(prompt) :] = stored[:, 0]
            values[:, row, :, width - len(prompt) :] = stored[:, 1]
    return list(keys.to(device).unbind(0)), list(values.to(device).unbind(0))


def cached_prompt_prefill(
    model: PreTrainedModel,
    prompt_cache: PromptCache,
    prompts: list[list[int]],
    attention_mask: torch.Tensor,
    copies: int,
) -> Cache:
    """What ``generation.shared_prompt_cache`` computes for a policy that shares the cache's trunk: its
    KV cache of each prompt (left-padded as ``attention_mask`` says) but its last token, ``copies`` times,
    running only its layers ``first_layer`` and up on the stored states (layers below are the stored
    ones)."""
    device, width = attention_mask.device, attention_mask.shape[1]
    first_layer = prompt_cache.first_layer
    cache = DynamicCache(config=causal_lm(model).config)
    keys, values = padded_cache_rows(prompt_cache, prompts, width, range(0, first_layer), device)
    for layer, (key, value) in enumerate(zip(keys, values, strict=True)):
        cache.update(key, value, layer)
    rows = [prompt_cache.states[tuple(prompt)] for prompt in prompts]
    states = rows[0].new_zeros(len(prompts), width - 1, rows[0].shape[-1])
    for row, (prompt, stored) in enumerate(zip(prompts, rows, strict=True)):
        states[row, width - len(prompt) :] = stored
    prefix_mask = attention_mask[:, :-1]
    TopLayers(model, first_layer)(
        inputs_embeds=states.to(device),
        attention_mask=prefix_mask,
        position_ids=mask_positions(prefix_mask),
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_repeat_interleave(copies)
    return cache


@torch.inference_mode()
def cached_completion_logps(
    reference: PreTrainedModel,
    prompt_cache: PromptCache,
    prompts: list[list[int]],
    completions: list[list[int]],
    states: list[torch.Tensor],
    batch_size: int,
) -> list[list[float]]:
    """The reference's per-token log-probs of each completion given its prompt, as
    ``trunk.top_layers_completion_logps`` computes them, running its top layers only at the completion's
    positions on the cached prompt: ``states[i]`` holds the hidden states entering ``first_layer`` at the
    prompt's last token and the completion's tokens but its last (its last ``c`` rows of what sampling
    recorded). ``reference`` must be the model that built the cache."""
    first_layer, top = prompt_cache.first_layer, TopLayers(reference, prompt_cache.first_layer)
    device = next(reference.parameters()).device
    layers = range(first_layer, causal_lm(reference).config.num_hidden_layers)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        batch_prompts, batch_completions = prompts[chunk], completions[chunk]
        prefix_mask = left_padded(batch_prompts, 0)[1][:, :-1]
        width, length = prefix_mask.shape[1] + 1, max(len(c) for c in batch_completions)
        completion_mask = torch.zeros(len(batch_prompts), length, dtype=torch.long)
        inputs = states[start].new_zeros(len(batch_prompts), length, states[start].shape[-1])
        targets = torch.zeros(len(batch_prompts), length, dtype=torch.long)
        for row, (completion, rows) in enumerate(zip(batch_completions, states[chunk], strict=True)):
            completion_mask[row, : len(completion)] = 1
            inputs[row, : len(completion)] = rows[len(rows) - len(completion) :]
            targets[row, : len(completion)] = torch.tensor(completion)
        cache = DynamicCache(config=causal_lm(reference).config)
        keys, values = padded_cache_rows(prompt_cache, batch_prompts, width, layers, device)
        for layer, key, value in zip(layers, keys, values, strict=True):
            cache.update(key, value, layer)
        prompt_lengths = prefix_mask.sum(-1, keepdim=True)
        positions = prompt_lengths + torch.arange(length).unsqueeze(0)
        logits = top(
            inputs_embeds=inputs.to(device),
            attention_mask=torch.cat([prefix_mask, completion_mask], dim=1).to(device),
            position_ids=positions.to(device),
            cache=cache,
        ).logits
        logps = gather_token_logps(logits, targets.to(device)).cpu()
        out.extend(row[: len(c)].tolist() for row, c in zip(logps, batch_completions, strict=True))
    return out
