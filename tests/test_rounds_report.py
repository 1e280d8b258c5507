"""The rounds report (``make rounds``): each method's arm is a curve whose points are its rounds, read at
matched KL by hand; ``rounds.csv`` carries what iterative alignment is watched for, round by round."""

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from directalign.claims import read_claims
from directalign.errors import DataError
from directalign.frontier import ClaimSpec
from directalign.frontier_report import claim_specs
from directalign.report import SUMMARY_COLUMNS, PolicyResult, write_policies, write_table
from directalign.rounds_report import log_rounds_wandb, write_rounds_report
from tests.conftest import ROOT
from tests.test_wandb import read_offline_run

PROMPTS = ("p0", "p1")


def job(
    folder: Path, method: str, sampler: str, rounds: list[tuple[float, float, float]], seed: int = 0
) -> None:
    """One rounds job's results folder: SFT and ``method``'s rounds, each (KL, gold, eos rate) with its
    two prompts' gold ``0.01`` below and above the mean and KL the same on both; 32 steps a round."""
    folder.mkdir(parents=True)
    common = {"n_prompts": 2, "seed": 0, "proxy_reward": 1.0, "length_tokens": 10.0, "train_steps": 32}
    rows = [{column: None for column in SUMMARY_COLUMNS} | common | {"method": "sft", "kl_to_ref": 0.0}]
    results = [
        PolicyResult(
            "sft",
            None,
            None,
            {},
            [sample(p, 0.3 + d, 0.0) for p, d in zip(PROMPTS, (-0.01, 0.01), strict=True)],
            policy="s",
        )
    ]
    for index, (kl, gold, eos) in enumerate(rounds, start=1):
        name = method if index == len(rounds) else f"{method}_round{index}"
        rows.append(
            {column: None for column in SUMMARY_COLUMNS}
            | common
            | {"method": name, "beta": 0.1, "length_power": 0.0, "train_seed": seed}
            | {"kl_to_ref": kl, "gold_reward": gold, "eos_rate": eos}
        )
        samples = [sample(p, gold + d, kl) for p, d in zip(PROMPTS, (-0.01, 0.01), strict=True)]
        result = PolicyResult(name, 0.1, 0.0, {}, samples, policy=f"align/{method}{sampler}{index}{seed}")
        result.round = {"index": index, "sampler": sampler}
        results.append(result)
    write_table(rows, SUMMARY_COLUMNS, folder / "summary.csv")
    write_policies(results, rows, [], folder)


def sample(prompt: str, gold: float, kl: float) -> dict:
    return {"id": prompt, "proxy_reward": 1.0, "gold_reward": gold, "length_tokens": 10, "logratio": kl}


def gains(method: str) -> ClaimSpec:
    return ClaimSpec(
        f"{method} gains",
        "rounds",
        (f"{method} iterative", f"{method} offline"),
        "gold_reward",
        1,
        "kl_to_ref",
    )


@pytest.fixture
def sweep(tmp_path) -> Path:
    # Both arms share round 1 (KL 2, gold 0.30). dpo iterative: KL 4, 6 at gold 0.36, 0.40; offline: KL 3,
    # 6 at 0.32, 0.36. copg iterative: KL 4, 6 at 0.38, 0.46; offline as dpo's.
    first = (2.0, 0.30, 0.5)
    for seed in (0, 1):
        job(
            tmp_path / f"dpo_policy{seed}" / "results",
            "dpo",
            "policy",
            [first, (4, 0.36, 0.6), (6, 0.40, 0.7)],
            seed,
        )
        job(
            tmp_path / f"dpo_sft{seed}" / "results",
            "dpo",
            "sft",
            [first, (3, 0.32, 0.5), (6, 0.36, 0.5)],
            seed,
        )
        job(
            tmp_path / f"copg_policy{seed}" / "results",
            "copg",
            "policy",
            [first, (4, 0.38, 0.6), (6, 0.46, 0.8)],
            seed,
        )
        job(
            tmp_path / f"copg_sft{seed}" / "results",
            "copg",
            "sft",
            [first, (3, 0.32, 0.5), (6, 0.36, 0.5)],
            seed,
        )
    return tmp_path


def test_each_arm_is_a_curve_of_its_rounds_read_at_the_middle_of_the_shared_kl_range(sweep, tmp_path):
    out = tmp_path / "report"
    both = ClaimSpec(
        "copg gains more",
        "rounds",
        ("copg iterative", "copg offline", "dpo iterative", "dpo offline"),
        "gold_reward",
        1,
        "kl_to_ref",
    )
    write_rounds_report(sweep, out, [gains("dpo"), gains("copg"), both], {"gold_reward": 0.006})

    dpo, copg, more = read_claims(out / "claims.json")
    # Every curve spans KL 2 .. 6: read at 4. dpo iterative 0.36 (its round 2); offline half-way from 0.32
    # (KL 3) to 0.36 (KL 6), a third of the way: 0.32 + 0.04 / 3. Seeds equal, prompts alike: se 0.
    assert (dpo.protocol, dpo.at, dpo.n) == ("matched_kl", 4.0, 2)
    assert dpo.mean == pytest.approx(0.36 - (0.32 + 0.04 / 3))
    assert dpo.se == pytest.approx(0.0, abs=1e-12)
    assert copg.mean == pytest.approx(0.38 - (0.32 + 0.04 / 3))
    # (copg iterative - copg offline) - (dpo iterative - dpo offline) = 0.38 - 0.36
    assert more.contrast == "(copg iterative - copg offline) - (dpo iterative - dpo offline)"
    assert more.mean == pytest.approx(0.02)

    with (out / "rounds.csv").open() as handle:
        table = [r for r in csv.DictReader(handle) if r["curve"] == "dpo iterative" and r["seed"] == "1"]
    # Steps add up over the rounds; the KL gained each round is the step between cumulative KLs.
    assert [(r["round"], r["steps"]) for r in table] == [("1", "32"), ("2", "64"), ("3", "96")]
    assert [float(r["kl_this_round"]) for r in table] == [2.0, 2.0, 2.0]
    assert [float(r["eos_rate"]) for r in table] == [0.5, 0.6, 0.7]
    assert (out / "rounds.png").stat().st_size > 0 and (out / "frontier.png").stat().st_size > 0
    assert "| dpo gains |" in (out / "power.md").read_text()


def test_a_run_without_rounds_is_refused_in_one_line(sweep, tmp_path):
    folder = sweep / "plain" / "results"
    job(folder, "ipo", "policy", [(2.0, 0.3, 0.5)])
    records = (folder / "policies.json").read_text().replace('"round"', '"not_round"')
    (folder / "policies.json").write_text(records)
    with pytest.raises(DataError, match=r"job plain/results: policy ipo has no round .*pipeline.rounds > 1"):
        write_rounds_report(sweep, tmp_path / "report", [gains("dpo")], {})


def test_the_rounds_report_config_names_curves_of_the_rounds_sweep():
    cfg = OmegaConf.load(ROOT / "conf" / "rounds_report.yaml")
    specs = claim_specs(cfg)
    experiment = OmegaConf.load(ROOT / "conf" / "experiment" / "rounds.yaml")
    assert experiment.pipeline.rounds == 3
    methods = {name.rsplit(" ", 1)[0] for spec in specs for name in spec.contrast}
    arms = {name.rsplit(" ", 1)[1] for spec in specs for name in spec.contrast}
    assert methods == {"dpo", "ipo", "copg"} and arms == {"iterative", "offline"}
    assert all(spec.at == () and spec.along == "kl_to_ref" for spec in specs)


def test_the_wandb_run_logs_every_curve_by_round(sweep, tmp_path):
    out = tmp_path / "report"
    claims, table = write_rounds_report(sweep, out, [gains("dpo")], {"gold_reward": 0.006})

    run_dir = log_rounds_wandb(claims, table, out, mode="offline", dir=tmp_path / "wandb", project="test")

    run = read_offline_run(run_dir)
    # The last round logged: round 3, each curve's seed mean (both seeds alike here).
    assert run["summary"]["round"] == 3
    assert run["summary"]["dpo iterative/gold_reward"] == pytest.approx(0.40)
    assert run["summary"]["copg offline/kl_this_round"] == pytest.approx(3.0)
    assert {"rounds/table", "rounds/claims", "rounds/plot"} <= set(run["summary"])
