import math

import numpy as np
import pytest
from scipy.stats import genpareto

from kl_estimation.core.diagnostics import gpd_fit, kish_ess, pareto_khat


def test_kish_ess():
    assert kish_ess(np.zeros(50)) == pytest.approx(50)
    lw = np.log([1.0, 1.0, 2.0])
    assert kish_ess(lw) == pytest.approx(16 / 6)
    assert kish_ess(np.array([0.0, -1000.0])) == pytest.approx(1.0)
    assert kish_ess(np.array([800.0, 800.0])) == pytest.approx(2.0)  # no overflow


@pytest.mark.parametrize("k", [0.2, 0.5, 0.8, 1.2])
def test_khat_recovers_tail_index(k):
    """Weights w = U^-k have a Pareto tail with shape k; over 40 seeded repeats the mean k̂ lies within 4 SE."""
    rng = np.random.default_rng(7)
    lw = -k * np.log(rng.random((40, 4000)))
    kh = pareto_khat(lw)
    assert abs(kh.mean() - k) < 4 * kh.std(ddof=1) / math.sqrt(40) + 0.03  # 0.03: the prior's pull towards 0.5


def test_gpd_fit_agrees_with_scipy_mle():
    x = np.sort(genpareto.rvs(0.4, scale=2.0, size=3000, random_state=np.random.default_rng(0)))
    k, sigma = gpd_fit(x)
    c, _, scale = genpareto.fit(x, floc=0)
    assert abs(k - c) < 0.05 and abs(sigma / scale - 1) < 0.05


def test_khat_flat_and_tied_weights():
    assert np.isnan(pareto_khat(np.zeros(300)))
    heavy_ties = np.log(np.r_[np.ones(250), np.full(40, 5.0), np.full(10, 50.0)])
    assert np.isnan(pareto_khat(heavy_ties))  # three distinct values: no tail to fit
    rng = np.random.default_rng(1)
    some_ties = -0.5 * np.log(rng.random(1000))
    some_ties[np.argsort(some_ties)[-10:-5]] = np.sort(some_ties)[-10]
    assert 0.2 < pareto_khat(some_ties) < 0.9
    assert np.isnan(pareto_khat(np.zeros(10)))  # too short for a tail fit


def test_khat_axis():
    rng = np.random.default_rng(0)
    lw = -0.5 * np.log(rng.random((3, 1000)))
    np.testing.assert_allclose(pareto_khat(lw.T, axis=0), pareto_khat(lw))
