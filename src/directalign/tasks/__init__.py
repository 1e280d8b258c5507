"""Tasks: one module per data source (headlines, sentiment, tldr)."""

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig

from directalign.tasks.base import Task


def build_task(task_cfg: DictConfig, cache_dir: Path) -> Task:
    """Instantiate the task class named by ``task_cfg.cls``."""
    return get_class(task_cfg.cls)(task_cfg, cache_dir)
