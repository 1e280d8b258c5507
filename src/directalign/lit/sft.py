"""Supervised fine-tuning: token-averaged cross-entropy on completion tokens only."""

import torch

from directalign.lit.base import TrainModule
from directalign.logprobs import completion_logps


class SFTModule(TrainModule):
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        mask = batch["completion_mask"].float()
        logps = completion_logps(self.model, batch["input_ids"], batch["attention_mask"], mask.shape[1])
        loss = -(logps * mask).sum() / mask.sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=mask.shape[0])
        return loss
