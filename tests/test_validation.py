"""Config validation accepts every shipped experiment and runs before any compute; the data checks pass
on the real tasks. (The table of refused inputs is tests/test_bad_inputs.py.)"""

import json
import re

import numpy as np
import pytest

from directalign.errors import ConfigError
from directalign.pipeline import methods_to_align, run_pipeline
from directalign.scoring import finite_mask
from directalign.stages import REWARD
from directalign.tasks import build_task
from directalign.validation import check_task_data, context_length, validate_config
from tests.conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_is_valid_and_refuses_an_infinite_beta(experiment, tmp_path):
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    validate_config(cfg)  # raises ConfigError on a refused value
    for name in methods_to_align(cfg):
        where = f"compare.{name}" if cfg.compare else "method"
        broken = compose_config([f"experiment={experiment}", f"{where}.beta=inf"], tmp_path)
        with pytest.raises(ConfigError, match=rf"^{re.escape(where)}\.beta=inf must be finite$"):
            validate_config(broken)


def test_a_bad_config_fails_before_the_store_or_the_task_is_touched(tmp_path):
    cfg = compose_config(["experiment=smoke", "compare.ipo.length_power=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"^compare\.ipo\.length_power=2 must lie in \[0\.0, 1\.0\]$"):
        run_pipeline(cfg)
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("task", ["tiny", "headlines"])
def test_packaged_task_data_passes_the_checks(task, tmp_path):
    cfg = compose_config([f"task={task}"], tmp_path)
    check_task_data(build_task(cfg.task, tmp_path / "cache"))


def test_context_length_is_read_from_a_local_model_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048}))
    cfg = compose_config(["model.source=path", f"+model.path={tmp_path}"], tmp_path)
    assert context_length(cfg.model) == 2048
    assert context_length(compose_config(["model=tiny_llama"], tmp_path).model) == 512


def test_finite_mask_ignores_absent_scores():
    proxy, gold = np.array([0.1, np.nan, 0.3, 0.4]), np.array([0.1, 0.2, np.inf, 0.4])
    assert finite_mask(proxy, None).tolist() == [True, False, True, True]
    assert finite_mask(proxy, gold).tolist() == [True, False, False, True]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("inf", r"^task\.gold\.label_length_bias=inf must be finite$"),
        ("-inf", r"^task\.gold\.label_length_bias=-inf must be finite$"),
        ("nan", r"^task\.gold\.label_length_bias=nan must be a number$"),
    ],
)
def test_a_non_finite_label_length_bias_is_refused_naming_the_key(value, message, tmp_path):
    cfg = compose_config(["experiment=length", f"task.gold.label_length_bias={value}"], tmp_path)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


@pytest.mark.parametrize("value", [0.01, -0.01])
def test_a_finite_label_length_bias_of_either_sign_is_accepted(value, tmp_path):
    cfg = compose_config([f"+task.gold.label_length_bias={value}"], tmp_path)
    validate_config(cfg)
    # Accepted as given, and it reaches the reward stage's key (the labels it trains on depend on it).
    assert REWARD.key_config(cfg)["task"]["gold"]["label_length_bias"] == value
