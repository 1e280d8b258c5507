"""The simulated labeller: its length bias by hand, no change at a bias of 0, and the bias reaching the
preference labels, the oracle rewards of the generate stage and the reward stage's key (so its manifest)."""

from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf

from directalign import preferences
from directalign.preferences import bradley_terry_labels, labeller_scores, simulated_preferences
from directalign.prompts import Prompts
from directalign.scoring import Scores
from directalign.stages import REWARD, SFT
from directalign.stages.generate import scored_rows
from tests.conftest import compose_config

# Two pairs of headlines with their gold scores: the first pair's longer one is worse by gold.
SHORT, LONG = "Short title", "A much longer title with many more words"  # 2 and 8 words
TERSE, WORDY = "Rates rise again", "Markets fall as rates rise"  # 3 and 5 words
GOLD = {SHORT: 0.50, LONG: 0.45, TERSE: 0.30, WORDY: 0.10}


def test_labeller_adds_the_bias_per_word():
    scores = labeller_scores(np.array([0.50, 0.45, 0.0]), [SHORT, LONG, "Fed's rate-cut, again!"], 0.02)
    # 0.50 + 0.02 * 2, 0.45 + 0.02 * 8, and 0.02 * 5 words (fed, s, rate, cut, again).
    assert scores == pytest.approx([0.54, 0.61, 0.10])


class FixedUniforms:
    """A generator whose uniform draws are given."""

    def __init__(self, values: list[float]):
        self.values = np.asarray(values)

    def random(self, size: int) -> np.ndarray:
        return self.values[:size]


def test_bradley_terry_labels_win_with_the_sigmoid_probability():
    # (first - second) / temperature = 0.1 / 0.1 = 1: the first wins with probability 1 / (1 + e^-1) = 0.7311.
    first, second = np.array([0.3, 0.3]), np.array([0.2, 0.2])
    wins = bradley_terry_labels(first, second, 0.1, FixedUniforms([0.731, 0.732]))
    assert wins.tolist() == [True, False]


def test_a_bias_of_zero_gives_exactly_todays_labels():
    rng = np.random.default_rng(0)
    gold_first, gold_second = rng.normal(0.3, 0.1, 500), rng.normal(0.3, 0.1, 500)
    first = [" ".join(["word"] * n) for n in rng.integers(1, 30, 500)]
    second = [" ".join(["word"] * n) for n in rng.integers(1, 30, 500)]
    labels = bradley_terry_labels(
        labeller_scores(gold_first, first, 0.0),
        labeller_scores(gold_second, second, 0.0),
        0.05,
        np.random.default_rng(7),
    )
    # The labeller before the length bias existed, verbatim.
    today = np.random.default_rng(7).random(500) < 1.0 / (1.0 + np.exp(-(gold_first - gold_second) / 0.05))
    assert np.array_equal(labels, today)
    biased = bradley_terry_labels(
        labeller_scores(gold_first, first, 0.02),
        labeller_scores(gold_second, second, 0.02),
        0.05,
        np.random.default_rng(7),
    )
    assert not np.array_equal(biased, today)


def labelled(monkeypatch: pytest.MonkeyPatch, length_bias: float) -> preferences.Preferences:
    """simulated_preferences on the two pairs, sampled and scored by stand-ins, at a label temperature of
    0.001: a gap of 0.05 is 50 logits, so every label is the labeller's own order."""
    texts = [(SHORT, LONG), (TERSE, WORDY)]
    monkeypatch.setattr(preferences, "sample_completions", lambda *args, **kwargs: [[[0], [1]], [[2], [3]]])
    ctx = SimpleNamespace(
        cfg=OmegaConf.create(
            {
                "task": {"name": "stand-in", "max_completion_tokens": 8},
                "stage": {
                    "reward": {
                        "max_prompts": None,
                        "label_temperature": 0.001,
                        "sampling": {"num_samples": 2, "batch_size": 2, "temperature": 1.0, "top_p": 1.0},
                    }
                },
            }
        ),
        task=SimpleNamespace(
            gold_judge=lambda: SimpleNamespace(
                score=lambda s, r, completions: np.array([GOLD[c] for c in completions])
            ),
            label_length_bias=lambda: length_bias,
        ),
        prompts=lambda *args: SimpleNamespace(
            ids=[[5], [6]], sources=["a", "b"], references=["A", "B"], n_truncated=0
        ),
        device="cpu",
        tokenizer=None,
        decode=lambda pair: list(texts[pair[0][0] // 2]),
    )
    return simulated_preferences(ctx, SimpleNamespace(context_length=None, load=lambda device: None), seed=1)


def test_the_length_bias_reorders_pairs_by_hand(monkeypatch):
    # Labeller at 0.02 a word: 0.54 against 0.61 (the longer headline wins), 0.36 against 0.20.
    pairs = labelled(monkeypatch, 0.02)
    assert pairs.chosen == [LONG, TERSE] and pairs.rejected == [SHORT, WORDY]
    # The gold margin stays the unbiased judge's: chosen minus rejected.
    assert pairs.gold_margin == pytest.approx([0.45 - 0.50, 0.30 - 0.10])
    assert pairs.counts["n_pairs_reversed_by_length_bias"] == 1
    unbiased = labelled(monkeypatch, 0.0)
    assert unbiased.chosen == [SHORT, TERSE] and unbiased.counts["n_pairs_reversed_by_length_bias"] == 0


def test_oracle_rewards_carry_the_bias_and_the_gold_column_does_not():
    texts = [SHORT, LONG, TERSE]
    gold = np.array([GOLD[t] for t in texts])
    ctx = SimpleNamespace(
        cfg=OmegaConf.create(
            {"stage": {"generate": {"reward_source": "gold"}, "reward": {"label_temperature": 0.05}}}
        ),
        task=SimpleNamespace(label_length_bias=lambda: 0.02),
        decode=lambda completions: [texts[c[0]] for c in completions],
        scorer=lambda reward: lambda s, r, c: Scores(np.zeros(3), gold, np.zeros(3)),
    )
    prompts = Prompts("offpolicy", [[9]], ["id0"], ["article"], ["headline"], 0)
    rows, _ = scored_rows(ctx, None, prompts, [([[0], [1], [2]], [[-1.0], [-1.0], [-1.0]])])
    # (0.50 + 0.04) / 0.05, (0.45 + 0.16) / 0.05, (0.30 + 0.06) / 0.05.
    assert rows[0]["reward"] == pytest.approx([10.8, 12.2, 7.2])
    assert rows[0]["gold"] == gold.tolist()


def test_the_bias_is_in_the_reward_key_and_not_in_sfts(tmp_path):
    plain, biased = (compose_config(o, tmp_path) for o in ([], ["+task.gold.label_length_bias=0.01"]))
    assert REWARD.key_config(biased)["task"]["gold"]["label_length_bias"] == 0.01
    assert REWARD.key_config(plain) != REWARD.key_config(biased)
    assert SFT.key_config(plain) == SFT.key_config(biased)
    # Absent by default (labels follow the gold judge), so the unbiased labeller's runs keep their keys.
    assert "label_length_bias" not in plain.task.gold
