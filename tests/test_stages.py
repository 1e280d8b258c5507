"""Each stage's declared store key: what recomputes a stage and what never does."""

from pathlib import Path

import pytest

from directalign.stages import ALIGN, EVALUATE, GENERATE, REWARD, SFT
from directalign.store import Artifact, stage_key
from tests.conftest import compose_config

# The stage that fills each input role of another stage.
ROLE_STAGE = {"sft": "sft", "reward": "reward", "offpolicy": "generate", "policy": "align"}


def stage_keys(overrides: list[str]) -> dict[str, str]:
    """The key of every stage of the smoke experiment, each computed from its upstream keys as the
    store computes them (nothing is trained)."""
    cfg = compose_config(["experiment=smoke", *overrides])
    artifacts: dict[str, Artifact] = {}
    for stage in (SFT, REWARD, GENERATE, ALIGN, EVALUATE):
        inputs = {role: artifacts[ROLE_STAGE[role]] for role in stage.inputs}
        key = stage_key(stage.name, stage.key_config(cfg), inputs)
        artifacts[stage.name] = Artifact(stage.name, key, Path(), {})
    return {name: artifact.key for name, artifact in artifacts.items()}


@pytest.fixture(scope="module")
def base() -> dict[str, str]:
    return stage_keys([])


def test_precision_recomputes_every_stage_that_trains_and_everything_downstream(base):
    changed = stage_keys(["trainer.precision=bf16-mixed"])
    assert [name for name in base if changed[name] == base[name]] == []


@pytest.mark.parametrize(
    "override",
    [
        "stage.sft.checkpoint_every_n_steps=3",
        "stage.reward.checkpoint_every_n_steps=3",
        "stage.align.checkpoint_every_n_steps=3",
        "stage.align.share_prompt=false",
        "stage.align.activation_checkpointing=true",
        "method.name=renamed",
        "task.gold.copy_penalty=0.9",
    ],
)
def test_speed_only_settings_and_labels_recompute_nothing_upstream_of_their_use(base, override):
    changed = stage_keys([override])
    if override.startswith("task.gold"):  # the gold judge scores from the reward stage on, not in SFT
        assert changed["sft"] == base["sft"] and changed["reward"] != base["reward"]
    else:
        assert changed == base


def test_a_method_setting_recomputes_alignment_and_its_evaluation_only(base):
    changed = stage_keys(["method.beta=0.37"])
    assert [name for name in base if changed[name] != base[name]] == ["align", "evaluate"]


def test_every_declared_path_exists_in_the_composed_config():
    cfg = compose_config(["experiment=smoke"])
    for stage in (SFT, REWARD, GENERATE, ALIGN, EVALUATE):
        config = stage.key_config(cfg)
        assert set(config) == set(stage.key), stage.name
        assert all(value is not None for value in config.values()), stage.name
