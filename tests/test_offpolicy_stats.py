"""The off-policy manifest's length statistics, by hand on a two-prompt dataset."""

import pytest

from directalign.offpolicy_stats import dataset_statistics

EOS = 9
# Lengths 3, 5, 2 | 5, 2 (eos counted); ended by eos: yes, no, yes | yes, no.
ROWS = [
    {
        "completion_ids": [[1, 2, EOS], [1, 2, 3, 4, 5], [1, EOS]],
        "reward": [0.5, 1.0, 0.5],
        "proxy": [0.3, 0.5, 0.2],  # 0.1 x length
        "gold": [0.2, 0.0, 0.3],  # 0.5 - 0.1 x length
    },
    {
        "completion_ids": [[4, 4, 4, 4, EOS], [4, 4]],
        "reward": [2.0, 1.0],
        "proxy": [0.5, 0.2],
        "gold": [0.0, 0.3],
    },
]


def test_eos_rate_is_the_share_of_samples_ending_in_eos():
    assert dataset_statistics(ROWS, EOS)["eos_rate"] == pytest.approx(3 / 5)


def test_lengths_of_the_higher_and_lower_rewarded_completion_of_each_pair():
    stats = dataset_statistics(ROWS, EOS)
    # Pairs (higher, lower) by reward, the tie of the first prompt's 0.5s dropped: (5, 3), (5, 2), (5, 2).
    assert stats["mean_length_of_higher_in_pair"] == pytest.approx(5.0)
    assert stats["mean_length_of_lower_in_pair"] == pytest.approx(7 / 3)
    # Each prompt's best and worst (the first of tied worsts): 5 and 3, then 5 and 2.
    assert stats["mean_length_of_higher_reward"] == pytest.approx(5.0)
    assert stats["mean_length_of_lower_reward"] == pytest.approx(2.5)


def test_proxy_and_gold_correlate_with_length():
    stats = dataset_statistics(ROWS, EOS)
    assert stats["corr_proxy_length"] == pytest.approx(1.0)
    assert stats["corr_gold_length"] == pytest.approx(-1.0)


def test_a_dataset_of_ties_has_no_pair_lengths():
    tied = [{**ROWS[1], "reward": [1.0, 1.0]}]
    stats = dataset_statistics(tied, EOS)
    assert stats["mean_length_of_higher_in_pair"] is None and stats["mean_length_of_lower_in_pair"] is None
