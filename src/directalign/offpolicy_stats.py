"""What an off-policy dataset holds, for its manifest: the scale of its within-prompt reward gaps (the
numbers CoPG's beta is measured against), how the proxy agrees with the gold judge, and how reward
relates to completion length (the verbosity direction a summed loss could exploit), with the share of
samples that ended before the completion budget (a budget that cuts most samples leaves length no room
to move)."""

from itertools import combinations
from typing import Any

import numpy as np

from directalign.pairs import ranked_pairs


def within_prompt_gaps(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    """``x_i - x_j`` over every pair i < j of each row's completions."""
    return np.asarray(
        [row[column][i] - row[column][j] for row in rows for i, j in combinations(range(len(row[column])), 2)]
    )


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 1 and x.std() > 0 and y.std() > 0 else None


def dataset_statistics(rows: list[dict[str, Any]], eos_id: int) -> dict[str, Any]:
    """Lengths in tokens (eos included). ``mean_length_of_higher_reward`` / ``lower`` take each prompt's
    best and worst completion; ``..._in_pair`` every pair a preference loss trains on (ties dropped)."""
    lengths = np.asarray([len(c) for row in rows for c in row["completion_ids"]], dtype=float)
    rewards = np.asarray([r for row in rows for r in row["reward"]])
    length_gaps = within_prompt_gaps([{"n": [len(c) for c in row["completion_ids"]]} for row in rows], "n")
    reward_gaps = within_prompt_gaps(rows, "reward")
    higher = [len(r["completion_ids"][int(np.argmax(r["reward"]))]) for r in rows]
    lower = [len(r["completion_ids"][int(np.argmin(r["reward"]))]) for r in rows]
    pairs = [
        (len(row["completion_ids"][a]), len(row["completion_ids"][b]))
        for row in rows
        for a, b in ranked_pairs(row["reward"], drop_ties=True)[0]
    ]
    stats = {
        "n_prompts": len(rows),
        "n_completions": len(lengths),
        "n_pairs": len(reward_gaps),
        "mean_length_tokens": float(lengths.mean()),
        # Same rule as the evaluation's eos_rate: a sample ended when its last token is eos.
        "eos_rate": float(np.mean([c[-1] == eos_id for row in rows for c in row["completion_ids"]])),
        "mean_reward": float(rewards.mean()),
        "reward_gap_sd": float(reward_gaps.std()),
        "proxy_gap_sd": float(within_prompt_gaps(rows, "proxy").std()),
        "mean_length_of_higher_reward": float(np.mean(higher)),
        "mean_length_of_lower_reward": float(np.mean(lower)),
        "mean_length_of_higher_in_pair": float(np.mean([a for a, _ in pairs])) if pairs else None,
        "mean_length_of_lower_in_pair": float(np.mean([b for _, b in pairs])) if pairs else None,
        "corr_reward_gap_length_gap": _correlation(reward_gaps, length_gaps),
        "corr_proxy_length": _correlation(np.asarray([p for r in rows for p in r["proxy"]]), lengths),
        "mean_gold": None,
    }
    if rows[0]["gold"] is not None:
        golds = np.asarray([g for row in rows for g in row["gold"]])
        gold_gaps, proxy_gaps = within_prompt_gaps(rows, "gold"), within_prompt_gaps(rows, "proxy")
        decided = (gold_gaps != 0) & (proxy_gaps != 0)
        stats |= {
            "mean_gold": float(golds.mean()),
            "gold_gap_sd": float(gold_gaps.std()),
            "proxy_gold_gap_sign_agreement": float(
                np.mean(np.sign(gold_gaps[decided]) == np.sign(proxy_gaps[decided]))
            ),
            "corr_proxy_gold_gap": _correlation(proxy_gaps, gold_gaps),
            "corr_gold_length": _correlation(golds, lengths),
        }
    return stats
