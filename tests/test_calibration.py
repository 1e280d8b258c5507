"""Temperature calibration of reward margins: recovers a known scale on synthetic pairs, with an honest
standard error, and refuses margins that carry no usable signal."""

import math

import numpy as np
import pytest

from directalign.calibration import fit_calibration, mean_log_likelihood
from directalign.errors import DataError


def synthetic_margins(true_scale: float, n_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """Raw margins m ~ N(0, 2^2) between two completions; the labeller prefers the first with probability
    sigmoid(true_scale * m); each pair is oriented so that chosen is the labeller's pick."""
    raw = rng.normal(0.0, 2.0, n_pairs)
    first_chosen = rng.random(n_pairs) < 1.0 / (1.0 + np.exp(-true_scale * raw))
    return np.where(first_chosen, raw, -raw)


def test_recovers_a_known_temperature():
    margins = synthetic_margins(1.5, 2000, np.random.default_rng(0))

    fit = fit_calibration(margins)

    assert abs(fit.scale - 1.5) < 3 * fit.scale_se and abs(fit.scale - 1.5) < 0.25
    assert 0.01 < fit.scale_se < 0.2 and fit.n_pairs == 2000
    assert fit.accuracy == pytest.approx(np.mean(margins > 0))
    assert fit.log_likelihood_before == pytest.approx(np.mean(-np.log1p(np.exp(-margins))))
    # The fit is the maximum: it beats scale 1 and both neighbours.
    assert fit.log_likelihood_after > fit.log_likelihood_before
    for neighbour in (fit.scale - 0.01, fit.scale + 0.01):
        assert mean_log_likelihood(neighbour, margins) < fit.log_likelihood_after


def test_fit_undoes_a_rescaled_reward_model():
    margins = synthetic_margins(1.5, 500, np.random.default_rng(1))
    # The same reward model in units 4 times larger needs a scale 4 times smaller.
    assert fit_calibration(4.0 * margins).scale == pytest.approx(
        fit_calibration(margins).scale / 4.0, rel=1e-5
    )


def test_standard_error_matches_the_spread_over_repeated_held_out_sets():
    rng = np.random.default_rng(2)
    fits = [fit_calibration(synthetic_margins(1.0, 400, rng)) for _ in range(200)]
    spread = np.std([f.scale for f in fits], ddof=1)
    typical_se = np.mean([f.scale_se for f in fits])
    # 200 repeats estimate a standard deviation within about 5% (1 / sqrt(2 * 199)); 15% is loose.
    assert abs(spread / typical_se - 1.0) < 0.15


def test_chance_level_margins_are_refused():
    # Each margin once each way: the likelihood is symmetric in s, so the fit is s = 0.
    symmetric = np.array([0.5, -0.5, 1.0, -1.0, 2.0, -2.0, 3.0, -3.0])
    with pytest.raises(
        DataError, match=r"stage\.reward\.calibration: .* at chance or worse .* scale - 2 SE <= 0"
    ):
        fit_calibration(symmetric)
    # Labels that ignore the margins (true scale 0).
    with pytest.raises(DataError, match=r"at chance or worse \(accuracy 0\.447, scale -0\.07326"):
        fit_calibration(synthetic_margins(0.0, 300, np.random.default_rng(3)))
    # A reward model that prefers the rejected completion: negative scale.
    with pytest.raises(DataError, match=r"at chance or worse \(accuracy 0\.230, scale -0\.8641"):
        fit_calibration(-synthetic_margins(1.0, 300, np.random.default_rng(4)))


def test_a_scale_that_would_explode_is_refused():
    # Every held-out pair ordered right: log sigmoid(s m) increases in s without bound.
    with pytest.raises(DataError, match=r"3 of 4 held-out pairs ordered right and 0 wrong"):
        fit_calibration([1.0, 0.2, 3.0, 0.0])
    with pytest.raises(DataError, match=r"0 of 2 held-out pairs ordered right and 2 wrong"):
        fit_calibration([-1.0, -0.2])


@pytest.mark.parametrize(
    ("margins", "message"),
    [
        ([], r"no held-out margins to calibrate on \(shape \(0,\)\)"),
        ([1.0, -0.5, math.nan, 2.0], r"held-out pair 2 has margin nan, not finite \(1 of 4 pairs\)"),
        ([math.inf, -0.5, -math.inf], r"held-out pair 0 has margin inf, not finite \(2 of 3 pairs\)"),
    ],
)
def test_empty_or_non_finite_margins_are_refused_in_one_line(margins, message):
    with pytest.raises(DataError, match=r"^stage\.reward\.calibration: " + message) as error:
        fit_calibration(margins)
    assert "\n" not in str(error.value)
