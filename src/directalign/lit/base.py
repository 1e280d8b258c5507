"""What the three training modules share: Adam(W) with a warm-up schedule from transformers."""

import lightning as L
import torch
from omegaconf import DictConfig
from transformers import get_scheduler


class TrainModule(L.LightningModule):
    """A LightningModule wrapping one Hugging Face model, optimised as ``stage_cfg`` says."""

    def __init__(self, model: torch.nn.Module, stage_cfg: DictConfig):
        super().__init__()
        self.model = model
        self.stage_cfg = stage_cfg

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

    def on_before_optimizer_step(self, optimizer) -> None:
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None and not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss {loss.item()} at step {self.global_step}: lower the learning rate"
                " or raise beta; the last good checkpoint is kept for inspection"
            )
