"""Paper B's toy bandit: closed forms, the paper's claims on short fast runs, and input validation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from directalign.bandit import (
    BanditConfig,
    log_optimal_policy,
    objective,
    optimal_value,
    policy_gradient_loss,
    regret,
    run,
)

REPO = Path(__file__).resolve().parents[1]
# lr 1e-2 reaches in 30 epochs what the paper's lr 1e-3 reaches in about 300: the tests' "long run".
FAST = ["bandit.lr=1e-2", "bandit.epochs=30", "bandit.seed=0"]
PAPER_METHODS = "bandit.methods=[copg,pg,pg_value,ipo]"


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
    log_ref = torch.tensor(config.reference, dtype=torch.float64).log()
    log_star = log_optimal_policy(rewards, log_ref, config.beta)
    # PAPERS.md: pi* = (0.7054, 0.2595, 0.0351), J(pi*) = 2.1252.
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
    ],
)
def test_bad_input_raises_a_one_line_error_naming_the_key(override: str, key: str):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as error:
        bandit_config(override)
    assert "\n" not in str(error.value)


def test_pipeline_writes_summary_table_and_figure(tmp_path: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [
            sys.executable,
            str(REPO / "pipelines" / "bandit.py"),
            f"hydra.run.dir={tmp_path / 'hydra'}",
            "bandit.epochs=1",
            "bandit.seeds=[0,1]",
            f"out_dir={tmp_path / 'out'}",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary["methods"]) == {"copg", "pg", "pg_value", "ipo", "dpo"}
    copg = summary["methods"]["copg"]
    assert len(copg["policy"]) == 3 and len(copg["per_seed"]) == 2 and copg["regret_std"] >= 0
    assert copg["regret_curve"][0][0] == 0 and copg["regret_curve"][-1][0] == 20
    assert "| CoPG |" in (tmp_path / "out" / "summary.md").read_text()
    assert (tmp_path / "out" / "regret.png").read_bytes()[:4] == b"\x89PNG"
