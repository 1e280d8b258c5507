"""From config to loss: a few optimiser steps through ``AlignModule`` on pairs built by ``build_pairs``
(or grouped by prompt by ``build_prompt_groups``) from a dataset row whose rewards are known. Each
method must move its implicit reward margin the right way (chosen up, rejected down; CoPG towards the
reward gap over beta), and its first loss must be the hand-computed value of the configured loss, so a
swapped pair order or a wrong loss dispatch fails.

Prompt grouping (``stage.align.group_by_prompt``) batches other pairs together than the pair layout, so
training trajectories differ; what must hold is that on one fixed set of pairs the grouped batch gives
the pair batch's loss and every gradient, to 1e-5.
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
from directalign.models import with_lora
from directalign.pairs import build_pairs, build_prompt_groups, collate_pairs, collate_prompt_groups
from tests.conftest import TOP_LAYER_LORA, step_loss_and_grads, tiny_llama

PAD, BETA, REWARD_GAP, SIMPO_GAMMA = 0, 0.5, 1.0, 0.3
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


def first_loss_by_hand(loss: str, reference: list[list[float]], length_power: float) -> float:
    """Every log-ratio is 0 before the first step (the reference is the initial policy itself); SimPO,
    reference-free, compares the initial policy's own log-likelihoods ``sum / |y|^a``."""
    worse, better = (sum(logps) / len(logps) ** length_power for logps in reference)
    return {
        "dpo": math.log(2.0),  # -log sigmoid(0)
        "ipo": (1 / (2 * BETA)) ** 2,  # (0 - 1/(2 beta))^2
        "copg": REWARD_GAP**2 / (2 * BETA),  # (dR - beta * 0)^2 / (2 beta)
        "simpo": math.log1p(math.exp(-(BETA * (better - worse) - SIMPO_GAMMA))),  # -log sigmoid(z)
    }[loss]


def batch_of_one_row(
    table: datasets.Dataset, drop_ties: bool, group_by_prompt: bool
) -> dict[str, torch.Tensor]:
    if group_by_prompt:
        return collate_prompt_groups(build_prompt_groups(table, drop_ties)[0], PAD)
    return collate_pairs(build_pairs(table, drop_ties)[0], PAD)


@pytest.mark.parametrize("group_by_prompt", [False, True])
@pytest.mark.parametrize("length_power", [0.0, 1.0])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "copg", "simpo"])
def test_training_moves_the_margin_towards_the_better_completion(loss, length_power, group_by_prompt):
    model = tiny_llama()
    reference = batched_completion_logps(model, [PROMPT, PROMPT], [WORSE, BETTER], PAD, 2)
    row = {
        "prompt_ids": PROMPT,
        "completion_ids": [WORSE, BETTER],
        "ref_logps": reference,
        "reward": [0.0, REWARD_GAP],
    }
    batch = batch_of_one_row(datasets.Dataset.from_list([row]), loss != "copg", group_by_prompt)
    method = OmegaConf.create(
        {"name": loss, "loss": loss, "beta": BETA, "gamma": SIMPO_GAMMA, "length_power": length_power}
    )
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
    assert losses[0] == pytest.approx(first_loss_by_hand(loss, reference, length_power), rel=1e-5)
    worse, better = logratios(model.eval(), reference, length_power)
    margin = better - worse
    assert margin > 0 and losses[-1] < losses[0]
    if loss == "copg":
        target = REWARD_GAP / BETA
        assert abs(margin - target) < target, "CoPG regresses the margin onto the reward gap / beta"
    elif loss != "simpo":  # reference-free: SimPO moves the likelihoods' margin, not each against pi_ref
        assert better > 0 > worse, "chosen up, rejected down"


def offpolicy_table() -> datasets.Dataset:
    """Three prompts of different lengths with K = 2, 3 and 4 completions of different lengths (one of
    a single token), listed in no reward order; the K = 4 prompt has a tie, which only CoPG keeps. The
    reference log-probs are the initial policy's, perturbed: losses of order one, whose float32
    rounding stays far below the tolerance."""
    generator = torch.Generator().manual_seed(2)

    def tokens(n: int) -> list[int]:
        return torch.randint(1, 64, (n,), generator=generator).tolist()

    rows = []
    for prompt, lengths, rewards in [
        (6, [3, 5], [0.2, 0.9]),
        (2, [1, 4, 2], [0.5, -0.3, 1.1]),
        (4, [2, 6, 3, 5], [0.4, 0.4, -1.0, 0.7]),
    ]:
        prompt_ids, completions = tokens(prompt), [tokens(n) for n in lengths]
        policy = batched_completion_logps(tiny_llama(), [prompt_ids] * len(lengths), completions, PAD, 4)
        noise = [torch.rand(n, generator=generator) - 0.5 for n in lengths]
        rows.append(
            {
                "prompt_ids": prompt_ids,
                "completion_ids": completions,
                "ref_logps": [(torch.tensor(p) + e).tolist() for p, e in zip(policy, noise, strict=True)],
                "reward": rewards,
            }
        )
    return datasets.Dataset.from_list(rows)


def align_step(
    batch: dict[str, torch.Tensor], method: dict, share_prompt: bool, lora: dict | None
) -> tuple[float, dict[str, torch.Tensor]]:
    stage = OmegaConf.merge(STAGE, {"share_prompt": share_prompt})
    policy = with_lora(tiny_llama(), None if lora is None else OmegaConf.create(lora))
    return step_loss_and_grads(AlignModule(policy, stage, OmegaConf.create(method)), batch)


def test_prompt_groups_hold_the_pairs_build_pairs_makes_in_its_order():
    table = offpolicy_table()
    for drop_ties, n_pairs in [(True, 1 + 3 + 5), (False, 1 + 3 + 6)]:
        pairs, ties = build_pairs(table, drop_ties)
        groups, group_ties = build_prompt_groups(table, drop_ties)
        assert (len(pairs), group_ties) == (n_pairs, ties)
        from_groups = [
            (group["prompt"], group["completions"][a], group["completions"][b], group["rewards"][a])
            for group in groups
            for a, b in group["pairs"]
        ]
        assert from_groups == [(p["prompt"], p["a"], p["b"], p["reward_a"]) for p in pairs]
        batch = collate_prompt_groups(groups, PAD)
        assert batch["input_ids"].shape[0] == 2 + 3 + 4  # each completion once
        assert batch["prompt_index"].tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2]
        assert bool((batch["reward"][batch["pair_a"]] >= batch["reward"][batch["pair_b"]]).all())


def test_a_prompt_whose_rewards_all_tie_forms_no_group_for_preference_losses():
    table = datasets.Dataset.from_list(
        [{"prompt_ids": [1], "completion_ids": [[2], [3]], "ref_logps": [[0.0], [0.0]], "reward": [0.5, 0.5]}]
    )
    assert build_prompt_groups(table, drop_ties=True) == ([], 1)
    assert len(build_prompt_groups(table, drop_ties=False)[0]) == 1


@pytest.mark.parametrize("lora", [None, TOP_LAYER_LORA], ids=["full", "lora"])
@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "shared"])
@pytest.mark.parametrize("length_power", [0.0, 1.0])
@pytest.mark.parametrize("loss", ["dpo", "ipo", "copg", "simpo"])
def test_grouped_batch_gives_the_pair_batch_loss_and_gradients(loss, length_power, share_prompt, lora):
    """The oracle is the plain pair path (every pair's two rows run whole); the grouped batch runs each
    completion once, with (shared) or without prompt sharing. Tolerance: 1e-5 absolute on the loss and
    on every gradient entry."""
    table, drop_ties = offpolicy_table(), loss != "copg"
    method = {"loss": loss, "beta": BETA, "gamma": SIMPO_GAMMA, "length_power": length_power}
    pairs, _ = build_pairs(table, drop_ties)
    plain_loss, plain_grads = align_step(collate_pairs(pairs, PAD), method, False, lora)
    grouped = collate_prompt_groups(build_prompt_groups(table, drop_ties)[0], PAD)
    assert grouped["pair_a"].shape[0] == len(pairs)
    grouped_loss, grouped_grads = align_step(grouped, method, share_prompt, lora)
    assert plain_loss != 0.0
    assert grouped_loss * len(pairs) == pytest.approx(plain_loss * len(pairs), abs=1e-5)
    assert plain_grads.keys() == grouped_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grouped_grads[name], grad, atol=1e-5, rtol=0, msg=name)
