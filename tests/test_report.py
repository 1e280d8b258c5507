"""The results contract that report.py writes, and the policy records a sweep report reads back."""

import csv
import json
import math

import pytest

from directalign.estimates import paired_difference
from directalign.prompts import Prompts
from directalign.report import POLICIES_FILE, SUMMARY_COLUMNS, PolicyResult, write_report
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
    # the same texts on every prompt: four ties, no win, no loss
    assert (rows[1]["wins"], rows[1]["ties"], rows[1]["losses"]) == (0, 4, 0)
    assert rows[1]["win_rate_vs_sft"] == 0.5 and table[1]["seed"] == "3"
    for name in ("summary.md", "length_vs_score.png", "reward_vs_kl.png", "reward_vs_step.png", "samples.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / POLICIES_FILE).read_text())
    assert [r["method"] for r in records] == ["sft", "dpo"] and records[0]["beta"] is None
    assert records[1]["curve"] == results[1].curve and records[1]["policy"] == results[1].policy
    assert {k: records[1][k] for k in SUMMARY_COLUMNS} == rows[1]
    # one sample a prompt: each prompt's mean is its sample's value (dpo's samples: offset 0.3)
    assert records[1]["prompt_means"]["length_tokens"] == {"p0": 5, "p1": 6, "p2": 7, "p3": 8}
    assert records[1]["prompt_means"]["kl_to_ref"] == {f"p{i}": 0.3 for i in range(4)}
    assert records[1]["prompt_means"]["proxy_reward"]["p2"] == pytest.approx(0.5)
    assert records[1]["sample_lengths"] == [5, 6, 7, 8]


def test_paired_difference_by_hand():
    baseline = [{"id": f"p{i}", "gold_reward": g} for i, g in enumerate([0.1, 0.2, 0.3, 0.4])]
    policy = [{"id": f"p{i}", "gold_reward": g} for i, g in reversed(list(enumerate([0.2, 0.2, 0.5, 0.4])))]
    # differences 0.1, 0, 0.2, 0: mean 0.075; sample variance 0.0275 / 3; s.e. sqrt(0.0275 / 3) / 2
    difference = paired_difference([policy], [baseline], "gold_reward")
    assert math.isclose(difference.mean, 0.075) and math.isclose(difference.se, math.sqrt(0.0275 / 3) / 2)


def test_samples_of_a_prompt_are_averaged_and_seeds_add_their_spread():
    def samples(values: list[list[float]]) -> list[dict]:
        return [
            {"id": f"p{i}", "sample": k, "gold_reward": v}
            for i, prompt in enumerate(values)
            for k, v in enumerate(prompt)
        ]

    baseline = samples([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    # seed 0: per-prompt means 0.1, 0.2, 0.3; seed 1: 0.3, 0.4, 0.5. Seeds averaged: 0.2, 0.3, 0.4,
    # mean 0.3, prompt SE sqrt(0.01) / sqrt(3); seed means 0.2 and 0.4: variance 0.02, / 2 seeds = 0.01.
    seeds = [samples([[0.0, 0.2], [0.1, 0.3], [0.3, 0.3]]), samples([[0.3, 0.3], [0.4, 0.4], [0.5, 0.5]])]
    difference = paired_difference(seeds, [baseline], "gold_reward")
    assert difference.differences == pytest.approx([0.2, 0.3, 0.4]) and difference.mean == pytest.approx(0.3)
    assert difference.se == pytest.approx(math.sqrt(0.01 / 3 + 0.01))


def test_paired_table_lists_every_policy_against_sft_and_the_contrasts(tmp_path):
    results = fake_results()
    results[1].samples[0]["completion"] = "another headline"
    no_examples = prompts([], [], [])
    write_report(results, no_examples, tmp_path, seed=0, contrasts=[["sft", "dpo"]])
    # dpo's proxy is sft's + 0.3 on every prompt (zero spread), gold + 0.15, same lengths, log-ratio 0.3
    by_metric = {
        (r["policy"], r["against"], r["metric"]): r for r in csv.DictReader((tmp_path / "paired.csv").open())
    }
    assert float(by_metric["dpo", "sft", "proxy_reward"]["mean"]) == pytest.approx(0.3)
    assert float(by_metric["dpo", "sft", "gold_reward"]["mean"]) == pytest.approx(0.15)
    assert float(by_metric["dpo", "sft", "length_tokens"]["mean"]) == 0.0
    assert float(by_metric["dpo", "sft", "kl_to_ref"]["se"]) == pytest.approx(0.0)
    assert float(by_metric["sft", "dpo", "proxy_reward"]["mean"]) == pytest.approx(-0.3)
    assert by_metric["sft", "dpo", "proxy_reward"]["n"] == "4"


def metrics(level: float) -> dict:
    means = {"proxy_reward": level, "gold_reward": level, "length_tokens": 4.5, "kl_to_ref": level}
    return means | {"n_prompts": 2, "n_samples": 2}


def test_best_of_n_rows_and_claims_from_the_baseline_pool(tmp_path):
    # SFT draws 4 samples per prompt (2 of its own, 2 more for the pool); the proxy grows with the
    # sample number on p0 and falls on p1, so best-of-n picks sample n-1 on p0 and sample 0 on p1.
    def sample(prompt: int, k: int, proxy: float, gold: float) -> dict:
        return {"id": f"p{prompt}", "sample": k, "completion": f"t{prompt}{k}", "length_tokens": 4 + k} | {
            "proxy_reward": proxy,
            "gold_reward": gold,
            "logratio": 0.0,
        }

    sft_samples = [sample(0, k, k / 10, k) for k in range(4)] + [sample(1, k, -k / 10, -k) for k in range(4)]
    sft = PolicyResult("sft", None, None, metrics(0.0) | {"temperature": 1.0}, sft_samples)
    better = [
        s | {"completion": "x", "proxy_reward": s["proxy_reward"] + 1, "gold_reward": s["gold_reward"] + 1}
        for s in sft_samples
        if s["sample"] < 2
    ]
    dpo = PolicyResult("dpo", 0.1, 0.0, metrics(1.0), better, train_seed=0)
    claim = {
        "claim": "DPO beats SFT",
        "paper": "B",
        "contrast": ["dpo", "sft"],
        "metric": "gold_reward",
        "direction": 1,
    }

    rows = write_report([sft, dpo], prompts([], [], []), tmp_path, seed=0, claims=[claim], best_of=[1, 2, 4])

    frontier = {row["method"]: row for row in rows if row["method"].startswith("best_of_")}
    assert list(frontier) == ["best_of_1", "best_of_2", "best_of_4"]
    assert [frontier[f"best_of_{n}"]["kl_to_ref"] for n in (1, 2, 4)] == pytest.approx(
        [0.0, math.log(2) - 1 / 2, math.log(4) - 3 / 4]
    )
    # best_of_4 picks sample 3 on p0 (gold 3) and sample 0 on p1 (gold 0): mean 1.5
    assert frontier["best_of_4"]["gold_reward"] == pytest.approx(1.5)
    assert (rows[1]["wins"], rows[1]["ties"], rows[1]["losses"]) == (4, 0, 0)
    (record,) = json.loads((tmp_path / "claims.json").read_text())
    # gold + 1 on every sample of both prompts: difference 1 with no spread
    assert record["mean"] == pytest.approx(1.0) and record["verdict"] == "supported"
