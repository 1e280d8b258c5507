"""TL;DR task on local files in the hub's exact schema, read through the same load_dataset call as the hub."""

from pathlib import Path

import datasets
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from directalign.tasks import build_task
from directalign.tasks.base import EXAMPLE_COLUMNS, PREFERENCE_COLUMNS, SPLITS, split_of
from directalign.tasks.tldr import TldrTask, content_id

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "tldr"


def task_config(sft_file: str = "sft.jsonl", comparisons_file: str = "comparisons.jsonl") -> DictConfig:
    """The tldr config with both hub sources replaced by local JSON lines files; even split fractions
    so that 36 fixture posts fill every split."""
    overrides = [
        "split_fractions={sft: 0.4, preference: 0.2, offpolicy: 0.2, eval: 0.2}",
        "sft_data.path=json",
        f"sft_data.data_files={FIXTURES / sft_file}",
        "preference_data.path=json",
        f"preference_data.data_files={FIXTURES / comparisons_file}",
        "preference_data.revision=null",
        "preference_data.data_dir=null",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf" / "task"), version_base=None):
        return compose(config_name="tldr", overrides=overrides)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TldrTask:
    return build_task(task_config(), tmp_path_factory.mktemp("cache"))


def test_examples_are_disjoint_splits_of_every_post(task: TldrTask) -> None:
    splits = {split: task.examples(split) for split in SPLITS}
    ids = [set(examples["id"]) for examples in splits.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 36
    for examples in splits.values():
        assert examples.column_names == list(EXAMPLE_COLUMNS) and len(examples) > 0
    row = splits["sft"][0]
    assert row["source"].startswith("SUBREDDIT: r/") and "\n\nPOST: " in row["source"]
    assert not row["source"].endswith("TL;DR:")
    assert row["reference"] == row["reference"].strip() != ""


def test_human_preferences_follow_choice_and_skip_evaluation_posts(task: TldrTask) -> None:
    pairs = task.human_preferences()
    assert pairs.column_names == list(PREFERENCE_COLUMNS)
    comparisons = [
        row
        for row in datasets.load_dataset(
            "json", data_files=str(FIXTURES / "comparisons.jsonl"), split="train"
        )
        if row["info"]["post"]
    ]
    sft_sources = {source for split in SPLITS for source in task.examples(split)["source"]}
    in_eval = 0
    for row in comparisons:
        chosen = row["summaries"][row["choice"]]["text"].strip()
        source = next(source for source in sft_sources if row["info"]["post"] in source)
        if split_of(content_id(source), task.cfg.split_fractions, task.cfg.split_salt) == "eval":
            in_eval += 1
            assert source not in pairs["source"]
        else:
            (pair,) = [pair for pair in pairs if pair["source"] == source]
            assert pair["chosen"] == chosen and pair["rejected"] != chosen
    assert len(pairs) == len(comparisons) - in_eval
    assert in_eval > 0


def test_gold_judge_is_absent(task: TldrTask) -> None:
    assert task.gold_judge() is None


@pytest.mark.parametrize(
    ("files", "column"),
    [
        ({"sft_file": "sft_missing_completion.jsonl"}, "completion"),
        ({"comparisons_file": "comparisons_missing_choice.jsonl"}, "choice"),
    ],
)
def test_missing_column_names_the_column_and_the_file(
    tmp_path: Path, files: dict[str, str], column: str
) -> None:
    task = build_task(task_config(**files), tmp_path)
    with pytest.raises(ValueError, match=f"{next(iter(files.values()))}.*'{column}'"):
        task.examples("sft") if "sft_file" in files else task.human_preferences()


def test_hub_sources_are_loaded_with_the_configured_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda **kwargs: calls.append(kwargs) or datasets.Dataset.from_dict({})
    )
    with initialize_config_dir(config_dir=str(REPO / "conf" / "task"), version_base=None):
        task = build_task(compose(config_name="tldr"), tmp_path)
    for load in (lambda: task.examples("sft"), task.human_preferences):
        with pytest.raises(ValueError):
            load()
    assert calls == [
        {"path": "trl-lib/tldr", "split": "train"},
        {
            "path": "openai/summarize_from_feedback",
            "revision": "refs/convert/parquet",
            "data_dir": "comparisons",
            "split": "train",
        },
    ]
