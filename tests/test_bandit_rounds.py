"""The bandit's modes: online CoPG reaches the offline fixed point (paper B: its optimum ignores the
sampling), iterative rounds reach each reference choice's closed form, every round's and the online fixed
point zeroes the expected update, and bad mode settings are refused in one line before any compute."""

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import softmax

from directalign.bandit import (
    BanditConfig,
    arm_normalisers,
    copg_fixed_point,
    fixed_point,
    regret_figure,
    round_fixed_points,
    run,
    summary_table,
    total_variation,
)
from directalign.errors import ConfigError
from tests.test_bandit import LENGTH_BANDIT, bandit_config, population_gradient

# The paper's bandit (R = (2.5, 2, 1), beta = 0.5, pi_ref uniform, its mu1 and mu2) at lr 0.05 for 200
# steps: CoPG's offline and online runs both end within 3e-5 of their fixed point in total variation.
FAST = ["bandit.lr=0.05", "bandit.epochs=10", "bandit.seed=0", "bandit.methods=[copg]"]
ITERATIVE = ["bandit.mode=iterative", "bandit.rounds=3"]
# The paper's bandit by hand: pi_ref uniform, R / beta = (5, 4, 2).
LOG_REF, SCALED_REWARDS = np.log(np.full(3, 1 / 3)), np.array([5.0, 4.0, 2.0])


def test_online_copg_reaches_the_offline_fixed_point():
    offline = run(bandit_config(*FAST))
    online = run(bandit_config(*FAST, "bandit.mode=online"))
    target = softmax(LOG_REF + SCALED_REWARDS)  # pi_ref exp(R / beta), normalised
    np.testing.assert_allclose(offline["methods"]["copg"]["fixed_point"], target, rtol=1e-12)
    assert online["methods"]["copg"]["fixed_point"] == offline["methods"]["copg"]["fixed_point"]
    trained_offline, trained_online = (s["methods"]["copg"]["policy"] for s in (offline, online))
    assert total_variation(trained_offline, target) < 1e-3
    assert total_variation(trained_online, target) < 1e-3
    assert total_variation(trained_online, trained_offline) < 1e-3


@pytest.mark.parametrize(("reference", "tilts"), [("sft", [1, 1, 1]), ("previous", [1, 2, 3])])
def test_iterative_copg_reaches_each_references_closed_form(reference: str, tilts: list[int]):
    # sft: every round's optimum is pi_ref exp(R / beta). previous: round r's is pi_{r-1} exp(R / beta),
    # so pi_ref exp(r R / beta) after r rounds.
    summary = run(bandit_config(*FAST, *ITERATIVE, f"bandit.reference={reference}"))
    rounds = summary["methods"]["copg"]["rounds"]
    assert [row["round"] for row in rounds] == [1, 2, 3]
    for row, tilt in zip(rounds, tilts, strict=True):
        closed_form = softmax(LOG_REF + tilt * SCALED_REWARDS)
        np.testing.assert_allclose(row["fixed_point"], closed_form, rtol=1e-12)
        assert row["fixed_point_tv"] == pytest.approx(total_variation(row["policy"], closed_form), abs=1e-15)
        assert row["fixed_point_tv"] < 1e-3
    assert summary["methods"]["copg"]["policy"] == rounds[-1]["policy"]
    table = summary_table(summary)
    assert (
        f"Mode iterative, 3 rounds, reference {'pi_ref' if reference == 'sft' else 'the previous'}" in table
    )
    assert "| CoPG | " in table.split("TV of each round's policy")[1]
    regret_figure(summary)


@pytest.mark.parametrize("reference", ["sft", "previous"])
@pytest.mark.parametrize("method", ["copg", "dpo"])
def test_iterative_tilted_fixed_points_at_unequal_lengths(method: str, reference: str):
    # pi_ref exp(|y|^a (R / beta + C)) each round; tilting by it r times is the tilt at beta / r.
    config = bandit_config(
        *LENGTH_BANDIT, "bandit.length_power=0.5", *ITERATIVE, f"bandit.reference={reference}"
    )
    rewards, log_ref = np.asarray(config.rewards), np.log(config.pi_ref)
    normalisers = arm_normalisers(config.completion_lengths, 0.5)  # |y|^0.5 as training computes it
    for number, point in enumerate(round_fixed_points(config, method), start=1):
        beta = config.beta / (number if reference == "previous" else 1)
        np.testing.assert_allclose(
            point.policy, copg_fixed_point(rewards, log_ref, normalisers, beta), rtol=1e-9
        )


def round_config(config: BanditConfig, sampled: np.ndarray, reference: np.ndarray) -> BanditConfig:
    """An offline config whose pairs are drawn from ``sampled`` against ``reference``: one round's."""
    return replace(
        config,
        mode="offline",
        reference="sft",
        rounds=1,
        mu1=tuple(sampled),
        mu2=tuple(sampled),
        ref=tuple(reference),
    )


@pytest.mark.parametrize("reference", ["sft", "previous"])
@pytest.mark.parametrize("method", ["copg", "dpo", "ipo", "pg"])
def test_each_rounds_fixed_point_zeroes_its_expected_update(method: str, reference: str):
    config = bandit_config(
        *LENGTH_BANDIT, "bandit.length_power=0.5", *ITERATIVE, f"bandit.reference={reference}"
    )
    points = [point.policy for point in round_fixed_points(config, method)]
    assert len(points) == 3
    for previous, point in zip(points, points[1:], strict=False):
        ref = np.asarray(config.pi_ref) if reference == "sft" else previous
        assert population_gradient(round_config(config, previous, ref), method, point).abs().max() < 1e-9
    if method in ("ipo", "pg"):  # these follow their sampling: the rounds move
        assert total_variation(points[0], points[1]) > 1e-3


@pytest.mark.parametrize(
    ("overrides", "method"),
    [
        (["bandit.length_power=0.5"], "copg"),
        (["bandit.length_power=0.5"], "dpo"),
        (["bandit.length_power=0.5"], "pg"),
        (["bandit.length_power=0.0"], "pg_value"),
        (["bandit.lengths=[2,2,2,2]", "bandit.length_power=1.0"], "pg_value"),
    ],
)
def test_the_online_fixed_point_zeroes_the_expected_update_on_its_own_pairs(
    overrides: list[str], method: str
):
    config = bandit_config(*LENGTH_BANDIT, *overrides, "bandit.mode=online")
    point = fixed_point(config, method).policy
    ref = np.asarray(config.pi_ref)
    assert population_gradient(round_config(config, point, ref), method, point).abs().max() < 1e-9
    if method == "pg" and config.length_power > 0:  # on-policy PG's point is not the tilted one
        tilted = fixed_point(config, "copg").policy
        assert total_variation(point, tilted) > 1e-3


@pytest.mark.parametrize(("method", "reason"), [("ipo", "self-consistent"), ("pg_value", "2-D root")])
def test_online_fixed_points_not_derived_are_null_with_the_reason(method: str, reason: str):
    config = bandit_config(*LENGTH_BANDIT, "bandit.length_power=0.5", "bandit.mode=online")
    point = fixed_point(config, method)
    assert point.policy is None and reason in point.note


@pytest.mark.parametrize("reference", ["sft", "previous"])
def test_one_iterative_round_is_the_offline_run(reference: str):
    short = ["bandit.epochs=2", "bandit.seeds=[0,1]", "bandit.methods=[copg,pg_value,ipo]"]
    offline = run(bandit_config(*short))
    iterative = run(bandit_config(*short, "bandit.mode=iterative", f"bandit.reference={reference}"))
    assert "mode" not in offline["config"] and iterative["config"]["rounds"] == 1
    for name, entry in offline["methods"].items():
        rounds = iterative["methods"][name].pop("rounds")
        assert rounds[0]["policy"] == entry["policy"]
        assert iterative["methods"][name]["fixed_point_note"].startswith("round 1, pairs from mu1, mu2")
        for key in ("policy", "per_seed", "regret_curve"):
            assert iterative["methods"][name][key] == entry[key]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["bandit.rounds=0"], "bandit.rounds"),
        (["bandit.mode=iterative", "bandit.rounds=0"], "bandit.rounds"),
        (["bandit.mode=iterative", "bandit.rounds=2.5"], "bandit.rounds"),
        (["bandit.mode=batch"], "bandit.mode"),
        (["bandit.reference=ema"], "bandit.reference"),
        (["bandit.rounds=3"], "bandit.rounds"),
        (["bandit.mode=online", "bandit.rounds=2"], "bandit.rounds"),
        (["bandit.reference=previous"], "bandit.reference"),
        (["bandit.mode=online", "bandit.reference=previous"], "bandit.reference"),
    ],
)
def test_bad_mode_settings_raise_a_one_line_error_naming_the_key(overrides: list[str], key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        bandit_config(*overrides)
    assert "\n" not in str(error.value)
