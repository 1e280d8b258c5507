"""The length study's claims, read off two curves of one loss at the middle of their common range, by
hand: interpolation between the bracketing betas, the paired standard error, the verdict rule; and the
jobs `make length` runs."""

import csv
import itertools
from collections import defaultdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from directalign.claims import read_claims
from directalign.errors import ConfigError, DataError
from directalign.frontier import ClaimSpec
from directalign.length_study import write_length_report
from directalign.report import SUMMARY_COLUMNS, PolicyResult, write_policies, write_table
from tests.conftest import ROOT, compose_config


def job(
    folder: Path,
    beta: float,
    length_power: float,
    kl: float,
    length: float,
    gold: float,
    spread: tuple[float, float] | None = (0.0, 0.0),
) -> None:
    """A length-sweep job's results folder: the SFT row and one dpo policy whose two prompts' length
    and KL lie ``spread`` (length, KL) below (p0) and above (p1) its means; None: no per-prompt means
    (a job evaluated by an older version)."""
    folder.mkdir(parents=True)
    common = {"proxy_se": 0.1, "gold_se": 0.01, "length_se": 0.5, "kl_se": 0.2, "n_prompts": 64, "seed": 0}
    rows = [
        {"method": "sft", "proxy_reward": 0.0, "gold_reward": 0.3, "length_tokens": 18.0, "kl_to_ref": 0.0},
        {
            "method": "dpo",
            "beta": beta,
            "length_power": length_power,
            "proxy_reward": 1.0,
            "gold_reward": gold,
            "length_tokens": length,
            "kl_to_ref": kl,
        },
    ]
    rows = [{column: None for column in SUMMARY_COLUMNS} | common | r for r in rows]
    samples = [
        {"id": prompt, "proxy_reward": 1.0, "gold_reward": gold}
        | {"length_tokens": length + sign * spread[0], "logratio": kl + sign * spread[1]}
        for prompt, sign in (("p0", -1), ("p1", 1))
        if spread is not None
    ]
    sft_samples = [
        {"id": prompt, "proxy_reward": 0.0, "gold_reward": 0.3, "length_tokens": length, "logratio": 0.0}
        for prompt, length in (("p0", 17), ("p1", 19))
    ]
    results = [
        PolicyResult("sft", None, None, {}, sft_samples, policy="sft/0"),
        PolicyResult("dpo", beta, length_power, {}, samples, [], f"align/{beta}{length_power}"),
    ]
    write_table(rows, SUMMARY_COLUMNS, folder / "summary.csv")
    write_policies(results, rows, [], folder)


def claim(metric: str, along: str) -> ClaimSpec:
    return ClaimSpec("averaging shortens", "Averaging (A)", ("dpo a=1", "dpo a=0"), metric, -1, along)


def report(sweep: Path, out: Path, specs: list[ClaimSpec], matched_kl=()) -> Path:
    write_length_report(sweep, out, specs, {"length_tokens": 0.5}, matched_kl)
    return out


@pytest.fixture
def sweep(tmp_path) -> Path:
    # dpo a=0: KL 2 -> 8 as beta falls, length 16 -> 20; dpo a=1: KL 1 -> 6, length 12 -> 14. Each job's
    # two prompts spread around its means by (length, KL).
    job(tmp_path / "s1" / "results", 0.3, 0.0, kl=2.0, length=16.0, gold=0.36, spread=(1.0, 0.0))
    job(tmp_path / "s2" / "results", 0.1, 0.0, kl=8.0, length=20.0, gold=0.40, spread=(2.0, 1.0))
    job(tmp_path / "a1" / "results", 6.0, 1.0, kl=1.0, length=12.0, gold=0.30, spread=(0.5, 0.5))
    job(tmp_path / "a2" / "results", 2.0, 1.0, kl=6.0, length=14.0, gold=0.38, spread=(1.0, 0.0))
    return tmp_path


def test_length_at_matched_kl_is_read_in_the_middle_of_the_common_kl_range(sweep, tmp_path):
    specs = [claim("length_tokens", "kl_to_ref"), claim("gold_reward", "length_tokens")]
    out = report(sweep, tmp_path / "report", specs, matched_kl=[4])

    at_kl, at_length = read_claims(out / "claims.json")
    # KLs [2, 8] and [1, 6] share [2, 6]: read at 4. a=0: a third of the way from 16 to 20 (slope 2/3 a
    # nat); a=1: three fifths of the way from 12 to 14 (slope 2/5).
    assert (at_kl.contrast, at_kl.protocol, at_kl.at) == ("dpo a=1 - dpo a=0", "matched_kl", 4.0)
    assert at_kl.mean == pytest.approx((12 + 0.6 * 2) - (16 + 4 / 3))
    # Prompt p1's term moves each curve by (1 - t)(length + - slope KL +) of low plus t(...) of high
    # (p0's by minus that): a=1 2/5 (0.5 - 2/5 0.5) + 3/5 (1 - 0); a=0 2/3 (1 - 0) + 1/3 (2 - 2/3 1).
    # Two prompts whose differences lie c either side of the mean: standard error c.
    ours, theirs = 2 / 5 * (0.5 - 2 / 5 * 0.5) + 3 / 5 * 1, 2 / 3 * 1 + 1 / 3 * (2 - 2 / 3 * 1)
    assert at_kl.se == pytest.approx(abs(ours - theirs))
    assert at_kl.n == 2 and at_kl.verdict == "supported"
    # Lengths [16, 20] and [12, 14] share nothing: no claim can be read.
    assert at_length.n == 0 and at_length.verdict == "inconclusive" and at_length.at is None
    assert at_length.protocol == "matched_length" and at_length.p == 1.0
    assert (out / "length_vs_score.png").stat().st_size > 0
    assert (out / "matched_kl.md").is_file()
    # SFT's samples run 17 and 19 tokens: mean 18, tenth percentile 17.2; then every policy by curve.
    with (out / "length_distribution.csv").open() as handle:
        distribution = list(csv.DictReader(handle))
    assert [r["policy"] for r in distribution] == [
        "sft",
        "dpo a=0 beta=0.1 seed=0",
        "dpo a=0 beta=0.3 seed=0",
        "dpo a=1 beta=2 seed=0",
        "dpo a=1 beta=6 seed=0",
    ]
    assert float(distribution[0]["mean"]) == 18 and float(distribution[0]["q10"]) == pytest.approx(17.2)
    # dpo a=0 at beta 0.1: mean length 20, spread 2 tokens either side
    assert (float(distribution[1]["q50"]), float(distribution[1]["q90"])) == pytest.approx((20, 21.6))


def test_prompt_effects_the_curves_share_cancel_in_the_paired_error(tmp_path):
    # Every job's prompts spread alike in length and not in KL: the difference is the same on both
    # prompts, so its standard error is 0 where the unpaired one would be 0.5 x sqrt(2).
    for name, beta, a, kl, length in (("s1", 0.3, 0.0, 2.0, 16.0), ("s2", 0.1, 0.0, 8.0, 20.0)) + (
        ("a1", 6.0, 1.0, 1.0, 12.0),
        ("a2", 2.0, 1.0, 6.0, 14.0),
    ):
        job(tmp_path / name / "results", beta, a, kl=kl, length=length, gold=0.3, spread=(3.0, 0.0))
    out = report(tmp_path, tmp_path / "report", [claim("length_tokens", "kl_to_ref")])
    (at_kl,) = read_claims(out / "claims.json")
    assert at_kl.se == pytest.approx(0.0, abs=1e-12) and at_kl.n == 2


def test_a_job_without_per_prompt_means_is_refused_in_one_line(sweep, tmp_path):
    job(sweep / "old" / "results", 1.0, 1.0, kl=3.0, length=13.0, gold=0.3, spread=None)
    with pytest.raises(DataError, match="job old/results has no per-prompt means"):
        report(sweep, tmp_path / "report", [claim("length_tokens", "kl_to_ref")])


def test_a_claim_about_a_curve_the_sweep_lacks_is_refused(sweep, tmp_path):
    spec = ClaimSpec("x", "A", ("ipo a=1", "dpo a=0"), "length_tokens", -1, "kl_to_ref")
    with pytest.raises(ConfigError, match=r"no curve \['ipo a=1'\]"):
        report(sweep, tmp_path / "report", [spec])


def test_a_claim_must_read_a_metric_along_another_axis():
    with pytest.raises(ConfigError, match="along"):
        claim("length_tokens", "length_tokens")


def make_jobs(variable: str, target: str) -> list[list[str]]:
    """The overrides of every job a Makefile target runs through ``$(variable)`` (multiruns expanded)."""
    jobs = []
    makefile = (ROOT / "Makefile").read_text()
    run = makefile.split(f"{variable} := ")[1].splitlines()[0].split("run.py -m ")[1]
    lines = makefile.split(f"\n{target}:")[1].split("\n\n")[0].splitlines()
    for line in lines:
        if f"$({variable})" not in line:
            continue
        args = f"{run} {line.split(f'$({variable})')[1]}".replace("$(LENGTH_BIAS)", "0.0")
        overrides = [arg.split("=", 1) for arg in args.split()]
        jobs += [
            [f"{key}={value}" for key, value in zip([k for k, _ in overrides], combo, strict=True)]
            for combo in itertools.product(*(values.split(",") for _, values in overrides))
        ]
    return jobs


def test_make_length_sweeps_every_curve_its_claims_read(tmp_path):
    """Each (loss, a) of the claims has at least two betas in `make length`, each trained with two seeds,
    and every job composes."""
    curves = defaultdict(set)
    for overrides in make_jobs("LENGTH_RUN", "length"):
        cfg = compose_config(overrides, tmp_path)
        curves[f"{cfg.method.loss} a={cfg.method.length_power:g}"].add(cfg.method.beta)
        assert cfg.task.max_completion_tokens >= 48 and cfg.stage.evaluate.prompt_offset == 0
        assert len(cfg.method.seeds) >= 2
    claims = OmegaConf.load(ROOT / "conf" / "length_report.yaml").claims
    assert {name for claim in claims for name in claim.contrast} <= set(curves)
    assert set(curves) == {f"{loss} a={a}" for loss in ("dpo", "copg") for a in ("0", "1")}
    assert all(len(betas) >= 2 for betas in curves.values())
