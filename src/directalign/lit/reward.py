"""Bradley-Terry reward model: ``-log sigmoid(r(chosen) - r(rejected))``."""

import torch

from directalign.lit.base import TrainModule
from directalign.losses import bradley_terry_loss


class RewardModule(TrainModule):
    def _scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = self.model(
            input_ids=batch["chosen_input_ids"], attention_mask=batch["chosen_attention_mask"]
        )
        rejected = self.model(
            input_ids=batch["rejected_input_ids"], attention_mask=batch["rejected_attention_mask"]
        )
        return chosen.logits.squeeze(-1), rejected.logits.squeeze(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        chosen, rejected = self._scores(batch)
        loss = bradley_terry_loss(chosen, rejected).mean()
        size = chosen.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/accuracy", (chosen > rejected).float().mean(), batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        chosen, rejected = self._scores(batch)
        size = chosen.shape[0]
        self.log("val/loss", bradley_terry_loss(chosen, rejected).mean(), batch_size=size, sync_dist=True)
        self.log("val/accuracy", (chosen > rejected).float().mean(), batch_size=size, sync_dist=True)
