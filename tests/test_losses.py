"""Every loss against hand computation, CoPG's gradient against paper B's Eq. 19 and Property 3,
and Theorem 1 (the optimum of CoPG on off-policy pairs) on a tabular softmax policy."""

import math

import pytest
import torch

from directalign.losses import (
    LOSSES,
    bradley_terry_loss,
    copg_loss,
    dpo_loss,
    ipo_loss,
    sequence_logratio,
    simpo_loss,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


POLICY = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -0.7, 0.0, 0.0]])
REF = torch.tensor([[-1.5, -1.0, -1.0, -9.0], [-0.1, -0.2, -3.0, -9.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])


@pytest.mark.parametrize(
    ("length_power", "expected"),
    [
        # row 0: (0.5 - 1.0 + 0.5) = 0.0 over 3 tokens; row 1: (-0.2 - 0.5) = -0.7 over 2 tokens
        (0.0, [0.0, -0.7]),
        (0.5, [0.0, -0.7 / math.sqrt(2)]),
        (1.0, [0.0, -0.35]),
    ],
)
def test_sequence_logratio_by_hand(length_power, expected):
    got = sequence_logratio(POLICY, REF, MASK, length_power)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_sequence_logratio_ignores_masked_tokens():
    changed = POLICY.clone()
    changed[:, 3] = 100.0
    changed[1, 2] = -100.0
    assert torch.equal(sequence_logratio(changed, REF, MASK), sequence_logratio(POLICY, REF, MASK))


def test_sequence_logratio_length_power_three_tokens():
    policy = torch.tensor([[0.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0]])
    mask = torch.ones(1, 3)
    assert sequence_logratio(policy, ref, mask, 0.5).item() == pytest.approx(3.0 / math.sqrt(3.0))


def test_dpo_by_hand():
    got = dpo_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), beta=0.5)
    expected = [-math.log(sigmoid(0.5)), -math.log(sigmoid(-0.5))]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_ipo_by_hand():
    got = ipo_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.0]), beta=0.25)
    # target margin 1 / (2 * 0.25) = 2
    assert torch.allclose(got, torch.tensor([(1.5 - 2.0) ** 2, (-1.0 - 2.0) ** 2]))


def test_copg_by_hand():
    got = copg_loss(
        torch.tensor([0.4]), torch.tensor([-0.2]), torch.tensor([1.0]), torch.tensor([0.5]), beta=0.1
    )
    regularised_gap = (1.0 - 0.1 * 0.4) - (0.5 - 0.1 * -0.2)
    assert got.item() == pytest.approx(regularised_gap**2 / 0.2)


def test_simpo_value_and_gradient_by_hand():
    """-log sigmoid(beta (g_w - g_l) - gamma) with z = 2 * (-1 + 2) - 1 = 1; its gradient is
    -beta sigmoid(-z) on g_w and +beta sigmoid(-z) on g_l."""
    chosen, rejected = torch.tensor(-1.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    loss = simpo_loss(chosen, rejected, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log(1.0 + math.exp(-1.0)))
    loss.backward()
    assert chosen.grad.item() == pytest.approx(-2.0 * sigmoid(-1.0))
    assert rejected.grad.item() == pytest.approx(2.0 * sigmoid(-1.0))


def test_simpo_compares_token_averaged_log_likelihoods_without_the_reference():
    """Through the registry, SimPO's per-sequence term is the policy's mean completion log-prob
    (row 0: (-1 - 2 - 0.5) / 3, row 1: (-0.3 - 0.7) / 2), whatever the reference says."""
    simpo = LOSSES["simpo"]
    terms = simpo.sequence_terms(POLICY, REF, MASK, 1.0)
    assert torch.allclose(terms, torch.tensor([-3.5 / 3, -0.5]), atol=1e-6)
    assert torch.equal(simpo.sequence_terms(POLICY, REF + 5.0, MASK, 1.0), terms)
    no_reward = torch.zeros(1)
    method = {"beta": 2.0, "gamma": 1.0}
    got = simpo(method, terms[:1], terms[1:], no_reward, no_reward)
    assert got.item() == pytest.approx(-math.log(sigmoid(2.0 * (-3.5 / 3 + 0.5) - 1.0)))


def test_registry_dispatches_rewards_only_to_losses_that_read_them():
    """A ranked loss ignores the rewards; CoPG's value moves with them."""
    logratio_a, logratio_b = torch.tensor([0.4]), torch.tensor([-0.2])
    low, high = torch.tensor([0.0]), torch.tensor([3.0])
    method = {"beta": 0.5}
    assert LOSSES["dpo"](method, logratio_a, logratio_b, low, low) == LOSSES["dpo"](
        method, logratio_a, logratio_b, high, low
    )
    assert LOSSES["copg"](method, logratio_a, logratio_b, high, low) == pytest.approx(
        copg_loss(logratio_a, logratio_b, high, low, 0.5)
    )
    assert LOSSES["copg"](method, logratio_a, logratio_b, high, low) != LOSSES["copg"](
        method, logratio_a, logratio_b, low, low
    )


def test_bradley_terry_by_hand():
    got = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert torch.allclose(got, torch.tensor([-math.log(sigmoid(1.0)), math.log(2.0)]), atol=1e-6)


def test_copg_gradient_is_paper_eq_19():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, requires_grad=True)
    ref = torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    reward_a, reward_b, beta = torch.tensor([0.7]), torch.tensor([-0.4]), 0.3

    def h():
        return sequence_logratio(torch.log_softmax(logits, -1), ref, mask, 0.0)

    h_a, h_b = h()
    copg_loss(h_a[None], h_b[None], reward_a, reward_b, beta).sum().backward()
    autograd = logits.grad.clone()

    logits.grad = None
    h_a, h_b = h()
    coefficient = ((reward_a - beta * h_a) - (reward_b - beta * h_b)).detach()
    (-(coefficient * (h_a - h_b))).sum().backward()
    assert torch.allclose(autograd, logits.grad, atol=1e-6)


def test_copg_with_quarter_rewards_is_ipo_times_half_beta():
    """Property 3: R(y_w) = 1/4, R(y_l) = -1/4 gives IPO's gradient scaled by beta / 2."""
    beta = 0.2
    h = torch.tensor([0.3, -0.9], requires_grad=True)
    copg_loss(h[0], h[1], torch.tensor(0.25), torch.tensor(-0.25), beta).backward()
    copg_grad = h.grad.clone()
    h.grad = None
    ipo_loss(h[0], h[1], beta).backward()
    assert torch.allclose(copg_grad, beta / 2 * h.grad, atol=1e-6)


def test_copg_reaches_regularised_optimum_off_policy():
    """Theorem 1: off-policy pairs from two other distributions; the optimum is pi_ref * exp(R / beta)."""
    torch.manual_seed(0)
    rewards = torch.tensor([1.0, 0.2, -0.5, 0.0])
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4])
    beta = 0.5
    first = torch.multinomial(torch.tensor([0.4, 0.1, 0.1, 0.4]), 4000, replacement=True)
    second = torch.multinomial(torch.tensor([0.1, 0.4, 0.4, 0.1]), 4000, replacement=True)
    logits = torch.zeros(4, requires_grad=True)
    optimiser = torch.optim.Adam([logits], lr=0.05)
    for _ in range(600):
        logratio = torch.log_softmax(logits, -1) - ref.log()
        loss = copg_loss(logratio[first], logratio[second], rewards[first], rewards[second], beta).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    optimum = torch.softmax(ref.log() + rewards / beta, -1)
    assert torch.allclose(torch.softmax(logits, -1).detach(), optimum, atol=2e-3)
