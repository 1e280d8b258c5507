"""Put a reward model's scores on the Bradley-Terry log-odds scale with one temperature.

A reward model's units are arbitrary: r and 3r rank completions alike but claim different confidence,
and a KL-regularised objective trades reward against nats, so the unit matters. Held-out preference pairs
fix it: the scale s that maximises the Bradley-Terry likelihood sum_i log sigmoid(s m_i), with margins
m_i = r(chosen_i) - r(rejected_i), makes s * r a log-odds of being preferred.

Refusals (``DataError``, one line naming ``stage.reward.calibration`` and the numbers):

- no margins, or a margin that is not finite;
- no wrongly ordered pair, or no rightly ordered pair: the likelihood is then monotone in s, its maximum
  lies at +inf (or -inf) and there is no scale to report;
- a scale that is not clearly positive, ``scale - 2 SE <= 0`` (a one-sided Wald test at about 2.3%), with
  SE = 1 / sqrt(observed Fisher information at the fit): a reward model that orders held-out pairs at
  chance fits s near 0 (below 0 when worse than chance), and scaling by it would turn noise into
  confident rewards.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar  # scipy comes with scikit-learn, a dependency
from scipy.special import expit, log_expit

from directalign.errors import DataError

CONFIG_KEY = "stage.reward.calibration"


@dataclass(frozen=True)
class Calibration:
    """The fitted temperature: calibrated reward = ``scale * reward``.

    Log-likelihoods are means per pair, before (scale 1, the raw scores) and after calibration; accuracy
    counts a zero margin as half right.
    """

    scale: float
    scale_se: float
    n_pairs: int
    accuracy: float
    log_likelihood_before: float
    log_likelihood_after: float


def mean_log_likelihood(scale: float, margins: np.ndarray) -> float:
    """Mean Bradley-Terry log-likelihood per pair of ``margins`` (chosen minus rejected) at ``scale``."""
    return float(log_expit(scale * margins).mean())


def fisher_information(scale: float, margins: np.ndarray) -> float:
    """Observed Fisher information of the scale: minus the second derivative of the summed
    log-likelihood, sum_i m_i^2 sigmoid(s m_i) (1 - sigmoid(s m_i))."""
    chosen_probability = expit(scale * margins)
    return float(np.sum(margins**2 * chosen_probability * (1.0 - chosen_probability)))


def fit_calibration(margins: Sequence[float] | np.ndarray) -> Calibration:
    """Fit the one scale s > 0 that maximises the Bradley-Terry likelihood of held-out ``margins``,
    ``r(chosen) - r(rejected)`` with chosen the labeller's pick; refuse by the rules of the module."""
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 1 or margins.size == 0:
        raise DataError(f"{CONFIG_KEY}: no held-out margins to calibrate on (shape {margins.shape})")
    not_finite = np.flatnonzero(~np.isfinite(margins))
    if not_finite.size:
        first = not_finite[0]
        raise DataError(
            f"{CONFIG_KEY}: held-out pair {first} has margin {margins[first]}, not finite "
            f"({not_finite.size} of {margins.size} pairs)"
        )
    n_pairs = margins.size
    n_right, n_wrong = int((margins > 0).sum()), int((margins < 0).sum())
    accuracy = (n_right + 0.5 * (n_pairs - n_right - n_wrong)) / n_pairs
    if n_right == 0 or n_wrong == 0:
        raise DataError(
            f"{CONFIG_KEY}: {n_right} of {n_pairs} held-out pairs ordered right and {n_wrong} wrong; "
            "without both the Bradley-Terry scale is unbounded (use more held-out pairs)"
        )
    # Both signs present: the negative log-likelihood is strictly convex and coercive, one finite minimum.
    scale = float(minimize_scalar(lambda s: -mean_log_likelihood(s, margins)).x)
    scale_se = 1.0 / math.sqrt(fisher_information(scale, margins))
    if not scale - 2.0 * scale_se > 0:
        raise DataError(
            f"{CONFIG_KEY}: the reward model orders {n_pairs} held-out pairs at chance or worse "
            f"(accuracy {accuracy:.3f}, scale {scale:.4g} ± {scale_se:.4g} SE, scale - 2 SE <= 0); "
            "refusing to calibrate"
        )
    return Calibration(
        scale=scale,
        scale_se=scale_se,
        n_pairs=n_pairs,
        accuracy=accuracy,
        log_likelihood_before=mean_log_likelihood(1.0, margins),
        log_likelihood_after=mean_log_likelihood(scale, margins),
    )
