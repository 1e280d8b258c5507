"""The frozen trunk: when the policy trains only layers ``L`` and above (LoRA on the top layers), the
hidden states entering layer ``L`` depend only on the SFT weights and the token ids. They are computed
once per off-policy row (``stages/trunk.py``), and every align step runs only layers ``L .. N-1``, the
final norm and the LM head on top of them: for LoRA on the top 8 of 30 layers, ~4x fewer layer passes
a step and no embedding lookups.

Both halves reuse the model's own modules (decoder layers, rotary embedding, mask builder, norm, head)
in the order ``LlamaModel.forward`` runs them; each layer's ``layer_idx`` indexes the KV cache, so
prompt sharing (``prefix.py``) works unchanged on the top layers. Llama models only (SmolLM2 is one):
other decoders build other masks (sliding windows) or feed their layers other inputs.
"""

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import CausalLMOutputWithPast

from directalign.logprobs import collate_prompt_completion
from directalign.prefix import first_rows


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside a peft wrapper (its layers carry the adapters), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def first_trained_layer(model: torch.nn.Module) -> int | None:
    """The lowest decoder layer with a trainable weight, if every layer below it, and the embeddings,
    are frozen and deterministic; None when the trunk cannot be cached (whole-model training, LoRA
    reaching layer 0, attention dropout, not a Llama). The trained layers need not be contiguous:
    whatever trains above ``L``, the states entering ``L`` are the SFT model's."""
    lm = causal_lm(model)
    if lm.config.model_type != "llama" or lm.config.attention_dropout:
        return None
    decoder = lm.model
    trained = [
        i for i, layer in enumerate(decoder.layers) if any(p.requires_grad for p in layer.parameters())
    ]
    if not trained or trained[0] == 0 or any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return None
    return trained[0]


def run_layers(
    model: torch.nn.Module,
    layers: range,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: Cache | None,
) -> torch.Tensor:
    """Hidden states ``[B, T, H]`` through decoder layers ``layers`` (consecutive), as ``LlamaModel``
    runs them: the mask is sized against the cache of the first of them."""
    decoder = causal_lm(model).model
    mask = create_causal_mask(
        config=decoder.config,
        inputs_embeds=hidden,
        attention_mask=attention_mask,
        cache=cache,
        position_ids=position_ids,
        layer_idx=layers.start,
    )
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    for layer in decoder.layers[layers.start : layers.stop]:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids,
            cache=cache,
            use_cache=cache is not None,
        )
    return hidden


class TopLayers:
    """Layers ``first_layer .. N-1``, the final norm and the LM head of ``model``, called like the model
    with ``inputs_embeds`` standing for the hidden states entering ``first_layer``. A view, not a module:
    its weights are the model's, trained and saved as the model's."""

    def __init__(self, model: torch.nn.Module, first_layer: int):
        self.model = model
        self.first_layer = first_layer

    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
    ) -> CausalLMOutputWithPast:
        lm = causal_lm(self.model)
        if use_cache and cache is None:
            cache = DynamicCache(config=lm.config)
        layers = range(self.first_layer, lm.config.num_hidden_layers)
        hidden = run_layers(self.model, layers, inputs_embeds, attention_mask, position_ids, cache)
        # The norm acts on each position alone: normalising only the positions kept is the same.
        logits = lm.lm_head(lm.model.norm(hidden[:, -logits_to_keep:]))
        return CausalLMOutputWithPast(logits=logits, cache=cache)


@torch.no_grad()
def trunk_states(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[list[int]]],
    first_layer: int,
    pad_id: int,
    prompts_per_forward: int,
) -> list[torch.Tensor]:
    """For each prompt, the hidden states entering ``first_layer`` at its tokens, then at each of its
    completions' tokens (conditioned on the prompt): one ``[p + sum_k c_k, H]`` tensor a prompt.

    Each prompt runs once through layers ``0 .. first_layer - 1`` with a KV cache that its
    completions then run on, as in ``prefix.py``.
    """
    model.eval()
    device = next(model.parameters()).device
    embed, layers = causal_lm(model).model.embed_tokens, range(0, first_layer)
    out, groups = [], list(zip(prompts, completions, strict=True))
    for start in range(0, len(groups), prompts_per_forward):
        chunk = groups[start : start + prompts_per_forward]
        prompt_index = torch.tensor([g for g, (_, group) in enumerate(chunk) for _ in group], device=device)
        batch = collate_prompt_completion(
            [prompt for prompt, group in chunk for _ in group],
            [c for _, group in chunk for c in group],
            pad_id,
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        prompt_width, rows = ids.shape[1] - batch["completion_mask"].shape[1], first_rows(prompt_index)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=causal_lm(model).config)
        prompt_ids, prompt_mask = ids[rows, :prompt_width], mask[rows, :prompt_width]
        prompt_states = run_layers(
            model, layers, embed(prompt_ids), prompt_mask, positions[rows, :prompt_width], cache
        )
        cache.reorder_cache(prompt_index)
        completion_states = run_layers(
            model, layers, embed(ids[:, prompt_width:]), mask, positions[:, prompt_width:], cache
        )
        row = 0
        for g, (prompt, group) in enumerate(chunk):
            parts = [prompt_states[g, prompt_width - len(prompt) :]]
            for completion in group:
                parts.append(completion_states[row, : len(completion)])
                row += 1
            out.append(torch.cat(parts).cpu())
    return out
