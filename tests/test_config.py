"""Every experiment and config option composes; a bad choice gets Hydra's list of options."""

import pytest
from hydra.errors import MissingConfigException

from directalign.losses import LOSSES
from directalign.stages import ALIGN, EVALUATE, GENERATE, REWARD, SFT
from directalign.stages.context import StageContext
from tests.conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_resolves_every_stage_key(experiment, tmp_path):
    """Each stage's store key reads the config paths it declares, interpolations resolved: a renamed or
    missing key of an experiment fails here, before any run."""
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    for stage in (SFT, REWARD, GENERATE, EVALUATE):
        assert stage.key_config(cfg)
    aligned = StageContext(cfg, None, None).for_method(cfg.method.name, cfg.method, 0).cfg
    assert ALIGN.key_config(aligned)["method"]["loss"] in LOSSES


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_a_registry_loss_with_its_settings(method, tmp_path):
    cfg = compose_config([f"method={method}", "method.beta=0.3"], tmp_path)
    assert cfg.method.name == method
    assert cfg.method.beta == 0.3
    assert all(cfg.method[setting] is not None for setting in LOSSES[cfg.method.loss].settings)
    # avg_* and SimPO average the log-likelihoods over the completion; the others sum them.
    averaged = method.startswith("avg_") or method == "simpo"
    assert cfg.method.length_power == (1.0 if averaged else 0.0)


def test_smoke_compares_every_method(tmp_path):
    cfg = compose_config(["experiment=smoke"], tmp_path)
    assert sorted(cfg.compare) == METHODS


@pytest.mark.parametrize("group", ["method", "task", "model"])
def test_unknown_option_lists_the_choices(group, tmp_path):
    with pytest.raises(MissingConfigException, match="Available options"):
        compose_config([f"{group}=nonexistent"], tmp_path)


def test_length_compares_each_loss_at_each_length_power_with_room_to_move(tmp_path):
    cfg = compose_config(["experiment=length"], tmp_path)
    assert cfg.task.max_completion_tokens >= 48
    assert all(method.length_power in {0.0, 0.5, 1.0} for method in cfg.compare.values())
    grid = sorted((method.loss, method.length_power) for method in cfg.compare.values())
    assert grid == sorted((loss, a) for loss in ("dpo", "ipo", "copg") for a in (0.0, 0.5, 1.0))
    assert {claim.metric for claim in cfg.claims} == {"length_tokens", "gold_reward"}


def test_length_sweep_jobs_train_what_the_length_run_trains(tmp_path):
    """A sweep job at a compare entry's loss, beta and length_power has the same sft, reward, generate,
    align and evaluation settings: after `make length`, the length run recomputes nothing."""
    run = compose_config(["experiment=length"], tmp_path)
    for name, method in run.compare.items():
        job = compose_config(
            [
                "experiment=length_sweep",
                f"method={method.loss}",
                f"method.beta={method.beta}",
                f"method.length_power={method.length_power}",
            ],
            tmp_path,
        )
        assert job.stage.evaluate == run.stage.evaluate
        for stage in (SFT, REWARD, GENERATE):
            assert stage.key_config(job) == stage.key_config(run)
        aligned = [
            StageContext(cfg, None, None).for_method(label, m, 0).cfg
            for cfg, label, m in ((run, name, method), (job, job.method.name, job.method))
        ]
        assert ALIGN.key_config(aligned[0]) == ALIGN.key_config(aligned[1])
