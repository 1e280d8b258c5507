"""Claims as data: the verdict rule on hand-made numbers, claims.json, the README table, and win/tie/loss
with ties decided by texts and an exact sign test."""

import json
import math

import pytest

from directalign.claims import (
    CLAIM_KEYS,
    CLAIMS_BLOCK,
    Claim,
    build_claim,
    claims_table,
    read_claims,
    render_claim_blocks,
    sign_test_p_value,
    verdict,
    win_tie_loss,
    write_claims,
)
from directalign.estimates import PairedDifference, paired_difference
from directalign.validation import ConfigError, DataError
from tests.conftest import ROOT

GOLD_CLAIM = ("CoPG beats DPO on gold reward", "paper B", "copg - dpo", "gold_reward")


def difference(values: list[float]) -> PairedDifference:
    """The paired difference whose per-prompt values are ``values``: one seed each, the baseline 0."""
    policy = [{"id": f"p{i}", "gold_reward": v} for i, v in enumerate(values)]
    baseline = [{"id": f"p{i}", "gold_reward": 0.0} for i in range(len(values))]
    return paired_difference([policy], [baseline], "gold_reward")


@pytest.mark.parametrize(
    ("mean", "se", "direction", "expected"),
    [
        (0.3, 0.1, 1, "supported"),
        (0.2, 0.1, 1, "supported"),  # exactly 2 se away counts
        (-0.3, 0.1, -1, "supported"),
        (-0.3, 0.1, 1, "contradicted"),
        (0.3, 0.1, -1, "contradicted"),
        (0.19, 0.1, 1, "inconclusive"),
        (-0.19, 0.1, -1, "inconclusive"),
        (0.0, 0.0, 1, "inconclusive"),  # identical outputs everywhere
    ],
)
def test_verdict_rule(mean, se, direction, expected):
    assert verdict(mean, se, direction) == expected


def test_claim_from_paired_differences_by_hand():
    # differences 0.3, 0.2, 0.4, 0.3: mean 0.3; squared deviations 0, 0.01, 0.01, 0 sum to 0.02;
    # sample variance 0.02 / 3; se sqrt(0.02 / 3) / 2 = 0.0408, and 0.3 >= 2 * 0.0408.
    claim = build_claim(*GOLD_CLAIM, 1, difference([0.3, 0.2, 0.4, 0.3]))
    assert claim.mean == pytest.approx(0.3) and claim.se == pytest.approx(math.sqrt(0.02 / 3) / 2)
    assert (claim.n, claim.direction, claim.verdict) == (4, 1, "supported")
    assert build_claim(*GOLD_CLAIM, -1, difference([0.3, 0.2, 0.4, 0.3])).verdict == "contradicted"
    # differences 0.1, 0, 0.2, 0: mean 0.075, se sqrt(0.0275 / 3) / 2 = 0.0479, 2 se = 0.0957 > 0.075
    assert build_claim(*GOLD_CLAIM, 1, difference([0.1, 0.0, 0.2, 0.0])).verdict == "inconclusive"


def test_claims_that_cannot_be_tested_are_refused():
    with pytest.raises(
        ConfigError, match=r"^claim 'CoPG beats DPO on gold reward': direction=0 must be \+1 or -1$"
    ):
        build_claim(*GOLD_CLAIM, 0, difference([0.3, 0.2]))
    with pytest.raises(
        DataError, match=r"1 paired differences of gold_reward, 0 not finite; needs at least 2"
    ):
        build_claim(*GOLD_CLAIM, 1, difference([0.3]))
    with pytest.raises(DataError, match=r"3 paired differences of gold_reward, 1 not finite"):
        build_claim(*GOLD_CLAIM, 1, difference([0.3, math.nan, 0.1]))


def test_claims_json_round_trip_with_the_exact_keys(tmp_path):
    claims = [
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
    path = tmp_path / "claims.json"

    write_claims(claims, path)

    records = json.loads(path.read_text())
    expected_keys = ["claim", "paper", "contrast", "metric", "direction", "mean", "se", "n", "verdict"]
    assert list(CLAIM_KEYS) == expected_keys
    assert [list(record) for record in records] == [expected_keys, expected_keys]
    assert records[1]["verdict"] == "inconclusive" and records[1]["n"] == 3
    assert read_claims(path) == claims


def test_claims_json_with_other_keys_or_a_wrong_verdict_is_refused(tmp_path):
    path = tmp_path / "claims.json"
    record = {
        key: value for key, value in zip(CLAIM_KEYS, (*GOLD_CLAIM, 1, 0.3, 0.1, 4, "supported"), strict=True)
    }
    path.write_text(json.dumps([record, {**record, "verdict": "contradicted"}]))
    with pytest.raises(
        DataError, match=r"claims\.json row 1: verdict 'contradicted', the rule gives 'supported'"
    ):
        read_claims(path)
    path.write_text(json.dumps([{**record, "p_value": 0.01}]))
    with pytest.raises(DataError, match=r"claims\.json row 0: keys \[.*'p_value'.*\] are not the claim keys"):
        read_claims(path)


def test_markdown_table():
    claims = [
        Claim("CoPG wins | gold", "paper B", "copg - dpo", "gold_reward", 1, 0.3, 0.0408, 4, "supported"),
        Claim(
            "IPO is shorter", "paper A", "ipo - dpo", "length_tokens", -1, -0.333, 0.882, 3, "inconclusive"
        ),
    ]
    assert claims_table(claims) == (
        "| claim | paper | contrast | metric | claimed | mean ± se | n | verdict |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| CoPG wins \\| gold | paper B | copg - dpo | gold_reward | > 0 | +0.3 ± 0.041 | 4 | supported |\n"
        "| IPO is shorter | paper A | ipo - dpo | length_tokens | < 0 | -0.333 ± 0.88 | 3 | inconclusive |\n"
    )


def test_claims_blocks_of_a_readme_are_rendered_from_the_files_they_name(tmp_path):
    claim = Claim("CoPG wins", "paper B", "copg - dpo", "gold_reward", 1, 0.3, 0.0408, 4, "supported")
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


def test_the_committed_results_readme_says_what_its_claims_files_hold():
    """Every claims table of results/README.md is the one its claims.json renders (no hand edits)."""
    readme = ROOT / "results" / "README.md"
    text = readme.read_text()
    assert CLAIMS_BLOCK.search(text), "results/README.md has no generated claims table"
    assert render_claim_blocks(text, readme.parent) == text


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
