"""Every experiment and config option composes; a bad choice gets Hydra's list of options."""

import pytest
from hydra.errors import MissingConfigException

from tests.conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.task.name and cfg.model.name and list(cfg.pipeline.stages)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_names_loss_beta_and_length_power(method, tmp_path):
    cfg = compose_config([f"method={method}", "method.beta=0.3"], tmp_path)
    assert cfg.method.loss in {"dpo", "ipo", "copg"}
    assert cfg.method.beta == 0.3
    assert cfg.method.length_power == (1.0 if method.startswith("avg_") else 0.0)


def test_smoke_compares_all_six_methods(tmp_path):
    cfg = compose_config(["experiment=smoke"], tmp_path)
    assert sorted(cfg.compare) == METHODS


@pytest.mark.parametrize("group", ["method", "task", "model"])
def test_unknown_option_lists_the_choices(group, tmp_path):
    with pytest.raises(MissingConfigException, match="Available options"):
        compose_config([f"{group}=nonexistent"], tmp_path)
