"""Off-policy pairs for alignment: every pair of completions of a prompt, and their batches."""

from itertools import combinations
from typing import Any

import datasets
import torch

from directalign.logprobs import collate_prompt_completion


def build_pairs(table: datasets.Dataset, drop_ties: bool) -> tuple[list[dict[str, Any]], int]:
    """All pairs of completions of each prompt, ordered so that ``a`` has the higher reward.

    Preference losses need a strict order, so they drop ties; CoPG uses tied pairs too.
    """
    pairs, n_ties = [], 0
    for row in table:
        for i, j in combinations(range(len(row["completion_ids"])), 2):
            if row["reward"][i] == row["reward"][j]:
                n_ties += 1
                if drop_ties:
                    continue
            a, b = (i, j) if row["reward"][i] >= row["reward"][j] else (j, i)
            pairs.append(
                {
                    "prompt": row["prompt_ids"],
                    "a": row["completion_ids"][a],
                    "b": row["completion_ids"][b],
                    "ref_a": row["ref_logps"][a],
                    "ref_b": row["ref_logps"][b],
                    "reward_a": row["reward"][a],
                    "reward_b": row["reward"][b],
                }
            )
    return pairs, n_ties


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the a completions first, then the b completions."""
    batch = collate_prompt_completion(
        [p["prompt"] for p in pairs] * 2, [p["a"] for p in pairs] + [p["b"] for p in pairs], pad_id
    )
    ref = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32)
    for row, logps in enumerate([p["ref_a"] for p in pairs] + [p["ref_b"] for p in pairs]):
        ref[row, : len(logps)] = torch.tensor(logps)
    batch["ref_logps"] = ref
    batch["reward_a"] = torch.tensor([p["reward_a"] for p in pairs], dtype=torch.float32)
    batch["reward_b"] = torch.tensor([p["reward_b"] for p in pairs], dtype=torch.float32)
    return batch
