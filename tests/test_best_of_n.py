"""Best-of-n: its KL to the base policy by hand and by exact enumeration, the picks, and refused sizes."""

import itertools
import math

import numpy as np
import pytest

from directalign.best_of_n import best_of_n, best_of_n_kl
from directalign.errors import ConfigError, DataError


def kl(q: np.ndarray, p: np.ndarray) -> float:
    support = q > 0
    return float(np.sum(q[support] * np.log(q[support] / p[support])))


def best_of_n_by_enumeration(base: np.ndarray, n: int) -> np.ndarray:
    """The distribution of best-of-n over outcomes whose score is their index: every ordered n-tuple of
    draws, with its probability, credited to its highest outcome."""
    distribution = np.zeros_like(base)
    for draws in itertools.product(range(base.size), repeat=n):
        distribution[max(draws)] += math.prod(base[d] for d in draws)
    return distribution


def test_kl_by_hand():
    assert best_of_n_kl(1) == 0.0
    # log 2 - 1/2 = 0.693147 - 0.5
    assert best_of_n_kl(2) == pytest.approx(0.1931471806)
    # log 4 - 3/4 = 1.386294 - 0.75
    assert best_of_n_kl(4) == pytest.approx(0.6362943611)


def test_enumeration_is_the_distribution_of_the_maximum():
    base = np.array([0.1, 0.4, 0.2, 0.3])
    cumulative = np.cumsum(base)
    for n in (1, 2, 3):
        # P(max = k) = F(k)^n - F(k - 1)^n
        expected = cumulative**n - np.concatenate([[0.0], cumulative[:-1]]) ** n
        np.testing.assert_allclose(best_of_n_by_enumeration(base, n), expected, atol=1e-12)


def test_kl_is_exact_in_the_continuous_limit_and_an_upper_bound_with_atoms():
    # Few atoms: the n draws can share the top score, best-of-n moves less mass and its KL is smaller.
    base = np.array([0.1, 0.3, 0.2, 0.3, 0.05, 0.05])
    assert kl(best_of_n_by_enumeration(base, 1), base) == pytest.approx(0.0, abs=1e-12)
    for n in (2, 3, 4):
        assert 0 < kl(best_of_n_by_enumeration(base, n), base) < best_of_n_kl(n)
    # Two uniform atoms, n = 2: best-of-2 is (1/4, 3/4), KL = 1/4 log(1/2) + 3/4 log(3/2) = 0.130812.
    coin = np.array([0.5, 0.5])
    assert kl(best_of_n_by_enumeration(coin, 2), coin) == pytest.approx(0.130812, abs=1e-6)
    # Uniform over K distinct scores: as K grows no atom matters and the KL reaches the formula.
    atoms = 100_000
    fraction = np.arange(1, atoms + 1) / atoms
    for n in (2, 4, 16):
        best = fraction**n - (fraction - 1 / atoms) ** n
        assert kl(best, np.full(atoms, 1 / atoms)) == pytest.approx(best_of_n_kl(n), rel=1e-6)


def test_picks_the_highest_proxy_among_the_first_n_samples():
    proxy = np.array(
        [
            [0.1, 0.9, 0.3, 2.0],
            [0.5, 0.2, 0.8, 0.1],
            [0.4, 0.4, 0.1, 0.4],  # ties go to the first sample
        ]
    )
    gold = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],
            [5.0, 6.0, 7.0, 8.0],
            [9.0, 10.0, 11.0, 12.0],
        ]
    )
    length = np.arange(12).reshape(3, 4) * 10

    picks = best_of_n(proxy, {"gold_reward": gold, "length_tokens": length}, [1, 2, 4])

    assert [p.n for p in picks] == [1, 2, 4]
    assert [p.kl for p in picks] == [best_of_n_kl(1), best_of_n_kl(2), best_of_n_kl(4)]
    np.testing.assert_array_equal(picks[0].index, [0, 0, 0])
    np.testing.assert_array_equal(picks[1].index, [1, 0, 0])
    np.testing.assert_array_equal(picks[2].index, [3, 2, 0])
    np.testing.assert_array_equal(picks[1].picked["gold_reward"], [2.0, 5.0, 9.0])
    np.testing.assert_array_equal(picks[2].picked["gold_reward"], [4.0, 7.0, 9.0])
    np.testing.assert_array_equal(picks[2].picked["length_tokens"], [30, 60, 80])


@pytest.mark.parametrize("sizes", [[1, 0], [5], [-1], [2.0], [True]])
def test_sizes_outside_the_samples_are_refused_in_one_line(sizes):
    proxy = np.zeros((2, 4))
    with pytest.raises(
        ConfigError, match=r"^stage\.evaluate\.best_of_n=\[.*\]: n=.* must be an integer in \[1, 4\]"
    ):
        best_of_n(proxy, {}, sizes)
    with pytest.raises(ConfigError, match=r"^stage\.evaluate\.best_of_n: n=0 must be an integer >= 1"):
        best_of_n_kl(0)


def test_bad_scores_are_refused():
    with pytest.raises(DataError, match=r"proxy scores must have shape \[prompts, samples\], got \(4,\)"):
        best_of_n(np.zeros(4), {}, [1])
    with pytest.raises(DataError, match=r"proxy score of prompt 1, sample 2 is nan"):
        best_of_n(np.array([[0.0, 1.0, 2.0], [0.0, 1.0, math.nan]]), {}, [1])
    with pytest.raises(
        DataError, match=r"metric 'gold_reward' has shape \(2, 2\), the proxy scores \(2, 3\)"
    ):
        best_of_n(np.zeros((2, 3)), {"gold_reward": np.zeros((2, 2))}, [1])
