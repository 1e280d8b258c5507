"""Claims as data: p, Holm's adjustment and the verdict rule on hand-made numbers, claims.json, the README
table, and win/tie/loss with ties decided by texts and an exact sign test."""

import json
import math

import pytest

from directalign.claims import (
    CLAIM_KEYS,
    CLAIMS_BLOCK,
    Estimate,
    build_claim,
    claims_table,
    family,
    holm,
    read_claims,
    render_claim_blocks,
    sign_test_p_value,
    two_sided_p,
    verdict,
    win_tie_loss,
    write_claims,
)
from directalign.errors import ConfigError, DataError
from directalign.estimates import PairedDifference, paired_difference
from directalign.readme_blocks import render_blocks
from tests.conftest import ROOT

GOLD_CLAIM = ("CoPG beats DPO on gold reward", "paper B", "copg - dpo", "gold_reward")


def difference(values: list[float]) -> PairedDifference:
    """The paired difference whose per-prompt values are ``values``: one seed each, the baseline 0."""
    policy = [{"id": f"p{i}", "gold_reward": v} for i, v in enumerate(values)]
    baseline = [{"id": f"p{i}", "gold_reward": 0.0} for i in range(len(values))]
    return paired_difference([policy], [baseline], "gold_reward")


def test_two_sided_p_by_hand():
    # 2 standard errors from zero: 2 * (1 - Phi(2)) = 0.0455; a claim not read or a zero mean: 1.
    assert two_sided_p(0.2, 0.1, 50) == pytest.approx(0.04550026)
    assert two_sided_p(-0.2, 0.1, 50) == pytest.approx(0.04550026)
    assert two_sided_p(0.0, 0.0, 50) == 1.0 and two_sided_p(0.3, 0.1, 0) == 1.0
    assert two_sided_p(0.3, 0.0, 50) == 0.0


def test_holm_by_hand():
    # Sorted 0.01, 0.02, 0.04, 0.3 times 4, 3, 2, 1: 0.04, 0.06, 0.08, 0.3 (already increasing).
    assert holm([0.04, 0.01, 0.3, 0.02]) == pytest.approx([0.08, 0.04, 0.3, 0.06])
    # The running maximum: 0.01 x 3 = 0.03, then 0.011 x 2 = 0.022 is raised to 0.03; capped at 1.
    assert holm([0.011, 0.01, 0.9]) == pytest.approx([0.03, 0.03, 0.9])
    assert holm([0.6, 0.5]) == [1.0, 1.0]


@pytest.mark.parametrize(
    ("mean", "p_holm", "direction", "expected"),
    [
        (0.3, 0.01, 1, "supported"),
        (-0.3, 0.01, -1, "supported"),
        (-0.3, 0.01, 1, "contradicted"),
        (0.3, 0.01, -1, "contradicted"),
        (0.3, 0.01, 0, "supported"),  # two-sided: a difference either way
        (-0.3, 0.01, 0, "supported"),
        (0.3, 0.05, 1, "inconclusive"),  # 0.05 is not below the level
        (0.3, 0.2, 0, "inconclusive"),
        (0.0, 0.0, 1, "inconclusive"),  # identical outputs everywhere
    ],
)
def test_verdict_rule(mean, p_holm, direction, expected):
    assert verdict(mean, p_holm, direction) == expected


def estimate(name: str, mean: float, se: float, direction: int = 1) -> Estimate:
    return Estimate(
        name, "paper B", "copg - dpo", "gold_reward", direction, "matched_kl", 5.0, 2, mean, se, 100
    )


def test_a_family_adjusts_every_claim_with_holm():
    # Alone, 0.021 +- 0.01 (p 0.036) is supported. Beside claims of p 0.0027 and 0.32 it is the second
    # smallest of three: Holm multiplies it by 2, to 0.071, and it is no longer decided.
    alone = family([estimate("a", 0.021, 0.01)])
    assert alone[0].verdict == "supported" and alone[0].p_holm == alone[0].p
    three = family([estimate("a", 0.021, 0.01), estimate("b", -0.03, 0.01), estimate("c", 0.01, 0.01)])
    assert three[0].p == alone[0].p and three[0].p_holm == pytest.approx(2 * alone[0].p)
    assert three[0].verdict == "inconclusive"
    assert (
        three[1].p_holm == pytest.approx(3 * two_sided_p(0.03, 0.01, 1))
        and three[1].verdict == "contradicted"
    )
    assert three[2].p_holm == pytest.approx(two_sided_p(0.01, 0.01, 1))


def test_claim_from_paired_differences_by_hand():
    # differences 0.3, 0.2, 0.4, 0.3: mean 0.3; squared deviations 0, 0.01, 0.01, 0 sum to 0.02;
    # sample variance 0.02 / 3; se sqrt(0.02 / 3) / 2 = 0.0408, p = 2 (1 - Phi(7.35)) ~ 2e-13.
    (claim,) = family([build_claim(*GOLD_CLAIM, 1, difference([0.3, 0.2, 0.4, 0.3]))])
    assert claim.mean == pytest.approx(0.3) and claim.se == pytest.approx(math.sqrt(0.02 / 3) / 2)
    assert (claim.n, claim.direction, claim.protocol, claim.seeds, claim.verdict) == (
        4,
        1,
        "at_beta",
        1,
        "supported",
    )
    assert (
        family([build_claim(*GOLD_CLAIM, -1, difference([0.3, 0.2, 0.4, 0.3]))])[0].verdict == "contradicted"
    )
    # differences 0.1, 0, 0.2, 0: mean 0.075, se 0.0479: p 0.117
    (weak,) = family([build_claim(*GOLD_CLAIM, 1, difference([0.1, 0.0, 0.2, 0.0]))])
    assert weak.verdict == "inconclusive" and weak.p == pytest.approx(0.1175, abs=1e-3)


def test_claims_that_cannot_be_tested_are_refused():
    with pytest.raises(
        ConfigError, match=r"^claim 'CoPG beats DPO on gold reward': direction=2 must be \+1, -1 or 0$"
    ):
        build_claim(*GOLD_CLAIM, 2, difference([0.3, 0.2]))
    with pytest.raises(ConfigError, match=r"protocol 'at_random' is not one of"):
        build_claim(*GOLD_CLAIM, 1, difference([0.3, 0.2]), protocol="at_random")
    with pytest.raises(
        DataError, match=r"1 paired differences of gold_reward, 0 not finite; needs at least 2"
    ):
        build_claim(*GOLD_CLAIM, 1, difference([0.3]))
    with pytest.raises(DataError, match=r"3 paired differences of gold_reward, 1 not finite"):
        build_claim(*GOLD_CLAIM, 1, difference([0.3, math.nan, 0.1]))


def test_claims_json_round_trip_with_the_exact_keys(tmp_path):
    claims = family(
        [
            build_claim(*GOLD_CLAIM, 1, difference([0.3, 0.2, 0.4, 0.3])),
            build_claim(
                "IPO is shorter than DPO",
                "paper A",
                "ipo - dpo",
                "length_tokens",
                -1,
                difference([-2.0, 1.0, 0.0]),
            ),
        ]
    )
    path = tmp_path / "claims.json"

    write_claims(claims, path)

    records = json.loads(path.read_text())
    expected_keys = ["claim", "paper", "contrast", "metric", "direction", "protocol", "at", "seeds"]
    expected_keys += ["mean", "se", "n", "p", "p_holm", "verdict"]
    assert list(CLAIM_KEYS) == expected_keys
    assert [list(record) for record in records] == [expected_keys, expected_keys]
    assert records[1]["verdict"] == "inconclusive" and records[1]["n"] == 3
    assert read_claims(path) == claims


def test_claims_json_with_other_keys_or_a_wrong_p_or_verdict_is_refused(tmp_path):
    path = tmp_path / "claims.json"
    (claim,) = family([build_claim(*GOLD_CLAIM, 1, difference([0.3, 0.2, 0.4, 0.3]))])
    record = json.loads(json.dumps(claim.__dict__))
    path.write_text(json.dumps([record | {"verdict": "contradicted"}]))
    with pytest.raises(
        DataError, match=r"claims\.json row 0: verdict 'contradicted', the rule gives 'supported'"
    ):
        read_claims(path)
    path.write_text(json.dumps([record | {"p_holm": 0.5}]))
    with pytest.raises(DataError, match=r"claims\.json row 0: p_holm 0\.5, the rule gives"):
        read_claims(path)
    path.write_text(json.dumps([record | {"p_value": 0.01}]))
    with pytest.raises(DataError, match=r"claims\.json row 0: keys \[.*'p_value'.*\] are not the claim keys"):
        read_claims(path)


def test_markdown_table():
    claims = family(
        [
            Estimate(
                "CoPG wins | gold",
                "paper B",
                "copg - dpo",
                "gold_reward",
                1,
                "matched_kl",
                6.0,
                2,
                0.3,
                0.0408,
                4,
            ),
            Estimate(
                "IPO is shorter",
                "paper A",
                "ipo - dpo",
                "length_tokens",
                0,
                "at_pick",
                None,
                1,
                -0.333,
                0.882,
                3,
            ),
        ]
    )
    assert claims_table(claims) == (
        "| claim | paper | protocol | contrast | metric | claimed | mean ± se | seeds | n | p | p (Holm)"
        " | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        "| CoPG wins \\| gold | paper B | matched kl 6 | copg - dpo | gold_reward | > 0 | +0.3 ± 0.041"
        " | 2 | 4 | 1.9e-13 | 3.9e-13 | supported |\n"
        "| IPO is shorter | paper A | at pick | ipo - dpo | length_tokens | ≠ 0 | -0.333 ± 0.88 | 1 | 3"
        " | 0.71 | 0.71 | inconclusive |\n"
    )


def test_claims_blocks_of_a_readme_are_rendered_from_the_files_they_name(tmp_path):
    (claim,) = family([estimate("CoPG wins", 0.3, 0.0408)])
    (tmp_path / "run").mkdir()
    write_claims([claim], tmp_path / "run" / "claims.json")
    readme = (
        "# Results\n\n<!-- claims: run/claims.json -->\nstale table\n<!-- end claims -->\n\nProse stays.\n"
    )

    rendered = render_claim_blocks(readme, tmp_path)

    block = "<!-- claims: run/claims.json -->\n" + claims_table([claim]) + "<!-- end claims -->"
    assert rendered == "# Results\n\n" + block + "\n\nProse stays.\n"
    assert render_claim_blocks(rendered, tmp_path) == rendered
    with pytest.raises(DataError, match=r"claims block names gone/claims\.json, which is not a file under"):
        render_claim_blocks(readme.replace("run/", "gone/"), tmp_path)


def test_the_committed_results_readme_says_what_its_files_hold():
    """Every claims table and CSV table of results/README.md is the one its file renders (no hand
    edits)."""
    readme = ROOT / "results" / "README.md"
    text = readme.read_text()
    assert CLAIMS_BLOCK.search(text), "results/README.md has no generated claims table"
    assert render_blocks(text, readme.parent) == text


def test_a_table_block_renders_its_csv(tmp_path):
    (tmp_path / "times.csv").write_text("stage,runs,total_min\nalign,12,31.25\nsft,1,1.0\n")
    readme = "<!-- table: times.csv -->\nstale\n<!-- end table -->\n"
    assert render_blocks(readme, tmp_path) == (
        "<!-- table: times.csv -->\n| stage | runs | total_min |\n|---|---|---|\n"
        "| align | 12 | 31.25 |\n| sft | 1 | 1 |\n<!-- end table -->\n"
    )
    with pytest.raises(DataError, match=r"table block names gone\.csv, which is not a file under"):
        render_blocks(readme.replace("times.csv", "gone.csv"), tmp_path)


def test_a_tie_is_the_same_text_not_the_same_score():
    policy_texts = ["same", "same too", "better", "worse", "different", "also same"]
    baseline_texts = ["same", "same too", "old", "old", "old", "also same"]
    # The unchanged texts were scored in other batches: off by 1e-7 either way, or exactly equal.
    policy_scores = [0.5 + 1e-7, 0.25 - 1e-7, 0.9, 0.1, 0.4, 0.7]
    baseline_scores = [0.5, 0.25, 0.4, 0.4, 0.4, 0.7]

    result = win_tie_loss(policy_texts, baseline_texts, policy_scores, baseline_scores)

    assert (result.wins, result.ties, result.losses, result.equal_scores) == (1, 3, 1, 1)
    assert result.p_value == 1.0  # one win against one loss


def test_sign_test_by_hand():
    # 8 wins, 2 losses: P(X <= 2) for X ~ Binomial(10, 1/2) is (1 + 10 + 45) / 1024, doubled.
    assert sign_test_p_value(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test_p_value(2, 8) == pytest.approx(0.109375)
    # 6 wins, 0 losses: 2 / 2^6
    assert sign_test_p_value(6, 0) == pytest.approx(2 / 64)
    assert sign_test_p_value(5, 5) == 1.0 and sign_test_p_value(0, 0) == 1.0
    result = win_tie_loss(["a"] * 12, ["b"] * 10 + ["a"] * 2, [1.0] * 8 + [0.0] * 4, [0.5] * 12)
    assert (result.wins, result.ties, result.losses) == (8, 2, 2) and result.p_value == pytest.approx(
        0.109375
    )


def test_win_tie_loss_refuses_mismatched_or_non_finite_inputs():
    with pytest.raises(DataError, match=r"baseline scores: \[2, 2, 2, 1\]"):
        win_tie_loss(["a", "b"], ["a", "c"], [0.1, 0.2], [0.1])
    with pytest.raises(DataError, match=r"row 1 scores nan against 0\.2"):
        win_tie_loss(["a", "b"], ["a", "c"], [0.1, math.nan], [0.1, 0.2])
