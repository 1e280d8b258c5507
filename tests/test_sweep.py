"""Sweeps: the sweep report over jobs' results, and a real multirun that shares its upstream stages."""

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from directalign.report import SUMMARY_COLUMNS, PolicyResult, write_policies, write_table
from directalign.sweep import PICKS_FILE, REPORT_DIR, write_sweep_report
from tests.conftest import ROOT
from tests.test_wandb import read_offline_run


def fake_job(
    folder: Path, method: str, beta: float, proxy: float, kl: float | None = None, curve: bool = True
) -> None:
    """A job's results folder as the pipeline writes it: the SFT row, the aligned policy (gold half its
    proxy, its reward curve unless ``curve`` is false), then best-of-2 over the SFT samples."""
    folder.mkdir(parents=True)

    def row(name, b, a, proxy_reward, kl_to_ref, length):
        return {
            "method": name,
            "beta": b,
            "length_power": a,
            "proxy_reward": proxy_reward,
            "proxy_se": 0.01,
            "gold_reward": proxy_reward / 2,
            "gold_se": 0.02,
            "length_tokens": length,
            "kl_to_ref": kl_to_ref,
            "win_rate_vs_sft": 0.5,
            "n_prompts": 8,
            "seed": 0,
        }

    rows = [
        row("sft", None, None, 0.0, 0.0, 10.0),
        row(method, beta, 0.0, proxy, 1 / beta if kl is None else kl, 12.0 + beta),
    ]
    rows = [{column: None for column in SUMMARY_COLUMNS} | r for r in rows]
    frontier = [{column: None for column in SUMMARY_COLUMNS} | row("best_of_2", None, None, 0.3, 0.193, 10.0)]
    curve = [
        {"step": s, "proxy_reward": s * proxy, "gold_reward": s * proxy / 2, "length_tokens": 12.0}
        for s in (0, 2)
        if curve
    ]
    results = [
        PolicyResult("sft", None, None, {}, [], policy="sft/0"),
        PolicyResult(method, beta, 0.0, {}, [], curve, f"align/{method}{beta}"),
    ]
    write_table(rows, SUMMARY_COLUMNS, folder / "summary.csv")
    write_policies(results, rows, frontier, folder)


def test_sweep_report_picks_the_beta_of_highest_proxy_averaged_over_training_seeds(tmp_path):
    # beta 0.1's best single seed (0.9) loses to beta 0.3's seed mean: (0.9 + 0.1) / 2 < (0.6 + 0.6) / 2.
    seeds = {0.03: (0.2, 0.2), 0.1: (0.9, 0.1), 0.3: (0.6, 0.6)}
    for beta, proxies in seeds.items():
        for seed, proxy in enumerate(proxies):
            fake_job(tmp_path / f"dpo_{beta}_seed{seed}" / "results", "dpo", beta, proxy, kl=10.0 + seed)

    pick = json.loads((write_sweep_report(tmp_path) / PICKS_FILE).read_text())["dpo"]

    assert (pick["beta"], pick["grid"], pick["interior"]) == (0.3, [0.03, 0.1, 0.3], False)
    assert pick["proxy_reward"] == pytest.approx(0.6) and pick["kl_to_ref"] == pytest.approx(10.5)


def test_sweep_report_picks_each_methods_beta_by_proxy_and_says_whether_interior(tmp_path):
    grid = {"dpo": {0.03: 0.2, 0.1: 0.5, 0.3: 0.4}, "ipo": {0.01: 0.6, 0.03: 0.5, 0.1: 0.3}}
    for method, proxies in grid.items():
        for beta, proxy in proxies.items():
            fake_job(tmp_path / f"{method}_{beta}" / "results", method, beta, proxy)

    out = write_sweep_report(tmp_path)

    assert out == tmp_path / REPORT_DIR
    with (out / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], float(r["beta"])) for r in rows] == [
        ("dpo", 0.03),
        ("dpo", 0.1),
        ("dpo", 0.3),
        ("ipo", 0.01),
        ("ipo", 0.03),
        ("ipo", 0.1),
    ]
    assert rows[0]["job"] == "dpo_0.03/results"
    picks = json.loads((out / PICKS_FILE).read_text())
    assert (picks["dpo"]["beta"], picks["dpo"]["interior"]) == (0.1, True)
    assert (picks["ipo"]["beta"], picks["ipo"]["interior"]) == (0.01, False)
    assert picks["ipo"]["grid"] == [0.01, 0.03, 0.1]
    summary = (out / "sweep_summary.md").read_text()
    assert "**dpo**: beta 0.1 (proxy 0.5 ± 0.01, gold 0.25, KL 10); grid 0.03, 0.1, 0.3: interior" in summary
    assert "**ipo**: beta 0.01 (proxy 0.6" in summary and "at the grid's lowest beta" in summary
    for plot in ("reward_vs_beta.png", "reward_vs_kl.png", "reward_vs_step_best_beta.png"):
        assert (out / plot).stat().st_size > 0, plot
        assert f"]({plot})" in summary, plot
    assert write_sweep_report(tmp_path) == out, "a rerun must not read its own report as a job"


def test_jobs_without_reward_curves_get_no_reward_vs_step_plot(tmp_path):
    for beta in (0.1, 0.3):
        fake_job(tmp_path / f"dpo_{beta}" / "results", "dpo", beta, 0.5, curve=False)
    out = tmp_path / REPORT_DIR
    out.mkdir()
    (out / "reward_vs_step_best_beta.png").write_bytes(b"a plot of an earlier report")

    write_sweep_report(tmp_path)

    assert not (out / "reward_vs_step_best_beta.png").exists()
    assert "reward_vs_step" not in (out / "sweep_summary.md").read_text()
    assert (out / "reward_vs_kl.png").stat().st_size > 0


def test_scores_at_matched_kl_are_interpolated_along_each_methods_betas(tmp_path):
    # dpo at KL 1 (proxy 0.2) and KL 3 (proxy 0.6); copg at KL 2.5 only (no curve to read).
    fake_job(tmp_path / "a" / "results", "dpo", 0.3, 0.2, kl=1.0)
    fake_job(tmp_path / "b" / "results", "dpo", 0.1, 0.6, kl=3.0)
    fake_job(tmp_path / "c" / "results", "copg", 0.1, 0.9, kl=2.5)

    out = write_sweep_report(tmp_path, tmp_path / "report", matched_kl=[1.5, 4.0])

    with (out / "matched_kl.csv").open() as handle:
        (row,) = list(csv.DictReader(handle))
    # A quarter of the way from KL 1 to KL 3: 0.2 + 0.25 * 0.4 = 0.3 proxy, gold half of it.
    assert row["method"] == "dpo" and float(row["kl_to_ref"]) == 1.5
    assert float(row["proxy_reward"]) == pytest.approx(0.3)
    assert float(row["gold_reward"]) == pytest.approx(0.15)
    assert row["betas"] == "0.1-0.3"


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

    # The frontier report of the same sweep, through its entry point: one claim at the picks (one beta a
    # method here), every policy's per-prompt means, and claims that recompute from those files.
    report = tmp_path / "frontier"
    claim = "{claim: x, paper: B, contrast: [dpo, ipo], metric: proxy_reward, direction: 1, along: null}"
    command = [sys.executable, "pipelines/frontier_report.py", f"sweep_dir={sweep}", f"out={report}"]
    command.append(f"hydra.run.dir={tmp_path / 'report_run'}")
    result = subprocess.run(
        [*command, f"claims=[{claim}]"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (row,) = json.loads((report / "claims.json").read_text())
    assert (row["protocol"], row["contrast"], row["n"], row["seeds"]) == ("at_pick", "dpo - ipo", 8, 1)
    with (report / "per_prompt.csv").open() as handle:
        assert sorted(Counter(r["curve"] for r in csv.DictReader(handle)).items()) == [
            ("dpo", 8),
            ("ipo", 8),
            ("sft", 8),
        ]
    check = [sys.executable, "pipelines/recompute_claims.py", "--check", str(report)]
    assert subprocess.run(check, cwd=ROOT, env=env, capture_output=True).returncode == 0

    for job in jobs:
        runs = [read_offline_run(run) for run in (sweep / job / "wandb").glob("offline-run-*")]
        (evaluation,) = [run for run in runs if run["name"] == "evaluate"]
        assert evaluation["group"] == "_".join(sweep.parts[-2:])
        assert f"method={job.split('_')[0]}" in evaluation["tags"] and "beta=0.1" in evaluation["tags"]
