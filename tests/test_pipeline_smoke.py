"""End to end: `pipelines/run.py experiment=smoke` from the command line, then a rerun that
recomputes nothing."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

METHODS = ["sft", "dpo", "ipo", "copg", "avg_dpo", "avg_ipo", "avg_copg", "simpo"]
BEST_OF = ["best_of_1", "best_of_2", "best_of_4"]


def run_smoke(store, results, *extra):
    command = [
        sys.executable,
        "pipelines/run.py",
        "experiment=smoke",
        f"paths.store={store}",
        f"paths.results_dir={results}",
        *extra,
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    result = run_smoke(tmp / "store", tmp / "results", f"hydra.run.dir={tmp}/hydra")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_summary_has_a_finite_row_per_method(smoke_run):
    with (smoke_run / "results" / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == METHODS + BEST_OF
    for row in rows:
        for key in (
            "proxy_reward",
            "gold_reward",
            "length_tokens",
            "kl_to_ref",
            "proxy_se",
            "gold_se",
            "kl_se",
        ):
            assert math.isfinite(float(row[key])), (row["method"], key)
    for row in rows[1 : len(METHODS)]:
        assert int(row["wins"]) + int(row["ties"]) + int(row["losses"]) == 2 * int(row["n_prompts"])
        assert math.isfinite(float(row["win_rate_vs_sft"])) and int(row["train_steps"]) > 0
    files = ("summary.md", "paired.csv", "paired.md", "summary_greedy.csv", "policies.json", "samples.md")
    for name in (*files, "length_vs_score.png", "reward_vs_kl.png", "reward_vs_step.png"):
        assert (smoke_run / "results" / name).stat().st_size > 0, name


@pytest.mark.slow
def test_every_stage_wrote_a_manifest_and_a_loadable_policy(smoke_run):
    from transformers import AutoModelForCausalLM

    manifests = sorted((smoke_run / "store").glob("*/*/manifest.json"))
    stages = {m.parent.parent.name for m in manifests}
    assert stages == {"sft", "reward", "generate", "align", "evaluate"}
    assert len([m for m in manifests if m.parent.parent.name == "align"]) == len(METHODS) - 1  # all but sft
    aligned = next((smoke_run / "store" / "align").glob("*/model"))
    assert AutoModelForCausalLM.from_pretrained(aligned).config.model_type == "llama"


@pytest.mark.slow
def test_rerun_recomputes_nothing(smoke_run):
    before = {p: p.stat().st_mtime_ns for p in (smoke_run / "store").glob("*/*/manifest.json")}
    result = run_smoke(smoke_run / "store", smoke_run / "results2", f"hydra.run.dir={smoke_run}/hydra2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computing into" not in result.stdout + result.stderr
    after = {p: p.stat().st_mtime_ns for p in (smoke_run / "store").glob("*/*/manifest.json")}
    assert after == before
    first = (smoke_run / "results" / "summary.csv").read_text()
    assert (smoke_run / "results2" / "summary.csv").read_text() == first
    assert (
        json.loads(next((smoke_run / "store" / "sft").glob("*/manifest.json")).read_text())["metrics"][
            "n_examples"
        ]
        > 0
    )
