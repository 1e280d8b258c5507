"""What the three training modules share: Adam(W) with a warm-up schedule from transformers, and a
guard that stops training on a non-finite loss before it can reach the weights or a checkpoint."""

from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_scheduler

from directalign.errors import NonFiniteLossError
from directalign.sharding import is_sharded

TRAIN_LOSS = "train/loss"
LAST_LOSS_KEY = "directalign_last_train_loss"


class TrainModule(L.LightningModule):
    """A LightningModule wrapping one Hugging Face model, optimised as ``stage_cfg`` says."""

    def __init__(self, model: torch.nn.Module, stage_cfg: DictConfig):
        super().__init__()
        self.model = model
        self.stage_cfg = stage_cfg
        self._restored_loss: float | None = None

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` shard the model per decoder layer before the optimiser sees its
        parameters; every other strategy trains it whole."""
        if is_sharded(self.trainer.strategy):
            self.trainer.strategy.shard(self.model)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.stage_cfg.lr, weight_decay=self.stage_cfg.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = get_scheduler(
            self.stage_cfg.scheduler,
            optimizer,
            num_warmup_steps=int(self.stage_cfg.warmup_ratio * total),
            num_training_steps=total,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_backward(self, loss: torch.Tensor) -> None:
        """Refuse a non-finite loss before its gradients exist: the optimiser never steps on it, so no
        checkpoint holds it and ``last.ckpt`` stays the last good state. Every rank takes the decision
        together, so one rank's NaN stops them all instead of leaving the others waiting."""
        finite = self.trainer.strategy.reduce_boolean_decision(bool(torch.isfinite(loss)), all=True)
        if not finite:
            checkpoint = self.trainer.checkpoint_callback
            kept = checkpoint.last_model_path if checkpoint else ""
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}, epoch"
                f" {self.current_epoch}: lower the learning rate or raise beta; last good checkpoint:"
                f" {kept or 'none written yet'}"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if (loss := self.trainer.callback_metrics.get(TRAIN_LOSS)) is not None:
            checkpoint[LAST_LOSS_KEY] = float(loss)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._restored_loss = checkpoint.get(LAST_LOSS_KEY)

    def on_train_start(self) -> None:
        """A run resumed from a checkpoint of its final step trains no batch: give stages that read the
        final loss from ``callback_metrics`` the value the checkpoint recorded."""
        if self._restored_loss is not None and TRAIN_LOSS not in self.trainer.callback_metrics:
            self.trainer.callback_metrics[TRAIN_LOSS] = torch.tensor(self._restored_loss)
