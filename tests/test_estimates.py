"""Means over samples with standard errors over prompts, by hand."""

import math

import pytest

from directalign.estimates import sample_metrics


def test_sample_metrics_average_samples_within_a_prompt_before_the_standard_error():
    def record(prompt: str, proxy: float, logratio: float, ended: bool) -> dict:
        scores = {"proxy_reward": proxy, "gold_reward": None, "logratio": logratio}
        return {"id": prompt, "length_tokens": 4, "ended": ended} | scores

    records = [record("a", 1.0, 0.5, True), record("a", 3.0, 1.5, False), record("b", 6.0, 2.0, True)]
    records.append(record("b", 6.0, 4.0, True))
    metrics = sample_metrics(records, has_gold=False)
    # proxy: mean over the 4 samples 4.0; per-prompt means 2 and 6, SE = std(2, 6) / sqrt(2) = 2
    assert metrics["proxy_reward"] == pytest.approx(4.0) and metrics["proxy_se"] == pytest.approx(2.0)
    # KL: samples 0.5, 1.5, 2, 4 -> 2.0; per-prompt 1 and 3 -> SE sqrt(2) / sqrt(2) = 1
    assert metrics["kl_to_ref"] == pytest.approx(2.0) and metrics["kl_se"] == pytest.approx(1.0)
    assert metrics["length_se"] == 0.0 and math.isclose(metrics["eos_rate"], 0.75)
    assert metrics["gold_reward"] is None and metrics["n_prompts"] == 2
