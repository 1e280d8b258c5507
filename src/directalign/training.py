"""Train one stage with Lightning: loggers, resumable checkpoints, the trainer group's kwargs, and the
fit -> close wandb -> gather the weights sequence every training stage runs."""

import itertools
import logging
import os
import subprocess
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, RandomSampler, Sampler
from transformers import PreTrainedModel

from directalign.distributed import is_rank_zero
from directalign.sharding import LIGHTNING_PRECISION, full_state_dict, is_sharded

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
# Read by conf's hydra.sweep.dir, so the ranks Lightning's DDP launcher starts as fresh runs of a
# multirun command reuse the parent's sweep folder instead of creating their own.
SWEEP_DIR_VARIABLE = "DIRECTALIGN_SWEEP_DIR"

# ExactResume makes every training loader resume mid-epoch, which Lightning's own check cannot see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def git_revision() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sweep_group(cfg: DictConfig) -> str | None:
    """The configured wandb group, else the sweep folder in a Hydra multirun (one group a sweep)."""
    if cfg.logger.wandb.group:
        return cfg.logger.wandb.group
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        # The sweep folder's last two parts: "2026-11-27_07-00-00" for Hydra's default layout.
        return "_".join(Path(HydraConfig.get().sweep.dir).parts[-2:])
    return None


def wandb_run_args(cfg: DictConfig, run_name: str, tags: dict[str, Any]) -> dict[str, Any]:
    """What a stage's WandbLogger and the evaluation's wandb run share: project, sweep group, and tags
    ``key=value`` (method, beta, length_power...) plus the git revision, to filter a dashboard by."""
    wandb_cfg = cfg.logger.wandb
    return {
        "name": run_name,
        "project": wandb_cfg.project,
        "entity": wandb_cfg.entity,
        "group": sweep_group(cfg),
        "tags": [*wandb_cfg.tags, *(f"{k}={v}" for k, v in tags.items()), f"git={git_revision()}"],
        "config": OmegaConf.to_container(cfg, resolve=True) | {"run": tags},
    }


def build_loggers(cfg: DictConfig, folder: Path, run_name: str, tags: dict[str, Any]) -> list[Logger]:
    """CSV logs in the stage folder; a wandb run (offline unless configured) grouped by sweep."""
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=folder, name="logs", version=""))
    if cfg.logger.wandb:
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                offline=cfg.logger.wandb.offline, save_dir=str(out), **wandb_run_args(cfg, run_name, tags)
            )
        )
    return loggers


def share_sweep_dir_with_ranks() -> None:
    """Lightning starts the other DDP ranks by rerunning the command line; in a multirun that would
    start a second sweep in a new time-stamped folder. Exporting the parent's sweep folder (read by
    ``hydra.sweep.dir``) makes them run the same jobs in the same folders, in step with rank 0."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        os.environ.setdefault(SWEEP_DIR_VARIABLE, str(Path(HydraConfig.get().sweep.dir).absolute()))


# Streams of derived_seed, so that the shuffle of epoch n and the dropout of batch n are unrelated.
SHUFFLE_STREAM, DROPOUT_STREAM = 0, 1


def derived_seed(*entropy: int) -> int:
    """A well-mixed 32-bit seed from integers (the run seed, a stream, a counter)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class ResumedOrder(Sampler[int]):
    """The wrapped sampler's order for the current epoch, less the batches a resumed epoch already trained.

    Both numbers are read from Lightning's loop counters when the epoch's first batch is fetched: the
    same counters Lightning restores from a checkpoint and uses to cut the resumed epoch short.
    """

    def __init__(self, inner: Sampler, batch_size: int, trainer: L.Trainer, seed: int):
        self.inner = inner
        self.batch_size = batch_size
        self.trainer = trainer
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        loop = self.trainer.fit_loop
        if isinstance(self.inner, RandomSampler):
            # Left alone it draws its seed from the global RNG, which a checkpoint does not hold.
            seed = derived_seed(self.seed, SHUFFLE_STREAM, loop.epoch_progress.current.processed)
            self.inner.generator = torch.Generator().manual_seed(seed)
        trained = loop.epoch_loop.batch_progress.current.ready
        return itertools.islice(iter(self.inner), trained * self.batch_size, None)

    def __len__(self) -> int:
        return len(self.inner)


class PerRankSeed(Callback):
    """Give every data-parallel rank but 0 its own dropout noise: placed after ExactResume, it mixes
    the rank into the seed ExactResume just set for this batch. Rank 0 (and one device) is untouched,
    so it draws what a single-device run draws, and a resumed fit still replays exactly."""

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_rank:
            torch.manual_seed(derived_seed(torch.initial_seed(), trainer.global_rank))


class ExactResume(Callback):
    """Make a fit resumed from ``last.ckpt`` compute exactly what the uninterrupted fit would have.

    Lightning restores weights, optimiser, scheduler and loop counters, but not the global RNG, and it
    restarts a resumed epoch's loader from its first batch. Here the shuffle order is a function of
    (seed, epoch), a resumed epoch skips the batches it had trained, and the global RNG (dropout) is
    reseeded from (seed, batch index) before every batch.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None or loader.batch_size is None:
            raise TypeError("ExactResume needs a DataLoader built with batch_size (a plain BatchSampler)")
        if not isinstance(batch_sampler.sampler, ResumedOrder):
            batch_sampler.sampler = ResumedOrder(batch_sampler.sampler, loader.batch_size, trainer, self.seed)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        batch = trainer.fit_loop.epoch_loop.total_batch_idx
        torch.manual_seed(derived_seed(self.seed, DROPOUT_STREAM, batch))


def build_trainer(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    folder: Path,
    run_name: str,
    tags: dict[str, Any],
    callbacks: list[Callback] | None = None,
    **overrides: Any,
) -> L.Trainer:
    """A Trainer from the ``trainer`` group, checkpointing ``last.ckpt`` into the stage folder, whose
    fit resumes from that checkpoint to the same result as an uninterrupted one."""
    checkpoint = ModelCheckpoint(
        dirpath=folder / CHECKPOINT_DIR,
        save_last=True,
        save_top_k=0,
        every_n_train_steps=stage_cfg.checkpoint_every_n_steps,
        enable_version_counter=False,
    )
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True) | {
        "max_epochs": stage_cfg.epochs,
        "default_root_dir": str(folder),
        "logger": build_loggers(cfg, folder, run_name, tags) or False,
        "callbacks": [checkpoint, ExactResume(cfg.seed), PerRankSeed(), *(callbacks or [])],
        "enable_checkpointing": True,
    }
    if OmegaConf.is_dict(cfg.trainer.strategy):
        # A strategy with settings (FSDP's wrap policy) is a `_target_` node, built afresh per stage.
        kwargs["strategy"] = instantiate(cfg.trainer.strategy)
        if is_sharded(kwargs["strategy"]):
            kwargs["precision"] = LIGHTNING_PRECISION  # the strategy holds trainer.precision
    return L.Trainer(**(kwargs | overrides))


def resume_checkpoint(folder: Path) -> str | None:
    """The ``last.ckpt`` an interrupted run of this stage left, if any and intact.

    Lightning writes it through a temporary file, but a move across file systems or a full disk can
    still leave it truncated. ``torch.save`` writes a zip whose directory comes last, so a truncated
    checkpoint has none: it is removed, not trusted, and the stage starts over. A sharded checkpoint
    (``trainer=fsdp``) is a folder that ``FullyShardedStrategy`` moves into place only once complete.
    """
    last = folder / CHECKPOINT_DIR / LAST_CHECKPOINT
    if last.is_dir():
        log.info("resuming from the sharded checkpoint %s", last)
        return str(last)
    if not last.is_file():
        return None
    try:
        zipfile.ZipFile(last).close()
    except (zipfile.BadZipFile, OSError) as error:
        log.warning("removing damaged checkpoint %s (%s); the stage restarts from scratch", last, error)
        last.unlink()
        return None
    log.info("resuming from %s", last)
    return str(last)


def finish_wandb(trainer: L.Trainer) -> None:
    """Close this stage's wandb run so the next stage starts its own."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def trained_model(
    trainer: L.Trainer, model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]
) -> torch.nn.Module | None:
    """The trained weights in a plain model, for saving and scoring after ``trainer.fit``.

    Under DDP (or one process) that is ``model`` itself. Under FSDP its parameters are now this rank's
    shards, so every rank must call this: the full state dict is gathered on rank 0, which loads it
    into a freshly built copy; the other ranks get None (the stages save and score on rank 0 only).
    """
    if not is_sharded(trainer.strategy):
        return model
    state = full_state_dict(model)
    if not trainer.is_global_zero:
        return None
    fresh = rebuild()
    fresh.load_state_dict(state)
    return fresh


def fit_stage(
    cfg: DictConfig,
    stage_cfg: DictConfig,
    folder: Path,
    module: L.LightningModule,
    rebuild: Callable[[], torch.nn.Module],
    run_name: str,
    tags: dict[str, Any],
    train: DataLoader,
    val: DataLoader | None = None,
    callbacks: list[Callback] | None = None,
) -> tuple[L.Trainer, PreTrainedModel | None]:
    """Fit ``module`` (resuming from the stage's ``last.ckpt`` if an interrupted run left one) and return
    the trainer and, on rank 0, the trained model in a plain form to save and score (None elsewhere)."""
    trainer = build_trainer(cfg, stage_cfg, folder, run_name, tags, callbacks)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=resume_checkpoint(folder))
    finish_wandb(trainer)
    model = trained_model(trainer, module.model, rebuild)
    return trainer, model if is_rank_zero() else None
