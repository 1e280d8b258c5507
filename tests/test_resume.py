"""Killed runs resume losing nothing.

In process: a fit stopped at any step and resumed from ``last.ckpt`` sees the same batches, draws the same
dropout masks and ends with the same weights and final loss as an uninterrupted fit. End to end: the
pipeline killed with SIGKILL in SFT training, in generation and in alignment, then rerun, recomputes no
completed stage, resumes the interrupted ones from their checkpoints and writes the same summary.csv.
"""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from directalign.lit.base import TrainModule
from directalign.store import MANIFEST
from directalign.training import CHECKPOINT_DIR, LAST_CHECKPOINT, build_trainer, resume_checkpoint
from tests.conftest import artifact_files, compose_config

STAGE = OmegaConf.create(
    {
        "epochs": 3,
        "lr": 0.05,
        "weight_decay": 0.0,
        "scheduler": "cosine",
        "warmup_ratio": 0.2,
        "checkpoint_every_n_steps": 1,
    }
)
N_EXAMPLES, BATCH_SIZE = 18, 4  # 5 batches an epoch, the last one short: 15 steps


class Stopped(Exception):
    """Stands in for a kill: the fit ends at once and ModelCheckpoint saves nothing more."""


class DropoutRegression(TrainModule):
    """A regression with dropout, so both the data order and the global RNG shape the result."""

    def __init__(self, stop_at: int | None = None):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
        super().__init__(model, STAGE)
        self.stop_at = stop_at
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self.global_step == self.stop_at:
            raise Stopped

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        loss = ((self.model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
        self.log("train/loss", loss)
        return loss


def loader() -> DataLoader:
    features = torch.linspace(-1, 1, N_EXAMPLES * 3).reshape(N_EXAMPLES, 3)
    rows = [{"index": i, "x": features[i], "y": features[i].sum()} for i in range(N_EXAMPLES)]
    return DataLoader(rows, batch_size=BATCH_SIZE, shuffle=True)


def fit(folder: Path, module: DropoutRegression, every_n_steps: int = 1):
    cfg = compose_config(["logger=none", "seed=3"], folder)
    trainer = build_trainer(
        cfg,
        OmegaConf.merge(STAGE, {"checkpoint_every_n_steps": every_n_steps}),
        folder,
        "test",
        {},
        enable_progress_bar=False,
    )
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=resume_checkpoint(folder))
    return trainer


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    module = DropoutRegression()
    trainer = fit(tmp_path_factory.mktemp("uninterrupted"), module)
    return module, float(trainer.callback_metrics["train/loss"])


@pytest.mark.parametrize(
    ("stop_at", "every_n_steps"),
    [
        pytest.param(2, 1, id="mid-epoch"),
        pytest.param(5, 1, id="epoch-boundary"),
        pytest.param(7, 2, id="older-checkpoint"),
        pytest.param(11, 1, id="last-epoch"),
        pytest.param(14, 1, id="last-batch"),
        pytest.param(15, 1, id="after-last-step"),
        pytest.param(15, 2, id="after-last-step-older-checkpoint"),
    ],
)
def test_resumed_fit_equals_uninterrupted(tmp_path, uninterrupted, stop_at, every_n_steps):
    reference, reference_loss = uninterrupted
    killed = DropoutRegression(stop_at=stop_at)
    if stop_at < 15:
        with pytest.raises(Stopped):
            fit(tmp_path, killed, every_n_steps)
    else:
        fit(tmp_path, killed, every_n_steps)
    assert (tmp_path / CHECKPOINT_DIR / LAST_CHECKPOINT).is_file()
    resumed = DropoutRegression()
    trainer = fit(tmp_path, resumed, every_n_steps)
    assert trainer.global_step == 15
    checkpointed = stop_at - stop_at % every_n_steps
    assert killed.seen[:checkpointed] + resumed.seen == reference.seen
    for mine, theirs in zip(resumed.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert float(trainer.callback_metrics["train/loss"]) == reference_loss


def test_every_epoch_is_a_new_order_of_every_example(uninterrupted):
    reference, _ = uninterrupted
    epochs = [sorted(sum(reference.seen[5 * e : 5 * e + 5], [])) for e in range(3)]
    assert epochs == [list(range(N_EXAMPLES))] * 3
    assert reference.seen[:5] != reference.seen[5:10]


def test_truncated_checkpoint_is_removed_not_trusted(tmp_path):
    fit(tmp_path, DropoutRegression(stop_at=15))
    last = tmp_path / CHECKPOINT_DIR / LAST_CHECKPOINT
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    assert resume_checkpoint(tmp_path) is None
    assert not last.exists()


@pytest.mark.slow
def test_killed_runs_end_with_the_uninterrupted_results(mini_reference, mini_killed_run):
    folder, _ = mini_killed_run
    reference = (mini_reference / "results" / "summary.csv").read_text()
    assert (folder / "results" / "summary.csv").read_text() == reference
    assert artifact_files(folder / "store") == artifact_files(mini_reference / "store")


@pytest.mark.slow
def test_no_completed_stage_is_recomputed(mini_killed_run):
    _, attempts = mini_killed_run
    for attempt in attempts:
        assert {path: attempt.after[path] for path in attempt.before} == attempt.before
        for manifest in attempt.before:
            assert f"computing into {manifest.parent}" not in attempt.log
            assert f"reusing {manifest.parent}" in attempt.log


@pytest.mark.slow
def test_each_kill_interrupted_a_stage_that_the_next_run_resumed(mini_killed_run):
    folder, attempts = mini_killed_run
    store = folder / "store"
    assert [a.killed_at.relative_to(store).parts[0] for a in attempts[:-1]] == ["sft", "generate", "align"]
    for killed, rerun in zip(attempts, attempts[1:], strict=False):
        stage_folder = store.joinpath(*killed.killed_at.relative_to(store).parts[:2])
        assert stage_folder / MANIFEST not in killed.after
        assert f"computing into {stage_folder}" in rerun.log
        if killed.killed_at.name == LAST_CHECKPOINT:
            assert f"resuming from {killed.killed_at}" in rerun.log
