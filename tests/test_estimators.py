"""core.estimators' shared statistics: the one clustered SE and the one t-quantile every area uses."""
import math

import numpy as np
import pytest
from scipy import stats

from kl_estimation.core.estimators import clustered_se, t95, t_quantile


def test_clustered_se_and_t_quantile():
    """One clustered SE for every area: with equal cluster sizes it is the SE of the cluster means; one t-quantile."""
    x = np.random.default_rng(3).normal(size=(6, 5))  # 6 clusters of 5
    groups = np.repeat(np.arange(6), 5)
    means = x.mean(1)
    assert clustered_se(x.ravel(), groups, x.mean()) == pytest.approx(means.std(ddof=1) / math.sqrt(6), rel=1e-12)
    assert math.isnan(clustered_se(x.ravel(), np.zeros(30, dtype=int), x.mean()))
    assert t_quantile(4, 0.9) == stats.t.ppf(0.95, 4) and t95(7) == t_quantile(7) == stats.t.ppf(0.975, 7)
    assert math.isnan(t_quantile(0))
