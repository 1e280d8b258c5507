"""The results contract that report.py writes, and the curves a sweep report reads back."""

import csv
import json

from directalign.report import CURVES_FILE, SUMMARY_COLUMNS, write_report
from tests.test_wandb import fake_results


def test_report_writes_the_contract_and_the_aligned_curves(tmp_path):
    results = fake_results()
    examples = {"id": ["p0", "p1"], "source": ["One article.", "Another."], "reference": ["One", "Two"]}

    rows = write_report(results, examples, tmp_path, seed=3)

    with (tmp_path / "summary.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == SUMMARY_COLUMNS
    assert [r["method"] for r in table] == ["sft", "dpo"] and table[0]["beta"] == ""
    assert rows[1]["win_rate_vs_sft"] == 1.0 and table[1]["seed"] == "3"
    for name in ("summary.md", "length_vs_score.png", "reward_vs_kl.png", "reward_vs_step.png", "samples.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    curves = json.loads((tmp_path / CURVES_FILE).read_text())
    assert curves == [{"method": "dpo", "beta": 0.1, "length_power": 0.0, "points": results[1].curve}]
