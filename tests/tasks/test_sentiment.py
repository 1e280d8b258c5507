"""Sentiment task: continuation splits from real snippets; a cached critics' classifier as gold judge."""

import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from directalign.tasks import build_task
from directalign.tasks.base import EXAMPLE_COLUMNS, SPLITS
from directalign.tasks.sentiment import SentimentTask

TASK_CONF = Path(__file__).resolve().parents[2] / "conf" / "task"
# A small judge keeps the suite fast: 400 training snippets already give AUC ~0.8 (0.84 with all).
SMALL = [
    "gold.max_train=400",
    "gold.max_heldout=250",
    "+max_examples_per_split={sft: 40, preference: 20, offpolicy: 20, eval: 20}",
]


def task_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose one task config on its own, independent of the rest of the config tree."""
    with initialize_config_dir(config_dir=str(TASK_CONF), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def task(cache_dir: Path) -> SentimentTask:
    return build_task(task_config("sentiment", SMALL), cache_dir)


def test_examples_split_a_snippet_into_prefix_and_rest(task: SentimentTask) -> None:
    for split in SPLITS:
        examples = task.examples(split)
        assert examples.column_names == list(EXAMPLE_COLUMNS)
        assert len(examples) == task.cfg.max_examples_per_split[split]
        for row in examples:
            assert len(row["source"].split()) == task.cfg.prefix_words
            assert len(row["reference"].split()) >= task.cfg.min_reference_words


def test_full_splits_are_disjoint() -> None:
    full = build_task(task_config("sentiment"), Path("unused"))
    ids = [set(full.examples(split)["id"]) for split in SPLITS]
    assert sum(map(len, ids)) == len(set().union(*ids)) > 7000


def test_gold_classifier_has_heldout_auc_above_0_75(task: SentimentTask) -> None:
    metrics = task.judge_metrics()
    assert metrics["heldout_auc"] > 0.75
    assert (metrics["n_train"], metrics["n_heldout"]) == (400, 250)


def test_gold_prefers_positive_continuations(task: SentimentTask) -> None:
    scores = task.gold_judge().score(
        ["This film is"] * 2,
        ["unused"] * 2,
        ["a triumph: funny, moving and beautifully acted.", "a dull, lifeless and tedious mess."],
    )
    assert scores[0] > 0 > scores[1]


def test_second_build_loads_the_cached_classifier(
    task: SentimentTask, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (cached,) = cache_dir.glob("sentiment_judge-*.joblib")
    modified = cached.stat().st_mtime_ns
    monkeypatch.setattr(SentimentTask, "_train_classifier", lambda self: pytest.fail("retrained"))
    started = time.perf_counter()
    again = build_task(task_config("sentiment", SMALL), cache_dir)
    assert again.judge_metrics() == task.judge_metrics()
    assert time.perf_counter() - started < 5
    assert cached.stat().st_mtime_ns == modified
