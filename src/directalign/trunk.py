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

from directalign.logprobs import causal_lm, collate_prompt_completion, gather_token_logps
from directalign.prefix import first_rows


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
        hidden, cache = self.top_states(inputs_embeds, attention_mask, position_ids, cache, use_cache)
        # The norm acts on each position alone: normalising only the positions kept is the same.
        lm = causal_lm(self.model)
        logits = lm.lm_head(lm.model.norm(hidden[:, -logits_to_keep:]))
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    def top_states(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, Cache | None]:
        """The last layer's output (before the norm) and the cache, a new one if ``use_cache`` asks."""
        lm = causal_lm(self.model)
        if use_cache and cache is None:
            cache = DynamicCache(config=lm.config)
        layers = range(self.first_layer, lm.config.num_hidden_layers)
        return run_layers(self.model, layers, inputs_embeds, attention_mask, position_ids, cache), cache

    def final_states(self, **inputs) -> torch.Tensor:
        """The normed states the LM head reads, at every position (``prefix.final_states``)."""
        hidden, _ = self.top_states(**inputs)
        return causal_lm(self.model).model.norm(hidden)

    @property
    def head(self) -> torch.nn.Module:
        return causal_lm(self.model).lm_head


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


def shared_trunk_layer(model: torch.nn.Module, other: torch.nn.Module) -> int | None:
    """The lowest decoder layer whose weights differ between two Llama models whose embeddings, rotary
    embedding and every layer below are equal: the hidden states entering it are then the same in both,
    so the states one model computes serve the other's top layers. An aligned policy trained with LoRA
    on the top layers shares its SFT model's trunk. With no layer differing, the last layer. None when
    no trunk is shared (the embeddings or layer 0 differ, another architecture, attention dropout)."""
    first, second = causal_lm(model), causal_lm(other)
    if (
        any(lm.config.model_type != "llama" or lm.config.attention_dropout for lm in (first, second))
        or first.config.rms_norm_eps != second.config.rms_norm_eps
        or first.model.rotary_emb.attention_scaling != second.model.rotary_emb.attention_scaling
    ):
        return None
    pairs = [
        (first.model.embed_tokens, second.model.embed_tokens),
        (first.model.rotary_emb, second.model.rotary_emb),
    ]
    if not all(same_tensors(a, b) for a, b in pairs) or len(first.model.layers) != len(second.model.layers):
        return None
    for index, (a, b) in enumerate(zip(first.model.layers, second.model.layers, strict=True)):
        if not same_tensors(a, b):
            return index or None
    return len(first.model.layers) - 1


def same_tensors(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    """Whether two modules hold the same parameters and buffers (non-persistent ones too), bit for bit."""
    mine = dict(module.named_parameters()) | dict(module.named_buffers())
    theirs = dict(other.named_parameters()) | dict(other.named_buffers())
    return mine.keys() == theirs.keys() and all(torch.equal(mine[name], theirs[name]) for name in mine)


class LayerInputs:
    """Records the hidden states entering one decoder layer on every forward call while it is active
    (a forward pre-hook): in ``generate``, the prefill's ``[B, P, H]`` then one ``[B, 1, H]`` a step."""

    def __init__(self, model: torch.nn.Module, layer: int):
        self.layer = causal_lm(model).model.layers[layer]
        self.chunks: list[torch.Tensor] = []

    def __enter__(self) -> "LayerInputs":
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.chunks.append((args[0] if args else kwargs["hidden_states"]).detach())

        self.handle = self.layer.register_forward_pre_hook(record, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


@torch.inference_mode()
def top_layers_completion_logps(
    model: torch.nn.Module,
    first_layer: int,
    prompts: list[list[int]],
    completions: list[list[int]],
    states: list[torch.Tensor],
    pad_id: int,
    batch_size: int,
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt, as ``batched_completion_logps``, running
    only layers ``first_layer`` and up: ``states[i]`` (``[p + c - 1, H]``) holds the hidden states entering
    ``first_layer`` at the prompt's tokens and the completion's but its last, which is never an input."""
    top = TopLayers(model, first_layer)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        batch = collate_prompt_completion(prompts[chunk], completions[chunk], pad_id)
        width = batch["completion_mask"].shape[1]
        mask = batch["attention_mask"][:, :-1].clone()
        prompt_width = mask.shape[1] + 1 - width
        inputs = states[start].new_zeros(mask.shape[0], mask.shape[1], states[start].shape[-1])
        for row, (prompt, completion, rows) in enumerate(
            zip(prompts[chunk], completions[chunk], states[chunk], strict=True)
        ):
            inputs[row, prompt_width - len(prompt) : prompt_width + len(completion) - 1] = rows
            mask[row, prompt_width + len(completion) - 1 :] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = top(
            inputs_embeds=inputs.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            logits_to_keep=width,
        ).logits
        logps = gather_token_logps(logits, batch["input_ids"][:, -width:].to(device)).cpu()
        out.extend(row[: len(c)].tolist() for row, c in zip(logps, completions[chunk], strict=True))
    return out
