"""Direct-alignment losses as pure tensor functions.

Every function takes per-sequence tensors and returns the unreduced per-pair loss, so the caller
chooses the reduction. Notation: for a prompt x and a completion y of ``|y|`` tokens,
``h(y) = sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]`` is the policy/reference
log-ratio summed over completion tokens (prompt and padding never count), and
``h_a(y) = h(y) / |y|**a`` its length-normalised form: a = 0 is the summed log-ratio of DPO, IPO and
CoPG; a = 1 averages both log-likelihoods over the completion ("Averaging log-likelihoods in direct
alignment", 2024). For a pair (w, l) or (a, b) of completions of one prompt:

- DPO: ``-log sigmoid(beta (h_w - h_l))``
- IPO: ``(h_w - h_l - 1 / (2 beta))**2`` (the summed IPO of the paper; TRL's "ipo" is a = 1)
- CoPG ("Contrastive Policy Gradient", 2024), with rewards R and ``R_beta = R - beta h``: the paper
  maximises ``(R_{beta/2}(a) - R_{beta/2}(b)) (h_a - h_b)``, whose gradient is
  ``(R_beta(a) - R_beta(b)) (grad h_a - grad h_b)`` (its Eq. 19). With ``D = R(a) - R(b)`` and
  ``d = h_a - h_b`` the objective is ``D d - beta d**2 / 2``, so minimising
  ``(D - beta d)**2 / (2 beta)`` has exactly that gradient: a regression of the log-ratio gap onto
  the reward gap over beta, whose optimum is ``pi_ref exp(R / beta)``. With ``R = +-1/4`` it is IPO
  scaled by beta / 2.
- SimPO ("SimPO: Simple Preference Optimization with a Reference-Free Reward", 2024), reference-free:
  ``-log sigmoid(beta (g_w - g_l) - gamma)`` with ``g = log pi(y) / |y|`` the token-averaged
  log-likelihood and gamma a target margin (TRL's CPOTrainer with ``loss_type="simpo"``, ``cpo_alpha=0``).

``LOSSES`` is the one registry of these losses: a method config's ``loss`` names an entry, and the
align module, the align stage, the bandit and validation read what the entry declares. Adding a loss is
one entry here plus one ``conf/method/<name>.yaml``.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F


def sequence_logratio(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    length_power: float = 0.0,
) -> torch.Tensor:
    """Length-normalised log-ratio ``h_a = sum_t mask * (log pi - log pi_ref) / |y|**a``.

    ``policy_logps``, ``ref_logps`` and ``mask`` are ``[B, T]`` per-token tensors; the mask
    is 1 on completion tokens only. ``a = 0`` gives the summed log-ratio of DPO/IPO/CoPG,
    ``a = 1`` the token average of paper A (both policy and reference averaged).
    """
    mask = mask.to(policy_logps.dtype)
    summed = ((policy_logps - ref_logps) * mask).sum(-1)
    return summed / length_normaliser(mask, length_power)


def length_normaliser(mask: torch.Tensor, length_power: float) -> torch.Tensor:
    """``|y| ** length_power`` per sequence, from a ``[B, T]`` completion mask."""
    return mask.float().sum(-1).clamp(min=1.0) ** length_power


def dpo_loss(logratio_chosen: torch.Tensor, logratio_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO: ``-log sigmoid(beta * (h_w - h_l))``."""
    return -F.logsigmoid(beta * (logratio_chosen - logratio_rejected))


def ipo_loss(logratio_chosen: torch.Tensor, logratio_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO: ``(h_w - h_l - 1 / (2 beta))**2``; averaged IPO is this with ``h_1``."""
    return (logratio_chosen - logratio_rejected - 1.0 / (2.0 * beta)) ** 2


def copg_loss(
    logratio_a: torch.Tensor,
    logratio_b: torch.Tensor,
    reward_a: torch.Tensor,
    reward_b: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """CoPG: ``(R_beta(a) - R_beta(b))**2 / (2 beta)`` with ``R_beta = R - beta * h``.

    Its gradient is exactly paper B's Eq. 19, ``-(R_beta(a) - R_beta(b)) (grad h_a - grad h_b)``:
    a regression of the log-ratio gap onto the reward gap divided by beta. No ranking needed.
    """
    regularised_gap = (reward_a - beta * logratio_a) - (reward_b - beta * logratio_b)
    return regularised_gap**2 / (2.0 * beta)


def bradley_terry_loss(score_chosen: torch.Tensor, score_rejected: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry reward-model loss ``-log sigmoid(r_w - r_l)``."""
    return -F.logsigmoid(score_chosen - score_rejected)


def simpo_loss(
    loglik_chosen: torch.Tensor, loglik_rejected: torch.Tensor, beta: float, gamma: float
) -> torch.Tensor:
    """SimPO: ``-log sigmoid(beta * (g_w - g_l) - gamma)`` on the policy's own (length-averaged)
    log-likelihoods ``g``; the target margin gamma keeps pushing pairs the policy already orders."""
    return -F.logsigmoid(beta * (loglik_chosen - loglik_rejected) - gamma)


class Optimum(Enum):
    """The population optimum a loss converges to, where one is derived (the bandit checks it)."""

    # pi_ref exp(|y|^a (R / beta + C)): CoPG on rewards, DPO on Bradley-Terry preferences of R.
    TILTED = "tilted"
    # pi_ref exp(|y|^a (g0 + C)), g0 a least-squares fit of the preference probabilities: IPO.
    PREFERENCE_REGRESSION = "preference_regression"


@dataclass(frozen=True)
class PairLoss:
    """One registry entry: the per-pair loss function and what it reads of a pair."""

    function: Callable[..., torch.Tensor]
    # True: it reads both completions' rewards, so pairs need no ranking and tied pairs stay (CoPG).
    # False: it reads only which completion was preferred (a ranking); tied pairs are dropped.
    needs_rewards: bool
    # False: the policy's log-likelihood takes the place of the log-ratio (no reference in the loss).
    uses_reference: bool = True
    # Method config keys passed to ``function`` by name, besides beta (SimPO's gamma).
    settings: tuple[str, ...] = ()
    optimum: Optimum | None = None

    def sequence_terms(
        self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, length_power: float
    ) -> torch.Tensor:
        """What the loss compares per sequence: ``h_a``, or for a reference-free loss the policy's
        log-likelihood over ``|y|**a`` (the reference's log-probs read as 0)."""
        reference = ref_logps if self.uses_reference else torch.zeros_like(policy_logps)
        return sequence_logratio(policy_logps, reference, mask, length_power)

    def __call__(
        self,
        method: Mapping[str, Any],
        logratio_a: torch.Tensor,
        logratio_b: torch.Tensor,
        reward_a: torch.Tensor,
        reward_b: torch.Tensor,
    ) -> torch.Tensor:
        """Per-pair loss with ``method``'s beta and settings; a ranked loss takes a as the chosen one."""
        rewards = (reward_a, reward_b) if self.needs_rewards else ()
        settings = {name: method[name] for name in self.settings}
        return self.function(logratio_a, logratio_b, *rewards, beta=method["beta"], **settings)


LOSSES: dict[str, PairLoss] = {
    "dpo": PairLoss(dpo_loss, needs_rewards=False, optimum=Optimum.TILTED),
    "ipo": PairLoss(ipo_loss, needs_rewards=False, optimum=Optimum.PREFERENCE_REGRESSION),
    "copg": PairLoss(copg_loss, needs_rewards=True, optimum=Optimum.TILTED),
    "simpo": PairLoss(simpo_loss, needs_rewards=False, uses_reference=False, settings=("gamma",)),
}
