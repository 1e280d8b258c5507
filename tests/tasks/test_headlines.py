"""Headlines task: splits are disjoint, stable and sized by config; the gold judge prefers real headlines."""

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from directalign.tasks import build_task
from directalign.tasks.base import EXAMPLE_COLUMNS, SPLITS, split_of
from directalign.tasks.headlines import HeadlinesTask, copied_fraction

TASK_CONF = Path(__file__).resolve().parents[2] / "conf" / "task"


def task_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose one task config on its own, independent of the rest of the config tree."""
    with initialize_config_dir(config_dir=str(TASK_CONF), version_base=None):
        return compose(config_name=name, overrides=overrides or [])


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> HeadlinesTask:
    return build_task(task_config("headlines"), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> HeadlinesTask:
    return build_task(task_config("tiny"), tmp_path_factory.mktemp("cache"))


def test_tiny_splits_have_configured_sizes_and_columns(tiny: HeadlinesTask) -> None:
    for split in SPLITS:
        examples = tiny.examples(split)
        assert examples.column_names == list(EXAMPLE_COLUMNS)
        assert len(examples) == tiny.cfg.max_examples_per_split[split]
        assert all(examples["source"]) and all(examples["reference"])


def test_full_splits_are_disjoint_and_cover_every_usable_article(full: HeadlinesTask) -> None:
    ids = {split: set(full.examples(split)["id"]) for split in SPLITS}
    assert sum(len(split_ids) for split_ids in ids.values()) == len(set().union(*ids.values())) == 3729
    for split, fraction in full.cfg.split_fractions.items():
        assert len(ids[split]) / 3729 == pytest.approx(fraction, abs=0.03)


def test_tiny_splits_are_a_stable_prefix_of_the_full_splits(full: HeadlinesTask, tiny: HeadlinesTask) -> None:
    rebuilt = build_task(task_config("tiny"), tiny.cache_dir)
    for split in SPLITS:
        tiny_ids = tiny.examples(split)["id"]
        assert rebuilt.examples(split)["id"] == tiny_ids
        assert full.examples(split)["id"][: len(tiny_ids)] == tiny_ids


def test_split_of_depends_on_salt_and_rejects_fractions_over_one() -> None:
    fractions = {"a": 0.5, "b": 0.5}
    assignments = [split_of(str(i), fractions, "one") for i in range(200)]
    assert assignments != [split_of(str(i), fractions, "two") for i in range(200)]
    assert set(assignments) == {"a", "b"}
    with pytest.raises(ValueError, match="more than 1"):
        split_of("x", {"a": 0.7, "b": 0.4}, "salt")


def test_unknown_split_is_an_error(tiny: HeadlinesTask) -> None:
    with pytest.raises(ValueError, match="unknown split"):
        tiny.examples("train")


def test_copied_fraction_counts_lead_ngrams() -> None:
    article = "The cat sat on the mat today. Later, the dog barked loudly at it."
    assert copied_fraction("The cat sat on the mat", article, ngram=3, lead_words=64) == 1.0
    assert copied_fraction("Dog barks at cat", article, ngram=3, lead_words=64) == 0.0
    assert copied_fraction("the dog barked loudly", article, ngram=3, lead_words=6) == 0.0
    assert copied_fraction("Two words", article, ngram=3, lead_words=64) == 0.0


def test_gold_prefers_human_headlines_to_lead_copies_and_other_headlines(tiny: HeadlinesTask) -> None:
    examples = tiny.examples("eval")
    sources, references = examples["source"], examples["reference"]
    judge = tiny.gold_judge()
    human = judge.score(sources, references, references)
    for n_words in (8, 20):
        lead = judge.score(sources, references, [" ".join(s.split()[:n_words]) for s in sources])
        assert human.mean() > lead.mean() + 0.3
        assert (human > lead).mean() >= 0.95
    other = judge.score(sources, references, list(np.roll(references, 1)))
    assert human.mean() > other.mean() + 0.5


def test_gold_rejects_lists_of_different_lengths(tiny: HeadlinesTask) -> None:
    with pytest.raises(ValueError, match="lengths differ"):
        tiny.gold_judge().score(["a"], ["b"], ["c", "d"])


def test_label_length_bias_is_the_labellers_and_leaves_the_gold_judge_unbiased(tiny: HeadlinesTask) -> None:
    biased = build_task(task_config("tiny", ["+gold.label_length_bias=0.01"]), tiny.cache_dir)
    assert tiny.label_length_bias() == 0.0 and biased.label_length_bias() == 0.01
    examples = tiny.examples("eval").select(range(4))
    texts = (
        examples["source"],
        examples["reference"],
        [" ".join(s.split()[:12]) for s in examples["source"]],
    )
    assert np.array_equal(biased.gold_judge().score(*texts), tiny.gold_judge().score(*texts))
