"""Turn a task's sources into chat-formatted prompt token ids within a token budget."""

import logging
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from directalign.tasks.base import Task

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompts:
    """Prompt token ids of one split's examples, with the (truncated) sources the reward models read."""

    split: str
    ids: list[list[int]]
    example_ids: list[str]
    sources: list[str]
    references: list[str]
    n_truncated: int

    def __len__(self) -> int:
        return len(self.ids)


def truncate_source(tokenizer: PreTrainedTokenizerBase, source: str, max_tokens: int) -> tuple[str, bool]:
    """The source cut to at most ``max_tokens`` tokens, and whether it was cut."""
    ids = tokenizer(source, add_special_tokens=False).input_ids
    if len(ids) <= max_tokens:
        return source, False
    return tokenizer.decode(ids[:max_tokens]).strip(), True


def build_prompts(
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    sources: list[str],
    max_source_tokens: int,
    system_prompt: str | None,
) -> tuple[list[list[int]], list[str], int]:
    """Prompt token ids, the truncated sources (what reward models read) and the truncation count."""
    prompt_ids, truncated_sources, n_truncated = [], [], 0
    for source in sources:
        short, was_cut = truncate_source(tokenizer, source, max_source_tokens)
        n_truncated += was_cut
        messages = task.prompt_messages(short)
        if system_prompt:
            messages = [{"role": "system", "content": system_prompt}, *messages]
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
            ids = tokenizer(text).input_ids
        prompt_ids.append(list(ids))
        truncated_sources.append(short)
    if n_truncated:
        log.info("truncated %d of %d sources to %d tokens", n_truncated, len(sources), max_source_tokens)
    return prompt_ids, truncated_sources, n_truncated


def completion_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of reference completions, ending with eos so the policy learns to stop."""
    return [tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for text in texts]


def decode_completions(tokenizer: PreTrainedTokenizerBase, completions: list[list[int]]) -> list[str]:
    """Completion texts as the reward models read them: special tokens dropped, whitespace stripped."""
    return [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
