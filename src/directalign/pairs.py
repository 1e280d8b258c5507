"""Off-policy pairs for alignment: every pair of completions of a prompt, and their batches.

Two batch layouts, both read by ``AlignModule.training_step`` through the same keys:

- pair batches (``collate_pairs``): ``B`` pairs as ``2B`` rows, the a completions then the b ones;
- prompt groups (``collate_prompt_groups``): whole prompts, each of a prompt's K completions once,
  its K (K - 1) / 2 pairs given as row indices. K completions of ~20 tokens cost K rows instead of
  the K (K - 1) rows of the pair layout, and the prompt runs once for all of them (``prefix.py``).

Every batch holds ``R`` rows ``[left-padded prompt | right-padded completion]`` (``input_ids``,
``attention_mask``, ``completion_mask``, ``ref_logps``), the ``reward`` of each row, the
``prompt_index`` of each row (rows with equal index continue the same prompt) and the pairs as row
indices ``pair_a`` and ``pair_b``, with ``reward[pair_a] >= reward[pair_b]``. Prompt groups given the
frozen trunk's states (``attach_trunk_states``) also hold them as ``input_states`` ``[R, P + C, H]``,
laid out as ``input_ids``.
"""

from itertools import combinations
from typing import Any

import datasets
import torch

from directalign.logprobs import collate_prompt_completion


def ranked_pairs(rewards: list[float], drop_ties: bool) -> tuple[list[tuple[int, int]], int]:
    """Every pair ``(a, b)`` of completion indices, ordered so that ``a`` has the higher reward, and
    the number of tied pairs. Preference losses need a strict order, so they drop ties; CoPG uses
    tied pairs too."""
    pairs, n_ties = [], 0
    for i, j in combinations(range(len(rewards)), 2):
        if rewards[i] == rewards[j]:
            n_ties += 1
            if drop_ties:
                continue
        pairs.append((i, j) if rewards[i] >= rewards[j] else (j, i))
    return pairs, n_ties


def build_pairs(table: datasets.Dataset, drop_ties: bool) -> tuple[list[dict[str, Any]], int]:
    """All pairs of completions of each prompt (``ranked_pairs``), one dict a pair."""
    pairs, n_ties = [], 0
    for row in table:
        ranked, ties = ranked_pairs(row["reward"], drop_ties)
        n_ties += ties
        for a, b in ranked:
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


def build_prompt_groups(table: datasets.Dataset, drop_ties: bool) -> tuple[list[dict[str, Any]], int]:
    """One group a prompt: its completions and the pairs ``build_pairs`` makes of them, in its order.

    A prompt without a pair (all rewards tied under a preference loss) is left out. Otherwise every
    completion is in some pair: one whose reward differs from another's pairs with it. ``row`` is the
    prompt's row in ``table``.
    """
    groups, n_ties = [], 0
    for index, row in enumerate(table):
        ranked, ties = ranked_pairs(row["reward"], drop_ties)
        n_ties += ties
        if ranked:
            groups.append(
                {
                    "row": index,
                    "prompt": row["prompt_ids"],
                    "completions": row["completion_ids"],
                    "ref_logps": row["ref_logps"],
                    "rewards": row["reward"],
                    "pairs": ranked,
                }
            )
    return groups, n_ties


def collate_rows(
    prompts: list[list[int]],
    completions: list[list[int]],
    ref_logps: list[list[float]],
    rewards: list[float],
    prompt_index: list[int],
    pairs: list[tuple[int, int]],
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """The batch layout of the module docstring from its rows and the pairs as row indices."""
    batch = collate_prompt_completion(prompts, completions, pad_id)
    ref = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32)
    for row, logps in enumerate(ref_logps):
        ref[row, : len(logps)] = torch.tensor(logps)
    batch["ref_logps"] = ref
    batch["reward"] = torch.tensor(rewards, dtype=torch.float32)
    batch["prompt_index"] = torch.tensor(prompt_index, dtype=torch.long)
    batch["pair_a"] = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    batch["pair_b"] = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return batch


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B rows: the a completions first, then the b completions; row i and B + i share
    pair i's prompt."""
    size = len(pairs)
    return collate_rows(
        [p["prompt"] for p in pairs] * 2,
        [p["a"] for p in pairs] + [p["b"] for p in pairs],
        [p["ref_a"] for p in pairs] + [p["ref_b"] for p in pairs],
        [p["reward_a"] for p in pairs] + [p["reward_b"] for p in pairs],
        list(range(size)) * 2,
        [(i, size + i) for i in range(size)],
        pad_id,
    )


def attach_trunk_states(groups: list[dict[str, Any]], rows: list[torch.Tensor]) -> None:
    """Give each group its prompt's and completions' trunk states (``trunk.py``), split from its
    off-policy row's ``[p + sum_k c_k, H]`` tensor."""
    for group in groups:
        lengths = [len(group["prompt"]), *(len(c) for c in group["completions"])]
        group["prompt_states"], *group["completion_states"] = rows[group["row"]].split(lengths)


def collate_trunk_states(
    groups: list[dict[str, Any]], prompt_width: int, completion_width: int
) -> torch.Tensor:
    """The groups' trunk states ``[R, P + C, H]`` laid out as ``input_ids``, zeros at padding (masked)."""
    first = groups[0]["prompt_states"]
    rows = sum(len(group["completions"]) for group in groups)
    states = first.new_zeros(rows, prompt_width + completion_width, first.shape[-1])
    row = 0
    for group in groups:
        prompt = group["prompt_states"]
        for completion in group["completion_states"]:
            states[row, prompt_width - len(prompt) : prompt_width] = prompt
            states[row, prompt_width : prompt_width + len(completion)] = completion
            row += 1
    return states


def collate_prompt_groups(groups: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of whole prompts: each group's completions as consecutive rows behind its prompt,
    and every pair of every group as row indices; with trunk states attached, those as
    ``input_states``."""
    prompts, completions, ref_logps, rewards, prompt_index, pairs = [], [], [], [], [], []
    for index, group in enumerate(groups):
        first_row = len(completions)
        prompts.extend([group["prompt"]] * len(group["completions"]))
        completions.extend(group["completions"])
        ref_logps.extend(group["ref_logps"])
        rewards.extend(group["rewards"])
        prompt_index.extend([index] * len(group["completions"]))
        pairs.extend((first_row + a, first_row + b) for a, b in group["pairs"])
    batch = collate_rows(prompts, completions, ref_logps, rewards, prompt_index, pairs, pad_id)
    if "prompt_states" in groups[0]:
        completion_width = batch["completion_mask"].shape[1]
        prompt_width = batch["input_ids"].shape[1] - completion_width
        batch["input_states"] = collate_trunk_states(groups, prompt_width, completion_width)
    return batch
