"""Each stage's declared store key: what recomputes a stage and what never does."""

from pathlib import Path

import pytest

from directalign.artifacts import AlignedPolicy
from directalign.pipeline import methods_to_align
from directalign.stages import ALIGN, ALIGN_ON_TRUNK, EVALUATE, GENERATE, REWARD, SFT
from directalign.stages.context import StageContext
from directalign.stages.trunk import frozen_trunk
from directalign.store import MANIFEST, Artifact, Store, stage_key
from directalign.tasks import build_task
from tests.conftest import MINI_SMOKE, completed, compose_config, reuse_tokenizer

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


@pytest.mark.slow
def test_no_curve_prompts_align_without_a_reward_curve_and_the_same_weights(mini_reference, tmp_path):
    """The reward curve only watches: with ``curve_prompts=0`` a method trains to the reference run's
    weights, bit for bit, and its artifact holds an empty curve."""
    reuse_tokenizer(mini_reference, tmp_path)
    cfg = compose_config([*MINI_SMOKE, "stage.align.curve_prompts=0"], tmp_path)
    store, reference = Store(cfg.paths.store), Store(mini_reference / "store")
    ctx = StageContext(cfg, store, build_task(cfg.task, store.root / "tasks" / cfg.task.name))
    sft, reward, offpolicy = (completed(reference, stage) for stage in (SFT, REWARD, GENERATE))
    inputs = {"sft": sft, "reward": reward, "offpolicy": offpolicy} | frozen_trunk(ctx, sft, offpolicy)
    name, method = next(iter(methods_to_align(cfg).items()))
    aligned = (ALIGN_ON_TRUNK if "trunk" in inputs else ALIGN).run(ctx.for_method(name, method, 0), inputs)

    def weights(artifact: Artifact) -> dict[str, str]:
        files = artifact.manifest["files"]
        return {f["path"]: f["sha256"] for f in files if f["path"].endswith(".safetensors")}

    with_curve = [
        reference.load(ALIGN.name, manifest.parent.name, AlignedPolicy)
        for manifest in reference.root.glob(f"{ALIGN.name}/*/{MANIFEST}")
    ]
    settings = ("loss", "beta", "length_power")
    twin = next(a for a in with_curve if all(a.method[k] == method[k] for k in settings))
    assert aligned.curve() == [] and len(twin.curve()) >= 2
    assert weights(aligned) and weights(aligned) == weights(twin)
