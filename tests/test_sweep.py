"""Sweeps: the sweep report over jobs' results, and a real multirun that shares its upstream stages."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from directalign.report import SUMMARY_COLUMNS, PolicyResult, write_policies, write_table
from directalign.sweep import REPORT_DIR, write_sweep_report
from tests.conftest import ROOT
from tests.test_wandb import read_offline_run


def fake_job(folder: Path, method: str, beta: float, gold: float) -> None:
    """A job's results folder as the pipeline writes it: the SFT row, then the aligned policy."""
    folder.mkdir(parents=True)

    def row(name, b, a, proxy, gold_reward, length):
        return {
            "method": name,
            "beta": b,
            "length_power": a,
            "proxy_reward": proxy,
            "gold_reward": gold_reward,
            "length_tokens": length,
            "kl_to_ref": 0.0 if b is None else 1 / beta,
            "win_rate_vs_sft": 0.5,
            "n_prompts": 8,
            "seed": 0,
        }

    rows = [row("sft", None, None, 0.0, 0.1, 10.0), row(method, beta, 0.0, gold + 1, gold, 12.0 + beta)]
    rows = [{column: None for column in SUMMARY_COLUMNS} | r for r in rows]
    curve = [
        {"step": s, "proxy_reward": s * gold, "gold_reward": s * gold / 2, "length_tokens": 12.0}
        for s in (0, 2)
    ]
    results = [
        PolicyResult("sft", None, None, {}, [], policy="sft/0"),
        PolicyResult(method, beta, 0.0, {}, [], curve, f"align/{method}{beta}"),
    ]
    write_table(rows, SUMMARY_COLUMNS, folder / "summary.csv")
    write_policies(results, rows, [], folder)


def test_sweep_report_picks_each_methods_best_beta_by_gold(tmp_path):
    grid = {"dpo": {0.03: 0.2, 0.1: 0.5, 0.3: 0.4}, "ipo": {0.01: 0.6, 0.1: 0.3}}
    for method, golds in grid.items():
        for beta, gold in golds.items():
            fake_job(tmp_path / f"{method}_{beta}" / "results", method, beta, gold)

    out = write_sweep_report(tmp_path)

    assert out == tmp_path / REPORT_DIR
    with (out / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], float(r["beta"])) for r in rows] == [
        ("dpo", 0.03),
        ("dpo", 0.1),
        ("dpo", 0.3),
        ("ipo", 0.01),
        ("ipo", 0.1),
    ]
    assert rows[0]["job"] == "dpo_0.03/results"
    summary = (out / "sweep_summary.md").read_text()
    assert (
        "**dpo**: beta 0.1 (gold_reward 0.5)" in summary and "**ipo**: beta 0.01 (gold_reward 0.6)" in summary
    )
    for plot in ("reward_vs_beta.png", "reward_vs_step_best_beta.png"):
        assert (out / plot).stat().st_size > 0, plot
    assert write_sweep_report(tmp_path) == out, "a rerun must not read its own report as a job"


def test_sweep_report_of_a_sweep_without_evaluations_is_skipped(tmp_path):
    (tmp_path / "0").mkdir()
    assert write_sweep_report(tmp_path) is None
    assert not (tmp_path / REPORT_DIR).exists()


@pytest.mark.slow
def test_multirun_shares_upstream_stages_and_writes_one_sweep_report(tmp_path):
    """`-m method=dpo,ipo`: sft, reward and generate computed once, one report row per job."""
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    command = [
        sys.executable,
        "pipelines/run.py",
        "-m",
        "experiment=smoke_sweep",
        "method=dpo,ipo",
        f"paths.store={store}",
        f"hydra.sweep.dir={sweep}",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]

    computed = {
        stage: len(list((store / stage).glob("*/manifest.json"))) for stage in ("sft", "reward", "generate")
    }
    assert computed == {"sft": 1, "reward": 1, "generate": 1}
    assert len(list((store / "align").glob("*/manifest.json"))) == 2
    assert len(list((store / "evaluate").glob("*/manifest.json"))) == 3, "the SFT baseline is evaluated once"

    jobs = {"dpo_beta0.1_a0.0", "ipo_beta0.1_a0.0"}
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == jobs | {REPORT_DIR}
    with (sweep / REPORT_DIR / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["job"] for r in rows) == sorted(f"{job}/results" for job in jobs)
    assert (sweep / REPORT_DIR / "reward_vs_beta.png").is_file()
    assert (sweep / REPORT_DIR / "reward_vs_step_best_beta.png").is_file()

    for job in jobs:
        runs = [read_offline_run(run) for run in (sweep / job / "wandb").glob("offline-run-*")]
        (evaluation,) = [run for run in runs if run["name"] == "evaluate"]
        assert evaluation["group"] == "_".join(sweep.parts[-2:])
        assert f"method={job.split('_')[0]}" in evaluation["tags"] and "beta=0.1" in evaluation["tags"]
