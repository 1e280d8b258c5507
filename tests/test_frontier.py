"""Claims on the reward-KL frontier by hand: one seed's curve read between its bracketing betas, seeds
averaged with their spread in the standard error, points outside a curve left unread, picks, and the
per-prompt table from which every committed claims.json is recomputed byte for byte."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from directalign.claims import read_claims
from directalign.errors import ConfigError
from directalign.frontier import (
    ClaimSpec,
    Point,
    contrast,
    estimates,
    pick_betas,
    read_curve,
    read_per_prompt,
    read_seed,
    write_per_prompt,
)
from directalign.frontier_report import SPEC_FILE, recompute_claims, write_frontier_report
from tests.conftest import ROOT, compose_config
from tests.test_length_study import job, make_jobs


def point(curve: str, beta: float, seed: int, gold: list[float], kl: list[float]) -> Point:
    prompts = [f"p{i}" for i in range(len(gold))]
    return Point(
        curve,
        beta,
        seed,
        {
            "gold_reward": dict(zip(prompts, gold, strict=True)),
            "kl_to_ref": dict(zip(prompts, kl, strict=True)),
        },
    )


def test_a_seeds_curve_is_read_between_its_bracketing_betas_by_hand():
    # KL means 2 (beta 0.3) and 6 (beta 0.1); gold means 0.3 and 0.5: at KL 3, t = 1/4, slope 0.05 a nat.
    low = point("dpo", 0.3, 0, gold=[0.2, 0.4], kl=[1.0, 3.0])
    high = point("dpo", 0.1, 0, gold=[0.5, 0.5], kl=[6.0, 6.0])
    far = point("dpo", 0.01, 0, gold=[0.1, 0.1], kl=[20.0, 20.0])

    value, terms = read_seed([far, high, low], "gold_reward", "kl_to_ref", 3.0)

    assert value == pytest.approx(0.75 * 0.3 + 0.25 * 0.5)
    # prompt p0: 3/4 (0.2 - 0.05 x 1) + 1/4 (0.5 - 0.05 x 6); p1: 3/4 (0.4 - 0.05 x 3) + 1/4 (0.5 - 0.3)
    assert terms["p0"] == pytest.approx(0.75 * 0.15 + 0.25 * 0.2)
    assert terms["p1"] == pytest.approx(0.75 * 0.25 + 0.25 * 0.2)


def test_seeds_are_averaged_and_their_spread_adds_to_the_standard_error():
    # Method a: seeds at levels 0.4 and 0.6 (per prompt 0.3/0.5 and 0.5/0.7); method b: one seed at 0.2.
    a = {0: [point("a", 0.1, 0, [0.3, 0.5], [5.0, 5.0])], 1: [point("a", 0.1, 1, [0.5, 0.7], [5.0, 5.0])]}
    b = {0: [point("b", 0.1, 0, [0.2, 0.2], [5.0, 5.0])]}

    first, second = (read_curve(side, "gold_reward", None, None) for side in (a, b))
    mean, se, n = contrast(first, second)

    # Per-prompt differences 0.4 - 0.2 = 0.2 and 0.6 - 0.2 = 0.4: variance 0.02, over 2 prompts 0.01.
    # Seeds of a: 0.4 and 0.6, variance 0.02, over 2 seeds 0.01. se = sqrt(0.02).
    assert (mean, n) == (pytest.approx(0.3), 2)
    assert se == pytest.approx(math.sqrt(0.01 + 0.01))
    assert first.seed_values == pytest.approx([0.4, 0.6])


def test_a_contrast_of_four_curves_is_the_difference_of_two_differences_by_hand():
    # Per prompt (p0, p1): a 0.5/0.7, b 0.4/0.4, c 0.3/0.5, d 0.3/0.3, one seed each but a with two
    # seeds at levels 0.5 and 0.7 (per prompt 0.4/0.6 and 0.6/0.8).
    a = {0: [point("a", 0.1, 0, [0.4, 0.6], [5.0, 5.0])], 1: [point("a", 0.1, 1, [0.6, 0.8], [5.0, 5.0])]}
    b, c, d = (
        {0: [point(n, 0.1, 0, gold, [5.0, 5.0])]}
        for n, gold in (("b", [0.4, 0.4]), ("c", [0.3, 0.5]), ("d", [0.3, 0.3]))
    )

    readings = [read_curve(side, "gold_reward", None, None) for side in (a, b, c, d)]
    mean, se, n = contrast(*readings)

    # (a - b) - (c - d) per prompt: (0.5 - 0.4) - (0.3 - 0.3) = 0.1 and (0.7 - 0.4) - (0.5 - 0.3) = 0.1:
    # no prompt spread; a's seeds 0.5 and 0.7: variance 0.02 over 2 seeds.
    assert (mean, n) == (pytest.approx(0.1), 2)
    assert se == pytest.approx(math.sqrt(0.01))
    with pytest.raises(ValueError, match="a contrast reads two or four curves, not 3"):
        contrast(*readings[:3])


def test_points_of_one_beta_are_told_apart_by_their_steps(tmp_path: Path):
    rows = [
        {"curve": "dpo iterative", "method": "dpo", "length_power": 0.0, "beta": 0.1, "seed": 0, "step": step}
        | {"prompt": "p0", "n_samples": 2, "proxy_reward": 1.0, "gold_reward": gold}
        | {"length_tokens": 10.0, "kl_to_ref": kl}
        for step, gold, kl in ((32, 0.3, 2.0), (64, 0.4, 4.0), (96, 0.5, 6.0))
    ]
    write_per_prompt(rows, tmp_path / "per_prompt.csv")

    points = read_per_prompt(tmp_path / "per_prompt.csv")

    assert sorted((p.step, p.level("gold_reward")) for p in points) == [(32, 0.3), (64, 0.4), (96, 0.5)]


def curve(name: str, seed: int, kls: tuple[float, float], golds: tuple[float, float]) -> list[Point]:
    return [
        point(name, beta, seed, [gold - 0.01, gold + 0.01], [kl - 0.5, kl + 0.5])
        for beta, kl, gold in zip((0.3, 0.03), kls, golds, strict=True)
    ]


def test_matched_points_outside_any_seeds_range_are_not_read():
    # copg seed 1 reaches only KL 7, so KL 8 is outside the common range [3, 7] and stays unread.
    points = curve("copg", 0, (3.0, 10.0), (0.40, 0.36)) + curve("copg", 1, (2.0, 7.0), (0.39, 0.41))
    points += curve("dpo", 0, (2.0, 12.0), (0.38, 0.35)) + curve("dpo", 1, (2.5, 11.0), (0.38, 0.36))
    spec = ClaimSpec("CoPG wins", "B", ("copg", "dpo"), "gold_reward", 1, "kl_to_ref", (5.0, 8.0))

    inside, outside = estimates(spec, points)

    assert (inside.protocol, inside.at, inside.seeds, inside.n) == ("matched_kl", 5.0, 2, 2)
    # copg: seed 0 at 2/7 of 0.40 -> 0.36, seed 1 at 3/5 of 0.39 -> 0.41; dpo: 3/10 of 0.38 -> 0.35 and
    # 5/17 of 0.38 -> 0.36.
    copg = ((0.40 - 2 / 7 * 0.04) + (0.39 + 3 / 5 * 0.02)) / 2
    dpo = ((0.38 - 3 / 10 * 0.03) + (0.38 - 5 / 17 * 0.02)) / 2
    assert inside.mean == pytest.approx(copg - dpo)
    assert (outside.at, outside.n, outside.mean) == (8.0, 0, 0.0)
    with pytest.raises(ConfigError, match=r"no picked beta for \['copg', 'dpo'\]"):
        estimates(ClaimSpec("x", "B", ("copg", "dpo"), "gold_reward", 1), points, {"copg": 0.03})
    with pytest.raises(ConfigError, match=r"no curve \['ipo'\]"):
        estimates(ClaimSpec("x", "B", ("copg", "ipo"), "gold_reward", 1, "kl_to_ref", (5.0,)), points)


def test_the_pick_is_the_beta_of_highest_proxy_over_seeds():
    points = [
        Point("dpo", beta, seed, {"proxy_reward": {"p0": proxy}})
        for beta, seed, proxy in ((0.1, 0, 1.0), (0.1, 1, 0.0), (0.03, 0, 0.6), (0.03, 1, 0.6))
    ]
    # beta 0.1 has the best single seed (1.0) but the lower mean (0.5 against 0.6).
    assert pick_betas(points) == {"dpo": 0.03}


def test_the_per_prompt_table_reads_back_exactly(tmp_path):
    row = {"curve": "dpo", "method": "dpo", "length_power": 0.0, "beta": 0.1, "seed": 1, "step": 128}
    row |= {"prompt": "a,b", "n_samples": 2, "proxy_reward": 0.1 + 0.2, "gold_reward": 1 / 3}
    row |= {"length_tokens": 19.5, "kl_to_ref": 7.123456789012345}
    sft = row | {"curve": "sft", "method": "sft", "beta": None, "seed": None}
    write_per_prompt([sft, row], tmp_path / "per_prompt.csv")

    (read,) = read_per_prompt(tmp_path / "per_prompt.csv")

    assert (read.curve, read.beta, read.seed) == ("dpo", 0.1, 1)
    assert read.means["proxy_reward"] == {"a,b": 0.1 + 0.2}
    assert read.means["kl_to_ref"] == {"a,b": 7.123456789012345}


@pytest.fixture
def frontier_sweep(tmp_path) -> Path:
    """A sweep of two curves of one loss (a = 0 and a = 1), two betas each (length_study's fake jobs)."""
    job(tmp_path / "s1" / "results", 0.3, 0.0, kl=2.0, length=16.0, gold=0.36, spread=(1.0, 0.0))
    job(tmp_path / "s2" / "results", 0.1, 0.0, kl=8.0, length=20.0, gold=0.40, spread=(2.0, 1.0))
    job(tmp_path / "a1" / "results", 6.0, 1.0, kl=1.0, length=12.0, gold=0.30, spread=(0.5, 0.5))
    job(tmp_path / "a2" / "results", 2.0, 1.0, kl=6.0, length=14.0, gold=0.38, spread=(1.0, 0.0))
    return tmp_path


def test_the_report_is_recomputed_byte_for_byte_from_its_files(frontier_sweep, tmp_path):
    specs = [
        ClaimSpec(
            "averaging changes length",
            "A",
            ("dpo a=1", "dpo a=0"),
            "length_tokens",
            0,
            "kl_to_ref",
            (3.0, 5.0),
        ),
        ClaimSpec("averaging lowers gold", "A", ("dpo a=1", "dpo a=0"), "gold_reward", -1),
    ]
    out = tmp_path / "report"
    claims = write_frontier_report(frontier_sweep, out, specs, None, {"gold_reward": 0.006}, [3, 5])

    assert [(c.protocol, c.at) for c in claims] == [
        ("matched_kl", 3.0),
        ("matched_kl", 5.0),
        ("at_pick", None),
    ]
    # Picks: the beta of highest proxy, every job's proxy 1.0: the first in beta order.
    assert json.loads((out / SPEC_FILE).read_text())["picks"] == {"dpo a=0": 0.1, "dpo a=1": 2.0}
    assert read_claims(out / "claims.json") == claims
    assert (out / "frontier.png").stat().st_size > 0 and "at pick" in (out / "power.md").read_text()
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("per_prompt.csv", SPEC_FILE):
        shutil.copy(out / name, copy / name)
    recompute_claims(copy)
    assert (copy / "claims.json").read_bytes() == (out / "claims.json").read_bytes()
    script = [sys.executable, str(ROOT / "pipelines" / "recompute_claims.py"), "--check"]
    assert subprocess.run([*script, str(out)], capture_output=True).returncode == 0
    (out / "claims.json").write_text((out / "claims.json").read_text().replace('"seeds": 1', '"seeds": 3'))
    failed = subprocess.run([*script, str(out)], capture_output=True, text=True)
    assert failed.returncode == 1 and "recomputed claims differ" in failed.stderr


COMMITTED = sorted(p.parent for p in (ROOT / "results").rglob(SPEC_FILE))


@pytest.mark.parametrize("folder", COMMITTED, ids=[str(p.relative_to(ROOT)) for p in COMMITTED])
def test_every_committed_claims_file_is_recomputed_from_its_per_prompt_data(folder, tmp_path):
    for name in ("per_prompt.csv", SPEC_FILE):
        shutil.copy(folder / name, tmp_path / name)
    recompute_claims(tmp_path)
    assert (tmp_path / "claims.json").read_bytes() == (folder / "claims.json").read_bytes()


def test_make_headlines_trains_every_curve_its_claims_read_with_two_seeds(tmp_path):
    """Each method of the frontier claims has at least two betas in `make headlines`, each trained with
    two seeds on the same upstream settings, and the matched KLs are set."""
    curves: dict[str, set[float]] = {}
    for overrides in make_jobs("FRONTIER_RUN", "headlines"):
        cfg = compose_config(overrides, tmp_path)
        curves.setdefault(cfg.method.name, set()).add(cfg.method.beta)
        assert len(cfg.method.seeds) >= 2 and not cfg.compare and cfg.stage.evaluate.max_prompts == 192
    report = OmegaConf.load(ROOT / "conf" / "frontier_report.yaml")
    assert {name for claim in report.claims for name in claim.contrast} <= set(curves)
    assert all(len(betas) >= 2 for betas in curves.values()) and len(report.matched_kl) >= 2
