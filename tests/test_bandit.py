"""Paper B's toy bandit: closed forms, the paper's claims on short fast runs, completions with lengths and
each method's fixed point there, and input validation."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from directalign.bandit import (
    ArmTensors,
    BanditConfig,
    PairData,
    fixed_point,
    log_optimal_policy,
    objective,
    optimal_value,
    pair_loss,
    policy_gradient_loss,
    regret,
    run,
)
from directalign.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# lr 1e-2 reaches in 30 epochs what the paper's lr 1e-3 reaches in about 300: the tests' "long run".
FAST = ["bandit.lr=1e-2", "bandit.epochs=30", "bandit.seed=0"]
PAPER_METHODS = "bandit.methods=[copg,pg,pg_value,ipo]"
# Four completions of unequal lengths. Every CoPG pair is fitted exactly, so 1,000 pairs reach the fixed
# point; lr 0.05 for 600 steps takes the slowest case (a = 1) to it within 1e-5 in total variation.
LENGTH_BANDIT = [
    "bandit.rewards=[1.0,0.5,-0.5,0.2]",
    "bandit.lengths=[1,3,5,2]",
    "bandit.mu1=[0.25,0.25,0.25,0.25]",
    "bandit.mu2=[0.1,0.2,0.3,0.4]",
    "bandit.ref=[0.4,0.3,0.2,0.1]",
    "bandit.n_pairs=1000",
    "bandit.batch_size=250",
    "bandit.lr=0.05",
    "bandit.epochs=150",
    "bandit.seed=0",
]
# Seed-mean final policies of the code before completions had lengths (commit 9859b65) on BEFORE_LENGTHS.
BEFORE_LENGTHS = ["bandit.n_pairs=2000", "bandit.epochs=5", "bandit.lr=1e-2", "bandit.seeds=[0,1]"]
BEFORE_LENGTHS_POLICIES = {
    "copg": [0.3742542507528135, 0.3737810001299497, 0.2519647491172369],
    "pg": [0.28799013788821204, 0.2887366543750989, 0.4232732077366891],
    "pg_value": [0.37464663567416645, 0.3745024330173311, 0.25085093130850256],
    "ipo": [0.37400153359502264, 0.3685177018999669, 0.2574807645050105],
    "dpo": [0.3744483839695153, 0.37292314108199187, 0.25262847494849283],
}


def bandit_config(*overrides: str) -> BanditConfig:
    """The composed conf/bandit.yaml with ``overrides``, as the pipeline builds it."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="bandit", overrides=list(overrides))
    return BanditConfig.from_mapping(OmegaConf.to_container(cfg.bandit, resolve=True))


def total_variation(p: list[float], q: list[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def test_defaults_are_the_papers_setting_and_closed_forms_agree():
    config = bandit_config()
    assert config.rewards == (2.5, 2.0, 1.0) and config.beta == 0.5 and config.n_pairs == 10_000
    assert (config.lr, config.batch_size, config.epochs) == (1e-3, 512, 100)
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    log_ref = torch.tensor(config.pi_ref, dtype=torch.float64).log()
    log_star = log_optimal_policy(rewards, log_ref, config.beta)
    # The CoPG paper's section 5: pi* = (e^5, e^4, e^2) / (e^5 + e^4 + e^2) = (0.7054, 0.2595, 0.0351) and
    # J(pi*) = beta log mean(exp(R / beta)) = 2.1252.
    np.testing.assert_allclose(log_star.exp().numpy(), [0.7054, 0.2595, 0.0351], atol=1e-4)
    assert optimal_value(rewards, log_ref, config.beta).item() == pytest.approx(2.1252, abs=1e-4)
    assert objective(log_star, rewards, log_ref, config.beta).item() == pytest.approx(
        optimal_value(rewards, log_ref, config.beta).item(), abs=1e-12
    )
    others = torch.log_softmax(torch.randn(100, 3, dtype=torch.float64), dim=-1)
    gaps = optimal_value(rewards, log_ref, config.beta) - objective(others, rewards, log_ref, config.beta)
    assert (gaps > 0).all()
    torch.testing.assert_close(regret(others, rewards, log_ref, config.beta), gaps)
    # Near pi* the KL form still resolves the regret, ~ beta/2 * chi^2, where J(pi*) - J(pi) is round-off.
    near = log_star + torch.tensor([1e-9, -1e-9, 0.0], dtype=torch.float64)
    assert 0 < regret(near, rewards, log_ref, config.beta).item() < 1e-18


def test_policy_gradient_loss_has_the_papers_gradient_with_detached_weights():
    logits = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    log_ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    rewards, beta, baseline = torch.tensor([2.5, 2.0, 1.0], dtype=torch.float64), 0.5, 0.7
    arm_a, arm_b = 0, 2
    h = torch.log_softmax(logits, -1) - log_ref
    loss = policy_gradient_loss(
        h[:, arm_a], h[:, arm_b], rewards[arm_a], rewards[arm_b], beta, torch.tensor(baseline)
    )
    loss.sum().backward()
    pi = torch.softmax(logits.detach(), -1)[0]
    h = h.detach()[0]
    # -[(R_beta(a) - b) (e_a - pi) + (R_beta(b) - b) (e_b - pi)], grad log pi(y) = e_y - pi.
    expected = -(
        (rewards[arm_a] - beta * h[arm_a] - baseline) * (torch.eye(3, dtype=torch.float64)[arm_a] - pi)
        + (rewards[arm_b] - beta * h[arm_b] - baseline) * (torch.eye(3, dtype=torch.float64)[arm_b] - pi)
    )
    torch.testing.assert_close(logits.grad[0], expected)


def test_copg_converges_to_the_regularised_optimum():
    summary = run(bandit_config(*FAST, "bandit.methods=[copg]"))
    assert summary["methods"]["copg"]["J"] == pytest.approx(summary["J_star"], abs=1e-4)
    assert total_variation(summary["methods"]["copg"]["policy"], summary["pi_star"]) < 0.01
    assert summary["methods"]["copg"]["regret"] < 1e-4


def test_regret_ordering_of_the_paper():
    methods = run(bandit_config(*FAST, PAPER_METHODS))["methods"]
    final = {name: entry["regret"] for name, entry in methods.items()}
    assert final["pg"] > final["ipo"] > final["pg_value"] > final["copg"]
    # PG with baseline 0 moves away from pi*: its regret grows from the reference policy's.
    curve = methods["pg"]["regret_curve"]
    assert curve[-1][1] > curve[0][1]
    # The value baseline only leaves a small bias, IPO a large one.
    assert final["pg_value"] < 0.05 < final["ipo"]


def test_five_arms_and_a_non_uniform_reference_converge_to_their_optimum():
    rewards, ref = [1.0, -0.5, 2.0, 0.3, 1.5], [0.4, 0.3, 0.1, 0.1, 0.1]
    # Rewards spread over 2.5 / beta = 5 nats of log-ratio: twice the epochs of the 3-arm default.
    summary = run(
        bandit_config(
            *FAST,
            "bandit.epochs=60",
            "bandit.methods=[copg]",
            f"bandit.rewards={rewards}",
            f"bandit.ref={ref}",
            "bandit.mu1=[0.2,0.2,0.2,0.2,0.2]",
            "bandit.mu2=[0.1,0.4,0.05,0.3,0.15]",
        )
    )
    expected = torch.softmax(torch.tensor(ref).log() + torch.tensor(rewards) / 0.5, dim=-1).tolist()
    np.testing.assert_allclose(summary["pi_star"], expected, atol=1e-6)
    assert total_variation(summary["methods"]["copg"]["policy"], expected) < 0.01


def test_seeds_trained_together_are_independent_runs():
    short = ["bandit.epochs=2", "bandit.methods=[pg_value,ipo]"]
    together = run(bandit_config(*short, "bandit.seeds=[0,1]"))["methods"]
    alone = run(bandit_config(*short, "bandit.seed=1"))["methods"]
    for name in ("pg_value", "ipo"):
        np.testing.assert_allclose(together[name]["per_seed"][1]["policy"], alone[name]["policy"], atol=1e-12)
        assert together[name]["per_seed"][0]["policy"] != alone[name]["policy"]


@pytest.mark.parametrize("lengths", [[], ["bandit.lengths=[1,1,1]", "bandit.length_power=0.7"]])
def test_lengths_all_one_reproduce_the_bandit_before_lengths_exactly(lengths: list[str]):
    methods = run(bandit_config(*BEFORE_LENGTHS, *lengths))["methods"]
    assert {name: entry["policy"] for name, entry in methods.items()} == BEFORE_LENGTHS_POLICIES


@pytest.mark.parametrize("length_power", [0.0, 0.5, 1.0])
def test_copg_converges_to_its_fixed_point_at_unequal_lengths(length_power: float):
    summary = run(
        bandit_config(*LENGTH_BANDIT, f"bandit.length_power={length_power}", "bandit.methods=[copg]")
    )
    copg = summary["methods"]["copg"]
    # Far inside 0.01, which would not tell |y|^a from |y|^(0.9 a) apart.
    assert copg["fixed_point_tv"] == total_variation(copg["policy"], copg["fixed_point"]) < 1e-4
    if length_power == 0:
        np.testing.assert_allclose(copg["fixed_point"], summary["pi_star"], rtol=1e-12)
    else:  # the lengths move the fixed point away from pi* by more than the tolerance
        assert total_variation(copg["fixed_point"], summary["pi_star"]) > 0.03


def test_fixed_points_at_equal_lengths_are_pi_star_at_beta_over_length_power():
    # h(y) = L^a (R(y) / beta + C) on every arm is softmax(log pi_ref + L^a R / beta), for CoPG and DPO.
    config = bandit_config("bandit.lengths=[4,4,4]", "bandit.length_power=0.5")
    weights = np.asarray(config.pi_ref) * np.exp(4**0.5 * np.asarray(config.rewards) / 0.5)
    for method in ("copg", "dpo"):
        np.testing.assert_allclose(fixed_point(config, method).policy, weights / weights.sum(), rtol=1e-12)


def population_gradient(config: BanditConfig, method: str, policy: np.ndarray) -> torch.Tensor:
    """Gradient in the logits, at ``policy``, of ``method``'s loss summed over every ordered pair of arms and
    both Bradley-Terry labels, each weighted by its probability: the expected update with infinite data."""
    n_arms = len(config.rewards)
    first, second = (
        index.reshape(1, -1) for index in torch.meshgrid(*[torch.arange(n_arms)] * 2, indexing="ij")
    )
    rewards = torch.tensor(config.rewards, dtype=torch.float64)
    mu1, mu2 = (torch.tensor(mu, dtype=torch.float64) for mu in (config.mu1, config.mu2))
    pair_probability = mu1[first] * mu2[second]
    first_wins = torch.sigmoid(rewards[first] - rewards[second])
    both_labels = PairData(
        first=torch.cat([first, first], 1),
        second=torch.cat([second, second], 1),
        chosen=torch.cat([first, second], 1),
        rejected=torch.cat([second, first], 1),
    )
    weights = torch.cat([pair_probability * first_wins, pair_probability * (1 - first_wins)], 1)
    logits = torch.tensor(policy).log().reshape(1, -1).requires_grad_()
    losses = pair_loss(method, logits, ArmTensors.from_config(config), config.beta, both_labels)
    (weights * losses).sum().backward()
    return logits.grad[0]


@pytest.mark.parametrize("length_power", [0.5, 1.0])
@pytest.mark.parametrize("method", ["copg", "dpo", "ipo", "pg"])
def test_expected_update_vanishes_at_each_derived_fixed_point(method: str, length_power: float):
    config = bandit_config(*LENGTH_BANDIT, f"bandit.length_power={length_power}")
    point = fixed_point(config, method)
    assert abs(point.policy.sum() - 1) < 1e-12
    assert population_gradient(config, method, point.policy).abs().max() < 1e-9
    # The same check fails away from it: at pi_ref, and at the fixed point of the summed (a = 0) loss.
    assert population_gradient(config, method, np.asarray(config.pi_ref)).abs().max() > 1e-3
    summed = fixed_point(bandit_config(*LENGTH_BANDIT), method).policy
    assert population_gradient(config, method, summed).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("overrides", "method", "reason"),
    [
        ([], "pg_value", "not derived: the baseline E_pi\\[R\\] couples"),
        (["bandit.rewards=[-1.0,-2.0,-3.0]"], "pg", "not derived: sum pi_ref exp"),
        (["bandit.mu1=[0.5,0.5,0.0]", "bandit.mu2=[0.5,0.5,0.0]"], "pg", "none finite: arms \\[2\\]"),
        (
            ["bandit.mu1=[0.5,0.5,0.0]", "bandit.mu2=[0.5,0.5,0.0]"],
            "copg",
            "not unique: .* 2 separate groups",
        ),
        (["bandit.mu1=[1.0,0.0,0.0]", "bandit.mu2=[0.0,1.0,0.0]"], "ipo", "not unique: .* 2 separate groups"),
    ],
)
def test_a_missing_fixed_point_is_null_with_its_reason(overrides: list[str], method: str, reason: str):
    short = ["bandit.n_pairs=100", "bandit.epochs=1", "bandit.seed=0", f"bandit.methods=[{method}]"]
    summary = run(bandit_config(*overrides, *short))
    entry = summary["methods"][method]
    assert entry["fixed_point"] is None and entry["fixed_point_tv"] is None
    assert re.match(reason, entry["fixed_point_note"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("bandit.mu1=[0.1,0.2,0.6]", "bandit.mu1"),
        ("bandit.mu2=[-0.05,0.15,0.9]", "bandit.mu2"),
        ("bandit.mu1=[0.5,0.5]", "bandit.mu1"),
        ("bandit.ref=[0.0,0.5,0.5]", "bandit.ref"),
        ("bandit.ref=[0.3,0.3,0.3]", "bandit.ref"),
        ("bandit.beta=0", "bandit.beta"),
        ("bandit.beta=-0.5", "bandit.beta"),
        ("bandit.rewards=[]", "bandit.rewards"),
        ("bandit.methods=[copg,ppo]", "bandit.methods"),
        ("bandit.batch_size=0", "bandit.batch_size"),
        ("bandit.seeds=[]", "bandit.seeds"),
        ("bandit.lengths=[1,2]", "bandit.lengths"),
        ("bandit.lengths=[1,0,2]", "bandit.lengths"),
        ("bandit.lengths=[1,-3,2]", "bandit.lengths"),
        ("bandit.lengths=[1,2.5,2]", "bandit.lengths"),
        ("bandit.length_power=1.5", "bandit.length_power"),
        ("bandit.length_power=-0.1", "bandit.length_power"),
    ],
)
def test_bad_input_raises_a_one_line_error_naming_the_key(override: str, key: str):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        bandit_config(override)
    assert "\n" not in str(error.value)


def pipeline(*arguments: str) -> subprocess.CompletedProcess:
    """``pipelines/<arguments[0]>`` run as a user would, on this checkout's sources."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    script, *overrides = arguments
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / script), *overrides],
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("script", "override", "message"),
    [
        (
            "bandit.py",
            "bandit.lengths=[1,0,2]",
            "bandit.lengths must be token counts, integers >= 1, got [1, 0, 2]",
        ),
        (
            "bandit.py",
            "bandit.mode=online bandit.reference=previous",
            "bandit.reference=previous needs bandit.mode=iterative: online would move the reference every "
            "step, which leaves no KL term",
        ),
        (
            "length_bandit.py",
            "study.length_powers=[0,2]",
            "study.length_powers must be in [0, 1], got [0, 2]",
        ),
    ],
    ids=["bandit", "bandit_mode", "length_bandit"],
)
def test_pipelines_refuse_bad_input_in_one_line(tmp_path: Path, script: str, override: str, message: str):
    result = pipeline(script, f"hydra.run.dir={tmp_path}", *override.split(), f"out_dir={tmp_path / 'out'}")
    assert result.returncode == 1 and not (tmp_path / "out").exists()  # refused before any compute
    assert result.stderr.splitlines() == [f"directalign: {message}"]


def test_length_study_writes_exact_optima_table_and_figure(tmp_path: Path):
    small = ["study.n_betas=3", "study.table_betas=[0.5]", "study.score_fractions=[0.5]"]
    result = pipeline(
        "length_bandit.py", f"hydra.run.dir={tmp_path / 'hydra'}", *small, f"out_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    lengths, quality = np.asarray(summary["config"]["lengths"]), np.asarray(summary["config"]["quality"])
    ref = np.full(len(lengths), 1 / len(lengths))  # ref: null
    neutral = summary["curves"]["length-neutral"]["copg"]
    assert set(neutral) == {"0.0", "0.5", "1.0"} and all(len(rows) == 3 for rows in neutral.values())
    for row in neutral["0.0"]:
        # Summed log-ratios and a reward blind to length: every quality keeps pi_ref's split over lengths.
        assert row["mean_length"] == pytest.approx(ref @ lengths, abs=1e-12)
        assert row["J"] == pytest.approx(row["beta"] * np.log(ref @ np.exp(quality / row["beta"])), abs=1e-12)
    # Averaging moves the optimum: a longer mean length than summing, at the same beta.
    assert all(row["mean_length"] > ref @ lengths + 1e-3 for row in neutral["1.0"])
    target = ref @ quality + 0.5 * (quality.max() - ref @ quality)
    assert summary["equal_score"]["length-neutral"]["ipo"]["0.5"]["1.0"]["expected_reward"] == pytest.approx(
        target
    )
    table = (tmp_path / "summary.md").read_text()
    assert "| CoPG / DPO | 0.5 | 1.0 |" in table and "| IPO |" in table
    assert (tmp_path / "length_bandit.png").read_bytes()[:4] == b"\x89PNG"


def test_pipeline_writes_summary_table_and_figure(tmp_path: Path):
    result = pipeline(
        "bandit.py",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        "bandit.epochs=1",
        "bandit.seeds=[0,1]",
        f"out_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["methods"]) == {"copg", "pg", "pg_value", "ipo", "dpo"}
    copg = summary["methods"]["copg"]
    assert len(copg["policy"]) == 3 and len(copg["per_seed"]) == 2 and copg["regret_std"] >= 0
    np.testing.assert_allclose(copg["fixed_point"], summary["pi_star"], rtol=1e-12)
    assert copg["fixed_point_tv"] == total_variation(copg["policy"], copg["fixed_point"]) > 0
    assert copg["regret_curve"][0][0] == 0 and copg["regret_curve"][-1][0] == 20
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "| CoPG |" in table and "| PG, value baseline |" in table and "none derived |" in table
    assert (tmp_path / "out" / "regret.png").read_bytes()[:4] == b"\x89PNG"
