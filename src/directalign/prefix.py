"""Prompt sharing: each distinct prompt of a batch runs through the model once, for all its completions.

A batch (``pairs.py``) holds rows ``[left-padded prompt | right-padded completion]``, and rows with the
same ``prompt_index`` continue the same prompt: the two rows of a pair, or the K completions of a
prompt group. The plain path runs every row's prompt; here the ``G`` distinct prompts run once with a
KV cache, the cache is expanded to the ``R`` rows (row r gets its prompt's keys and values), and only
the completion tokens run on top of it. For pairs of ~96-token prompts and ~32-token completions that
is ~40% fewer token passes; a prompt group of K = 4 completions of ~20 tokens behind a ~60-token
prompt runs ~136 positions for its 6 pairs, against ~588 for the same pairs as shared pair rows and
~960 unshared. Gradients reach the prompt's computation through the
cached keys and values, so the loss and its gradients are those of the plain path
(``tests/test_prefix.py``).

Given the completion mask (the align step on the frozen trunk passes it), the LM head and its
log-softmax run only on the completion positions that hold a token, not on the right padding of the
shorter completions: the head is as large as eight of SmolLM2's decoder layers, and at a 48-token
budget about a third of a batch's completion columns are padding. The log-probs of the real tokens
are the same; padding positions get 0.
"""

import torch
from transformers import PreTrainedModel

from directalign.logprobs import causal_lm, gather_token_logps


def first_rows(prompt_index: torch.Tensor) -> torch.Tensor:
    """For each prompt ``g`` of a batch, the first row that continues it."""
    rows = torch.arange(prompt_index.shape[0], device=prompt_index.device)
    first = torch.zeros(int(prompt_index.max()) + 1, dtype=torch.long, device=prompt_index.device)
    return first.scatter_reduce(0, prompt_index, rows, reduce="amin", include_self=False)


def shared_prompt_completion_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
    prompt_index: torch.Tensor | None = None,
    input_states: torch.Tensor | None = None,
    completion_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log-probs ``[R, C]`` of the completions of a batch, as ``completion_logps``.

    Row r continues prompt ``prompt_index[r]``; without it, the batch is a pair batch (rows i and
    B + i share a prompt). The last prompt position predicts the first completion token; the
    completion tokens but the last are fed on top of the prompt's cache and predict the rest, so the
    last completion token is never an input. ``input_states`` (``[R, P + C, H]``, laid out as
    ``input_ids``) replace the token ids as the model's inputs (``inputs_embeds``): the frozen trunk's
    hidden states for a model that runs only the top layers (``trunk.py``). With ``completion_mask``
    (``[R, C]``, 1 on real tokens) the head runs on the real tokens alone and padding gets 0. Raises
    ``ValueError`` if rows said to share a prompt do not hold the same one.
    """
    rows, prompt_width = input_ids.shape[0], input_ids.shape[1] - completion_width
    if prompt_index is None:
        if rows % 2:
            raise ValueError("share_prompt needs a pair batch: rows i and B + i must hold the same prompt")
        prompt_index = torch.arange(rows // 2, device=input_ids.device).repeat(2)
    prompt_rows = first_rows(prompt_index)
    prompt_ids, prompt_mask = (
        input_ids[prompt_rows, :prompt_width],
        attention_mask[prompt_rows, :prompt_width],
    )
    if not (
        torch.equal(prompt_ids[prompt_index], input_ids[:, :prompt_width])
        and torch.equal(prompt_mask[prompt_index], attention_mask[:, :prompt_width])
    ):
        raise ValueError("share_prompt: rows with the same prompt_index must hold the same prompt")

    def inputs(rows: torch.Tensor | slice, columns: slice) -> dict[str, torch.Tensor]:
        if input_states is None:
            return {"input_ids": input_ids[rows, columns]}
        return {"inputs_embeds": input_states[rows, columns]}

    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    prompt_out = model(
        **inputs(prompt_rows, slice(0, prompt_width)),
        attention_mask=prompt_mask,
        position_ids=positions[prompt_rows, :prompt_width],
        use_cache=True,
        logits_to_keep=1,
    )
    logits = prompt_out.logits[prompt_index]
    completion_ids = input_ids[:, prompt_width:]
    if completion_width == 1:
        return gather_token_logps(logits, completion_ids)
    cache = prompt_out.cache
    cache.reorder_cache(prompt_index)
    completion_inputs = {
        **inputs(slice(None), slice(prompt_width, -1)),
        "attention_mask": attention_mask[:, :-1],
        "position_ids": positions[:, prompt_width:-1],
        "cache": cache,
        "use_cache": True,
    }
    if completion_mask is None:
        logits = torch.cat([logits, model(**completion_inputs).logits], dim=1)
        return gather_token_logps(logits, completion_ids)
    first = gather_token_logps(logits, completion_ids[:, :1])
    states, head = final_states(model, completion_inputs)
    kept = completion_mask[:, 1:].bool()
    rest = states.new_zeros(kept.shape).masked_scatter(
        kept, gather_token_logps(head(states[kept]), completion_ids[:, 1:][kept])
    )
    return torch.cat([first, rest], dim=1)


def final_states(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module]:
    """The normed states the LM head reads (``[R, T, H]``) and the head: of a ``TopLayers`` view (its
    ``final_states``), or of the causal LM's decoder."""
    if hasattr(model, "final_states"):
        return model.final_states(**inputs), model.head
    lm = causal_lm(model)
    return lm.model(**inputs).last_hidden_state, lm.get_output_embeddings()
