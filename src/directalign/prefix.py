"""Prompt sharing: each pair's prompt runs through the model once, for both of its completions.

A pair batch (``collate_pairs``) holds ``2B`` rows: the ``a`` completions, then the ``b`` completions,
each behind a copy of the same left-padded prompt. The plain path runs the prompt twice; here the
``B`` prompts run once with a KV cache, the cache is tiled to ``2B`` rows, and only the completion
tokens run on top of it. With prompts of ~96 tokens and completions of ~32 that is ~40% fewer
token passes. Gradients reach the prompt's computation through the cached keys and values, so the
loss and its gradients are those of the plain path (``tests/test_prefix.py``).
"""

import torch
from transformers import PreTrainedModel

from directalign.logprobs import gather_token_logps


def shared_prompt_completion_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
) -> torch.Tensor:
    """Per-token log-probs ``[2B, C]`` of the completions of a pair batch, as ``completion_logps``.

    The last prompt position predicts the first completion token; the completion tokens but the
    last are fed on top of the prompt's cache and predict the rest, so the last completion token
    is never an input. Raises ``ValueError`` if the two halves of the batch do not share prompts.
    """
    pairs, prompt_width = input_ids.shape[0] // 2, input_ids.shape[1] - completion_width
    prompt_ids, prompt_mask = input_ids[:pairs, :prompt_width], attention_mask[:pairs, :prompt_width]
    if input_ids.shape[0] % 2 or not (
        torch.equal(prompt_ids, input_ids[pairs:, :prompt_width])
        and torch.equal(prompt_mask, attention_mask[pairs:, :prompt_width])
    ):
        raise ValueError("share_prompt needs a pair batch: rows i and B + i must hold the same prompt")
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = model(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        position_ids=positions[:pairs, :prompt_width],
        use_cache=True,
        logits_to_keep=1,
    )
    logits = prompt_out.logits.repeat(2, 1, 1)
    completion_ids = input_ids[:, prompt_width:]
    if completion_width > 1:
        cache = prompt_out.cache
        cache.reorder_cache(torch.arange(pairs, device=input_ids.device).repeat(2))
        completion_logits = model(
            input_ids=completion_ids[:, :-1],
            attention_mask=attention_mask[:, :-1],
            position_ids=positions[:, prompt_width:-1],
            cache=cache,
            use_cache=True,
        ).logits
        logits = torch.cat([logits, completion_logits], dim=1)
    return gather_token_logps(logits, completion_ids)
