"""Completion-only token log-probabilities.

Sequences are laid out as ``[left-padded prompt | right-padded completion]``, so every completion
starts at the same column: the model is asked for logits at the completion positions only
(``logits_to_keep``), and the log-softmax is never materialised for prompt tokens.
"""

import torch
from transformers import PreTrainedModel


def causal_lm(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers causal LM inside a peft wrapper (its layers carry the adapters), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def collate_prompt_completion(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Left-pad prompts and right-pad completions into one ``[B, P + C]`` batch.

    Returns ``input_ids``, ``attention_mask`` and ``completion_mask`` (``[B, C]``, 1 on real
    completion tokens), the layout ``completion_logps`` expects.
    """
    prompt_width = max(len(p) for p in prompts)
    completion_width = max(max(len(c) for c in completions), 1)
    batch = len(prompts)
    input_ids = torch.full((batch, prompt_width + completion_width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros((batch, completion_width), dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start = prompt_width - len(prompt)
        input_ids[row, start:prompt_width] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, prompt_width : prompt_width + len(completion)] = torch.tensor(
            completion, dtype=torch.long
        )
        attention_mask[row, start : prompt_width + len(completion)] = 1
        completion_mask[row, : len(completion)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def gather_token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` as ``logit[label] - logsumexp(logits)``, in float32."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def completion_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_width: int,
) -> torch.Tensor:
    """Per-token log-probs ``[B, C]`` of the last ``completion_width`` tokens of each row.

    Position ids follow the attention mask, so left padding does not shift the positions.
    Entries at padding positions are meaningless: multiply by the completion mask.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=completion_width + 1,
        use_cache=False,
    ).logits[:, :-1]
    return gather_token_logps(logits, input_ids[:, -completion_width:])


@torch.inference_mode()
def batched_completion_logps(
    model: PreTrainedModel,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_size: int,
) -> list[list[float]]:
    """Per-token log-probs of each completion given its prompt, in batches, without gradients."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_prompt_completion(
            prompts[start : start + batch_size], completions[start : start + batch_size], pad_id
        )
        logps = completion_logps(
            model,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["completion_mask"].shape[1],
        ).cpu()
        out.extend(
            row[: len(c)].tolist()
            for row, c in zip(logps, completions[start : start + batch_size], strict=True)
        )
    return out
