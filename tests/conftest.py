"""Shared fixtures: configs composed with Hydra's compose API, shrunk to tiny sizes."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose_config(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    """The composed app config, with every path redirected into ``tmp``."""
    paths = (
        []
        if tmp is None
        else [f"paths.store={tmp}/store", f"paths.output_dir={tmp}/out", f"paths.results_dir={tmp}/results"]
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *paths])


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory) -> Path:
    """One store for the whole session, so the dequantised SmolLM2 tokenizer is built once."""
    return tmp_path_factory.mktemp("shared")
