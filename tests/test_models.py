"""Your own models: a reward model from a local folder (`reward_model=pretrained`) is loaded as it was
saved, and where it came from is recorded; a policy's prompt format is checked when its tokenizer loads.
(The refusals are in tests/test_bad_inputs.py.)"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from directalign.models import build_reward_model, load_tokenizer, reward_model_origin
from directalign.scoring import reward_scores
from tests.conftest import compose_config
from tests.model_folders import save_policy, save_reward_model


def test_pretrained_reward_model_is_loaded_as_saved_and_its_folder_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = save_reward_model(tmp_path / "my_reward_model")
    monkeypatch.chdir(tmp_path)
    cfg = compose_config(["reward_model=pretrained", "reward_model.pretrained=my_reward_model"]).reward_model
    model, tokenizer = build_reward_model(cfg, tmp_path / "unused_sft", seed=7)
    saved = AutoModelForSequenceClassification.from_pretrained(folder)
    assert model.state_dict().keys() == saved.state_dict().keys()
    assert all(torch.equal(value, saved.state_dict()[name]) for name, value in model.state_dict().items())
    sources, completions = ["Write about rivers.", "Write about owls."], ["Rivers flow.", "I do not know."]
    expected = reward_scores(saved, AutoTokenizer.from_pretrained(folder), sources, completions, 64)
    assert reward_scores(model, tokenizer, sources, completions, 64).tolist() == expected.tolist()
    assert reward_model_origin(cfg, model) == {
        "pretrained": str(folder),
        "kind": "local folder",
        "revision": None,
    }


def test_policy_tokenizer_without_a_chat_template_is_accepted(tmp_path: Path, shared_store: Path) -> None:
    """Without a chat template the system prompt and the user's message are joined as plain text
    (``prompts.build_prompts``), which always renders: nothing to refuse."""
    folder = save_policy(tmp_path / "policy", shared_store, chat_template=None)
    cfg = compose_config(["model.source=path", f"+model.path={folder}"])
    assert cfg.model.system_prompt is not None
    assert load_tokenizer(cfg.model, shared_store).chat_template is None
