"""task=custom on small JSON lines and CSV fixtures in TRL's standard formats."""

import csv
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from directalign.export import FEATURES
from directalign.models import load_tokenizer
from directalign.preferences import human_preferences
from directalign.stages import GENERATE, REWARD, SFT
from directalign.store import Store
from directalign.tasks import build_task
from directalign.tasks.base import EXAMPLE_COLUMNS, PREFERENCE_COLUMNS, SPLITS
from directalign.tasks.custom import CustomTask
from tests.conftest import MINI_SMOKE, ROOT, completed, compose_config, mini_smoke_command
from tests.model_folders import save_policy, save_reward_model

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
    cfg = OmegaConf.create({"task": {"name": "custom"}, "stage": {"reward": {"max_prompts": None}}})
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


# The reduced smoke experiment on task=custom, cut further (one method a run, shorter completions, fewer
# samples and curve points): the end-to-end runs below check what the data and models become, not training.
CUTS = (
    "task.max_completion_tokens=8",
    "stage.sft.epochs=1",
    "stage.align.curve_every_n_steps=100",
    "stage.evaluate.max_prompts=4",
    "stage.evaluate.sampling.num_samples=1",
    "stage.evaluate.best_of_n=[1,2]",
    "stage.evaluate.greedy_prompts=2",
)
CUSTOM_SMOKE = ("task=custom", f"task.{EVEN_SPLITS}", *CUTS)
# The README's run, on MINI_SMOKE's settings but its own experiment, cut as above to the method it loads.
README_CUTS = (
    *(override for override in MINI_SMOKE if override != "experiment=smoke"),
    *CUTS,
    "~compare.dpo",
)


def readme_blocks(section: str = "## Your own data") -> list[tuple[str, str]]:
    """The fenced code blocks of one README section, in order: (language, code)."""
    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index(section) :]
    text = text[: text.index("\n## ", len(section))]
    return re.findall(r"```(python|bash)\n(.*?)```", text, flags=re.DOTALL)


def readme_commands() -> list[list[str]]:
    """Each README block as a command: a python block as ``python -c``, each bash line (continuations
    joined) as it is written with this interpreter as ``python``, the pipeline given README_CUTS on top."""
    commands = []
    for language, code in readme_blocks():
        if language == "python":
            commands.append([sys.executable, "-c", code])
            continue
        for line in code.replace("\\\n", " ").strip().splitlines():
            program, *args = shlex.split(line)
            assert program == "python", line
            commands.append([sys.executable, *args, *(README_CUTS if args[0] == "pipelines/run.py" else ())])
    return commands


# Three processes share two cores: one torch thread each, rather than threads waiting on each other.
ONE_THREAD = os.environ | {"OMP_NUM_THREADS": "1"}


def run_readme(folder: Path) -> subprocess.CompletedProcess | None:
    """The README's commands in order, in ``folder`` holding only links to the repository's conf and
    pipelines (what they write stays there); the first that fails, or None."""
    for name in ("conf", "pipelines"):
        (folder / name).symlink_to(ROOT / name)
    for command in readme_commands():
        result = subprocess.run(
            command, cwd=folder, env=ONE_THREAD, capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            return result
    return None


@pytest.fixture(scope="module")
def custom_runs(tmp_path_factory: pytest.TempPathFactory, shared_store: Path) -> dict[str, Path]:
    """The README's commands, and the pipeline on conversational data with a local policy and reward model
    and on plain text, side by side (as conftest's mini_runs) so that their single-threaded stretches
    share the two cores. Each store starts with the tiny_llama tokenizer the session extracted once."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ("readme", "conversational", "plain")}
    load_tokenizer(compose_config(["model=tiny_llama"]).model, shared_store)
    for store in (folders["readme"] / "my_data" / "store", folders["plain"] / "store"):
        shutil.copytree(shared_store / "models", store / "models")
    policy = save_policy(folders["conversational"] / "my_policy", shared_store, chat_template=None)
    reward_model = save_reward_model(folders["conversational"] / "my_reward_model")
    overrides = {
        "conversational": [
            "~compare.dpo",
            f"task.data.path={FIXTURES / 'conversational.jsonl'}",
            "model.source=path",
            f"+model.path={policy}",
            "model.system_prompt=null",
            "reward_model=pretrained",
            f"reward_model.pretrained={reward_model}",
        ],
        "plain": [
            "~compare.copg",
            f"task.data.path={FIXTURES / 'plain.jsonl'}",
            f"task.preferences.path={FIXTURES / 'preference.jsonl'}",
            'task.text_separator="\n\n"',
        ],
    }
    processes = {}
    for name, extra in overrides.items():
        with (folders[name] / "run.log").open("w") as log:
            command = mini_smoke_command(folders[name], *CUSTOM_SMOKE, *extra)
            processes[name] = subprocess.Popen(
                command, cwd=ROOT, env=ONE_THREAD, stdout=log, stderr=subprocess.STDOUT
            )
    try:
        failed = run_readme(folders["readme"])
    finally:
        codes = {name: process.wait(timeout=900) for name, process in processes.items()}
    (folders["readme"] / "failed.log").write_text(
        "" if failed is None else f"{failed.args[:3]}\n{failed.stderr}"
    )
    for name, code in codes.items():
        (folders[name] / "returncode").write_text(str(code))
    return folders


def finished(folder: Path) -> Path:
    """The run's folder, once its pipeline exited cleanly."""
    code = int((folder / "returncode").read_text())
    assert code == 0, (folder / "run.log").read_text()[-3000:]
    return folder


def summary_methods(results: Path) -> list[str]:
    """The rows of a run's summary.csv, checking that the task left the gold reward empty."""
    with (results / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["gold_reward"] == "" and math.isfinite(float(row["proxy_reward"])) for row in rows)
    return [row["method"] for row in rows]


@pytest.mark.slow
def test_readme_own_data_commands_run_as_written(custom_runs: dict[str, Path]) -> None:
    assert [language for language, _ in readme_blocks()] == ["python", "bash", "bash", "python"]
    folder = custom_runs["readme"]
    assert (folder / "failed.log").read_text() == ""
    assert summary_methods(folder / "my_data" / "results") == ["sft", "copg", "best_of_1", "best_of_2"]
    exported = datasets.load_from_disk(str(folder / "my_data" / "offpolicy_pairs"))
    assert exported.column_names == list(FEATURES) and len(exported) > 0
    assert all(c > r for c, r in zip(exported["chosen_reward"], exported["rejected_reward"], strict=True))


@pytest.mark.slow
def test_pipeline_on_conversational_data_with_a_local_policy_and_reward_model(
    custom_runs: dict[str, Path],
) -> None:
    folder = finished(custom_runs["conversational"])
    store = Store(folder / "store")
    assert summary_methods(folder / "results") == ["sft", "copg", "best_of_1", "best_of_2"]
    # SFT started from the folder's policy (hidden size 32; the tiny_llama config's is 64).
    assert AutoConfig.from_pretrained(completed(store, SFT).model_dir).hidden_size == 32
    # Without a chat template, the prompt is the user's message as plain text.
    tokenizer = AutoTokenizer.from_pretrained(folder / "my_policy")
    offpolicy = completed(store, GENERATE).dataset()
    assert [tokenizer.decode(ids) for ids in offpolicy["prompt_ids"]] == [
        f"{s}\n" for s in offpolicy["source"]
    ]
    # The reward model was not trained: every pair scored it, its folder is recorded, its weights are kept.
    reward = completed(store, REWARD)
    n_eval = len(custom_task(folder, f"data.path={FIXTURES / 'conversational.jsonl'}").examples("eval"))
    assert reward.metrics["n_train_pairs"] == 0 and reward.metrics["n_val_pairs"] == 20 - n_eval
    origin = {"pretrained": str(folder / "my_reward_model"), "kind": "local folder", "revision": None}
    assert reward.metrics["origin"] == origin
    saved = AutoModelForSequenceClassification.from_pretrained(folder / "my_reward_model").state_dict()
    stored = AutoModelForSequenceClassification.from_pretrained(reward.model_dir).state_dict()
    assert saved.keys() == stored.keys() and all(torch.equal(saved[k], stored[k]) for k in saved)


@pytest.mark.slow
def test_pipeline_on_plain_text_with_a_preference_file(custom_runs: dict[str, Path]) -> None:
    folder = finished(custom_runs["plain"])
    assert summary_methods(folder / "results") == ["sft", "dpo", "best_of_1", "best_of_2"]
    reward = completed(Store(folder / "store"), REWARD)
    assert reward.metrics["n_train_pairs"] + reward.metrics["n_val_pairs"] == 40  # no pair on a plain prompt
    sources = completed(Store(folder / "store"), GENERATE).dataset()["source"]
    assert sources and all(source.startswith("All about ") for source in sources)
