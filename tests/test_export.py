"""The off-policy dataset exported in TRL's preference format: pairs, rewards and reference log-probs
checked by hand on a small stored dataset, through the command line."""

import re
import runpy
import sys
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from directalign.artifacts import OffPolicyData, PolicyArtifact
from directalign.errors import ConfigError
from directalign.export import FEATURES, export_offpolicy, preference_dataset
from directalign.store import Artifact, Store
from tests.conftest import ROOT, tiny_llama
from tests.model_folders import MINILM_TOKENIZER

# MiniLM's tokenizer (BERT, uncased) makes the prompt ids: they decode to "[CLS] <lower-cased prompt> [SEP]".
PROMPTS = ("Write about Rivers.", "Write about owls.", "Write about rain.")


def offpolicy_rows() -> list[dict]:
    """Three prompts: rewards 1, 3, 1 (two pairs; the tie is dropped), all tied (no pair), 0.5 > -0.5."""
    tokenizer = AutoTokenizer.from_pretrained(MINILM_TOKENIZER)
    rewards = ([1.0, 3.0, 1.0], [2.0, 2.0], [0.5, -0.5])
    texts = (["Rivers flow.", "Rivers carve valleys.", "No."], ["Owls hoot.", "Owls fly."], ["Rain.", "Hm."])
    ref_logps = (
        [[-1.0, -2.0], [-0.5], [-3.0, -1.0, -1.0]],
        [[-1.0], [-2.0]],
        [[-0.25, -0.25], [-4.0]],
    )
    return [
        {
            "id": f"p{i}",
            "source": PROMPTS[i],
            "reference": "",
            "prompt_ids": tokenizer(PROMPTS[i]).input_ids,
            "completion_ids": [[100 + i, 200 + k] for k in range(len(rewards[i]))],
            "completion_text": texts[i],
            "ref_logps": ref_logps[i],
            "reward": rewards[i],
            "proxy": rewards[i],
            "raw_proxy": rewards[i],
            "gold": None,
        }
        for i in range(3)
    ]


EXPECTED = [
    {
        "id": "p0",
        "prompt": "[CLS] write about rivers. [SEP]",
        "chosen": "Rivers carve valleys.",
        "rejected": "Rivers flow.",
        "chosen_reward": 3.0,
        "rejected_reward": 1.0,
        "ref_chosen_logps": -0.5,
        "ref_rejected_logps": -3.0,
        "chosen_ids": [100, 201],
        "rejected_ids": [100, 200],
    },
    {
        "id": "p0",
        "prompt": "[CLS] write about rivers. [SEP]",
        "chosen": "Rivers carve valleys.",
        "rejected": "No.",
        "chosen_reward": 3.0,
        "rejected_reward": 1.0,
        "ref_chosen_logps": -0.5,
        "ref_rejected_logps": -5.0,
        "chosen_ids": [100, 201],
        "rejected_ids": [100, 202],
    },
    {
        "id": "p2",
        "prompt": "[CLS] write about rain. [SEP]",
        "chosen": "Rain.",
        "rejected": "Hm.",
        "chosen_reward": 0.5,
        "rejected_reward": -0.5,
        "ref_chosen_logps": -0.5,
        "ref_rejected_logps": -4.0,
        "chosen_ids": [102, 200],
        "rejected_ids": [102, 201],
    },
]


def without_prompt_ids(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key != "prompt_ids"} for row in rows]


def test_pairs_are_ranked_by_reward_ties_dropped_log_probs_summed() -> None:
    tokenizer = AutoTokenizer.from_pretrained(MINILM_TOKENIZER)
    rows = offpolicy_rows()
    pairs = preference_dataset(datasets.Dataset.from_list(rows), tokenizer)
    assert pairs.features == FEATURES
    assert without_prompt_ids(pairs.to_list()) == EXPECTED
    assert pairs["prompt_ids"] == [rows[0]["prompt_ids"], rows[0]["prompt_ids"], rows[2]["prompt_ids"]]


def stored_offpolicy(root: Path, rows: list[dict], tag: int = 0) -> Artifact:
    """An SFT artifact (a tiny policy with MiniLM's tokenizer) and an off-policy dataset made from it, in
    the store at ``root``, as the pipeline lays them out."""
    store, tokenizer = Store(root), AutoTokenizer.from_pretrained(MINILM_TOKENIZER)
    policy = tiny_llama(vocab_size=tokenizer.vocab_size)
    sft = store.run("sft", {}, {}, lambda folder: PolicyArtifact.save(folder, policy, tokenizer) or {})
    return store.run(
        "generate",
        {"tag": tag},
        {"sft": sft},
        lambda f: OffPolicyData.save(f, rows) or {},
        kind=OffPolicyData,
    )


def export_command(monkeypatch: pytest.MonkeyPatch, *args: Path) -> None:
    """``pipelines/export_offpolicy.py`` run as a script, in this process (the README test runs it as a
    command)."""
    monkeypatch.setattr(sys, "argv", ["export_offpolicy.py", *map(str, args)])
    runpy.run_path(str(ROOT / "pipelines" / "export_offpolicy.py"), run_name="__main__")


@pytest.mark.parametrize(
    ("out_name", "builder"), [("pairs", None), ("pairs.parquet", "parquet"), ("pairs.jsonl", "json")]
)
def test_command_writes_the_stored_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out_name: str, builder: str | None
) -> None:
    stored_offpolicy(tmp_path / "store", offpolicy_rows())
    export_command(monkeypatch, tmp_path / "store", tmp_path / out_name)
    out = str(tmp_path / out_name)
    pairs = (
        datasets.load_from_disk(out)
        if builder is None
        else datasets.load_dataset(builder, data_files=out)["train"]
    )
    assert without_prompt_ids(pairs.to_list()) == EXPECTED


def test_a_store_with_several_datasets_needs_the_one_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = stored_offpolicy(tmp_path / "store", offpolicy_rows())
    stored_offpolicy(tmp_path / "store", offpolicy_rows()[:1], tag=1)
    several = r"holds 2 completed off-policy datasets \[.*\]; name one: .*/generate/<key>$"
    with pytest.raises(ConfigError, match=several):
        export_offpolicy(tmp_path / "store")
    with pytest.raises(SystemExit, match=rf"^directalign: {re.escape(str(tmp_path))}/store {several}"):
        export_command(monkeypatch, tmp_path / "store", tmp_path / "pairs")
    assert without_prompt_ids(export_offpolicy(first.path).to_list()) == EXPECTED
    sft = tmp_path / "store" / first.manifest["upstream"]["sft"]
    with pytest.raises(
        ConfigError, match=rf"^{re.escape(str(sft))} is a sft artifact, not an off-policy dataset"
    ):
        export_offpolicy(sft)
