"""Build a Lightning Trainer for one stage: loggers, resumable checkpoints, the trainer group's kwargs."""

import logging
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_loggers(cfg: DictConfig, folder: Path, run_name: str, tags: dict[str, Any]) -> list[Logger]:
    """CSV logs in the stage folder; a wandb run (offline unless configured) grouped by experiment."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=folder, name="logs", version=""))
    if cfg.logger.wandb:
        wandb_cfg = cfg.logger.wandb
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                name=run_name,
                project=wandb_cfg.project,
                entity=wandb_cfg.entity,
                group=wandb_cfg.group,
                tags=[*wandb_cfg.tags, *(f"{k}={v}" for k, v in tags.items()), f"git={git_revision()}"],
                offline=wandb_cfg.offline,
                save_dir=str(out),
                config=OmegaConf.to_container(cfg, resolve=True) | {"run": tags},
            )
        )
    return loggers


def build_trainer(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    folder: Path,
    run_name: str,
    tags: dict[str, Any],
    callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from the ``trainer`` group, checkpointing ``last.ckpt`` into the stage folder."""
    checkpoint = ModelCheckpoint(
        dirpath=folder / CHECKPOINT_DIR,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=stage_cfg.checkpoint_every_n_steps,
    )
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) | {
        "max_epochs": stage_cfg.epochs,
        "default_root_dir": str(folder),
        "logger": build_loggers(cfg, folder, run_name, tags) or False,
        "callbacks": [checkpoint, *(callbacks or [])],
        "enable_checkpointing": True,
    }
    return L.Trainer(**(kwargs | overrides))


def resume_checkpoint(folder: Path) -> str | None:
    """The ``last.ckpt`` an interrupted run of this stage left, if any."""
    last = folder / CHECKPOINT_DIR / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


def finish_wandb(trainer: L.Trainer) -> None:
    """Close this stage's wandb run so the next stage starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
