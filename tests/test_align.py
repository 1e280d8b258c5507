"""From config to loss: a few optimiser steps through ``AlignModule`` on pairs built by ``build_pairs``
from a dataset row whose rewards are known. Each method must move its implicit reward margin the
right way (chosen up, rejected down; CoPG towards the reward gap over beta), and its first loss must be
the hand-computed value of the configured loss, so a swapped pair order or a wrong loss dispatch fails.
"""

import math
import warnings

import datasets
import pytest
import torch
from omegaconf import OmegaConf

from directalign.lit.align import AlignModule
from directalign.logprobs import batched_completion_logps
from directalign.losses import length_normaliser
from directalign.pairs import build_pairs, collate_pairs
from tests.conftest import tiny_llama

PAD, BETA, REWARD_GAP = 0, 0.5, 1.0
PROMPT = [5, 9, 3, 12]
# Listed worse first, so build_pairs must reorder them; different lengths, so averaging matters.
WORSE, BETTER = [7, 8, 2], [4, 11, 6, 10, 1]
STAGE = OmegaConf.create(
    {"lr": 1e-2, "weight_decay": 0.0, "warmup_ratio": 0.0, "scheduler": "constant", "share_prompt": True}
)


def logratios(model, reference: list[list[float]], length_power: float) -> list[float]:
    """h(y) / |y|^a of the worse and the better completion against their reference log-probs."""
    logps = batched_completion_logps(model, [PROMPT, PROMPT], [WORSE, BETTER], PAD, 2)
    values = []
    for policy, ref in zip(logps, reference, strict=True):
        summed = sum(policy) - sum(ref)
        values.append(summed / length_normaliser(torch.ones(1, len(ref)), length_power).item())
    return values


def first_loss_by_hand(loss: str) -> float:
    """Every log-ratio is 0 before the first step (the reference is the initial policy itself)."""
    return {
        "dpo": math.log(2.0),  # -log sigmoid(0)
        "ipo": (1 / (2 * BETA)) ** 2,  # (0 - 1/(2 beta))^2
        "copg": REWARD_GAP**2 / (2 * BETA),  # (dR - beta * 0)^2 / (2 beta)
    }[loss]


@pytest.mark.parametrize("length_power", [0.0, 1.0])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "copg"])
def test_training_moves_the_margin_towards_the_better_completion(loss, length_power):
    model = tiny_llama()
    reference = batched_completion_logps(model, [PROMPT, PROMPT], [WORSE, BETTER], PAD, 2)
    row = {
        "prompt_ids": PROMPT,
        "completion_ids": [WORSE, BETTER],
        "ref_logps": reference,
        "reward": [0.0, REWARD_GAP],
    }
    pairs, _ = build_pairs(datasets.Dataset.from_list([row]), drop_ties=loss != "copg")
    batch = collate_pairs(pairs, PAD)
    method = OmegaConf.create({"name": loss, "loss": loss, "beta": BETA, "length_power": length_power})
    module = AlignModule(model.train(), STAGE, method)
    optimizer = torch.optim.Adam(model.parameters(), lr=STAGE.lr)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer attached
        for step in range(8):
            loss_value = module.training_step(batch, step)
            losses.append(loss_value.item())
            optimizer.zero_grad()
            loss_value.backward()
            optimizer.step()
    assert losses[0] == pytest.approx(first_loss_by_hand(loss), rel=1e-5)
    worse, better = logratios(model.eval(), reference, length_power)
    margin = better - worse
    assert margin > 0 and losses[-1] < losses[0]
    if loss == "copg":
        target = REWARD_GAP / BETA
        assert abs(margin - target) < target, "CoPG regresses the margin onto the reward gap / beta"
    else:
        assert better > 0 > worse, "chosen up, rejected down"
