"""task=custom on small JSON lines and CSV fixtures in TRL's standard formats."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from directalign.preferences import human_preferences
from directalign.tasks import build_task
from directalign.tasks.base import EXAMPLE_COLUMNS, PREFERENCE_COLUMNS, SPLITS
from directalign.tasks.custom import CustomTask
from tests.conftest import ROOT, mini_smoke_command

FIXTURES = ROOT / "tests" / "fixtures" / "custom"
# Generous evaluation and off-policy shares, so that a few dozen fixture rows fill every split.
EVEN_SPLITS = "split_fractions={sft: 0.5, preference: 0.0, offpolicy: 0.25, eval: 0.25}"


def task_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "task"), version_base=None):
        return compose(config_name="custom", overrides=[EVEN_SPLITS, *overrides])


def custom_task(tmp_path: Path, *overrides: str) -> CustomTask:
    return build_task(task_config(*overrides), tmp_path)


def splits_of(task: CustomTask) -> dict[str, datasets.Dataset]:
    return {split: task.examples(split) for split in SPLITS}


def assert_disjoint(splits: dict[str, datasets.Dataset], total: int) -> None:
    ids = [set(examples["id"]) for examples in splits.values()]
    assert sum(map(len, ids)) == len(set().union(*ids)) == total
    for examples in splits.values():
        assert examples.column_names == list(EXAMPLE_COLUMNS)


def test_prompt_completion_examples_and_a_preference_file(tmp_path: Path) -> None:
    task = custom_task(
        tmp_path,
        f"data.path={FIXTURES / 'prompt_completion.jsonl'}",
        f"preferences.path={FIXTURES / 'preference.jsonl'}",
    )
    splits = splits_of(task)
    assert_disjoint(splits, 40)
    assert len(splits["preference"]) == 0 and all(len(splits[s]) > 0 for s in ("sft", "offpolicy", "eval"))
    row = splits["sft"][0]
    topic = row["source"].removeprefix("Write one sentence about ").removesuffix(".")
    assert row["reference"] == f"{topic.capitalize()} are a wonder of nature."
    pairs = task.human_preferences()
    assert pairs.column_names == list(PREFERENCE_COLUMNS)
    evaluated = set(splits["eval"]["source"])
    assert len(pairs) == 40 - len(evaluated) and not evaluated & set(pairs["source"])
    assert all(rejected.startswith("I do not know") for rejected in pairs["rejected"])
    assert task.gold_judge() is None


def test_splits_are_stable_and_keyed_by_the_prompt(tmp_path: Path) -> None:
    data = f"data.path={FIXTURES / 'prompt_completion.jsonl'}"
    first, second = splits_of(custom_task(tmp_path, data)), splits_of(custom_task(tmp_path / "b", data))
    assert all(first[split]["id"] == second[split]["id"] for split in SPLITS)
    reversed_file = tmp_path / "reversed.jsonl"
    lines = (FIXTURES / "prompt_completion.jsonl").read_text().splitlines()
    reversed_file.write_text("\n".join(reversed(lines)) + "\n")
    shuffled = splits_of(custom_task(tmp_path / "c", f"data.path={reversed_file}"))
    assert all(set(first[split]["id"]) == set(shuffled[split]["id"]) for split in SPLITS)


def test_preference_file_alone_gives_examples_on_chosen_and_the_pairs(tmp_path: Path) -> None:
    task = custom_task(tmp_path, f"data.path={FIXTURES / 'preference.jsonl'}")
    splits = splits_of(task)
    assert_disjoint(splits, 40)
    assert all(reference.endswith("shape the world around them.") for reference in splits["sft"]["reference"])
    pairs = task.human_preferences()
    assert set(pairs["source"]) == set(splits["sft"]["source"]) | set(splits["offpolicy"]["source"])


def test_prompt_completion_without_preferences_has_no_pairs(tmp_path: Path) -> None:
    task = custom_task(tmp_path, f"data.path={FIXTURES / 'prompt_completion.jsonl'}")
    assert task.human_preferences() is None


def test_conversational_messages_give_user_source_and_last_assistant_reply(tmp_path: Path) -> None:
    task = custom_task(tmp_path, f"data.path={FIXTURES / 'conversational.jsonl'}")
    splits = splits_of(task)
    assert_disjoint(splits, 20)
    row = splits["sft"][0]
    assert row["source"].startswith("Tell me about ") and row["reference"].endswith(" are fascinating.")
    pairs = task.human_preferences()
    assert set(pairs["rejected"]) == {"No."} and len(pairs) == 20 - len(splits["eval"])
    assert task.prompt_messages(row["source"]) == [{"role": "user", "content": row["source"]}]


def test_instruction_is_put_before_the_prompt(tmp_path: Path) -> None:
    task = custom_task(tmp_path, f"data.path={FIXTURES / 'conversational.jsonl'}", "instruction=Be kind.")
    assert task.prompt_messages("Hi.") == [{"role": "user", "content": "Be kind.\n\nHi."}]


def test_plain_text_is_cut_at_the_separator(tmp_path: Path) -> None:
    cfg = task_config(f"data.path={FIXTURES / 'plain.jsonl'}")
    cfg.text_separator = "\n\n"
    task = build_task(cfg, tmp_path)
    splits = splits_of(task)
    assert_disjoint(splits, 12)
    row = splits["sft"][0]
    assert row["source"].startswith("All about ") and row["reference"].endswith(" are found in many places.")
    assert task.human_preferences() is None


def test_mapped_columns_of_a_csv_file_with_its_own_ids(tmp_path: Path) -> None:
    task = custom_task(
        tmp_path,
        f"data.path={FIXTURES / 'mapped.csv'}",
        "columns.id=qid",
        "columns.prompt=question",
        "columns.completion=answer",
    )
    splits = splits_of(task)
    assert_disjoint(splits, 40)
    assert set().union(*(splits[split]["id"] for split in SPLITS)) == {f"q{i}" for i in range(40)}
    assert splits["eval"][0]["source"].startswith("What do you know about ")


def test_dataset_splits_are_used_as_given(tmp_path: Path) -> None:
    task = custom_task(
        tmp_path,
        f"data.path={{train: {FIXTURES / 'train.jsonl'}, test: {FIXTURES / 'test.jsonl'}}}",
        "data.splits={sft: train, offpolicy: train, eval: test}",
    )
    splits = splits_of(task)
    assert_disjoint(splits, 40)
    test_prompts = {json.loads(line)["prompt"] for line in (FIXTURES / "test.jsonl").read_text().splitlines()}
    assert set(splits["eval"]["source"]) == test_prompts
    assert len(splits["sft"]) + len(splits["offpolicy"]) == 30


def test_max_examples_per_split_keeps_a_prefix(tmp_path: Path) -> None:
    data = f"data.path={FIXTURES / 'prompt_completion.jsonl'}"
    full = custom_task(tmp_path, data).examples("sft")
    cut = custom_task(tmp_path / "b", data, "max_examples_per_split={sft: 5}").examples("sft")
    assert cut["id"] == full["id"][:5]


def test_some_identical_pairs_are_left_to_the_reward_stage_to_drop_and_count(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed.jsonl"
    rows = [json.loads(line) for line in (FIXTURES / "preference.jsonl").read_text().splitlines()]
    rows[0]["rejected"] = rows[0]["chosen"]
    mixed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    task = custom_task(tmp_path, f"data.path={mixed}", "exclude_preference_splits=[]")
    cfg = OmegaConf.create({"task": {"name": "custom"}, "stage": {"reward": {"max_pairs": None}}})
    kept = human_preferences(SimpleNamespace(task=task, cfg=cfg))
    assert len(kept) == 39 and kept.dropped == {"empty_or_identical": 1}


def test_hub_dataset_is_loaded_with_the_configured_arguments(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    rows = {"prompt": [f"p{i}" for i in range(40)], "completion": [f"c{i}" for i in range(40)]}

    def load_dataset(*args: str, **kwargs: str) -> datasets.DatasetDict:
        calls.append((args, kwargs))
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = custom_task(tmp_path, "data.hub_id=someone/qa", "data.subset=clean")
    assert_disjoint(splits_of(task), 40)
    assert calls[0] == (("someone/qa",), {"name": "clean"})


@pytest.mark.slow
def test_pipeline_runs_end_to_end_on_custom_data(tmp_path: Path) -> None:
    command = mini_smoke_command(
        tmp_path,
        "task=custom",
        f"task.data.path={FIXTURES / 'prompt_completion.jsonl'}",
        f"task.preferences.path={FIXTURES / 'preference.jsonl'}",
        "task.split_fractions={sft: 0.6, preference: 0.0, offpolicy: 0.2, eval: 0.2}",
    )
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "results" / "summary.csv").is_file()
