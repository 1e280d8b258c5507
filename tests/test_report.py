"""The results contract that report.py writes, and the policy records a sweep report reads back."""

import csv
import json
import math

from directalign.prompts import Prompts
from directalign.report import POLICIES_FILE, SUMMARY_COLUMNS, paired_difference, write_report
from tests.test_wandb import fake_results


def prompts(ids: list[str], sources: list[str], references: list[str]) -> Prompts:
    return Prompts("eval", [[1]] * len(ids), ids, sources, references, n_truncated=0)


def test_report_writes_the_contract_and_the_policy_records(tmp_path):
    results = fake_results()
    examples = prompts(["p0", "p1"], ["One article.", "Another."], ["One", "Two"])

    rows = write_report(results, examples, tmp_path, seed=3)

    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert [r["method"] for r in table] == ["sft", "dpo"] and table[0]["beta"] == ""
    assert rows[1]["win_rate_vs_sft"] == 1.0 and table[1]["seed"] == "3"
    for name in ("summary.md", "length_vs_score.png", "reward_vs_kl.png", "reward_vs_step.png", "samples.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / POLICIES_FILE).read_text())
    assert [r["method"] for r in records] == ["sft", "dpo"] and records[0]["beta"] is None
    assert records[1]["curve"] == results[1].curve and records[1]["policy"] == results[1].policy
    assert {k: records[1][k] for k in SUMMARY_COLUMNS} == rows[1]


def test_paired_difference_by_hand():
    baseline = [{"id": f"p{i}", "gold_reward": g} for i, g in enumerate([0.1, 0.2, 0.3, 0.4])]
    policy = [{"id": f"p{i}", "gold_reward": g} for i, g in reversed(list(enumerate([0.2, 0.2, 0.5, 0.4])))]
    # differences 0.1, 0, 0.2, 0: mean 0.075; sample variance 0.0275 / 3; s.e. sqrt(0.0275 / 3) / 2
    mean, error = paired_difference(policy, baseline, "gold_reward")
    assert math.isclose(mean, 0.075) and math.isclose(error, math.sqrt(0.0275 / 3) / 2)


def test_paired_table_lists_every_policy_against_sft_and_the_contrasts(tmp_path):
    results = fake_results()
    results[1].samples[0]["completion"] = "another headline"
    no_examples = prompts([], [], [])
    write_report(results, no_examples, tmp_path, seed=0, contrasts=[["sft", "dpo"]])
    rows = [line for line in (tmp_path / "paired.md").read_text().splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| dpo - sft", "| sft - dpo"]
    # dpo's proxy is sft's + 0.3 on every prompt (zero spread), gold + 0.15, same lengths
    assert rows[1].split(" | ")[1:] == ["+0.3000 ± 0.0000", "+0.1500 ± 0.0000", "+0.0000 ± 0.0000", "1/4 |"]
    assert rows[2].split(" | ")[1] == "-0.3000 ± 0.0000"
