"""Every registry proposal is a normalised distribution covering every token where P·log(P/Q) ≠ 0."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kl_estimation.core.proposals import (
    REGISTRY,
    build_proposals,
    by_name,
    log_ratio,
    proposal,
)

GRID = (0.0, 0.3, 0.5, 0.9, 1.0)
ALL = build_proposals(GRID)


@st.composite
def pq(draw):
    """Random P, Q over V ≤ 40 tokens, weights spanning 12 orders of magnitude; P may have zeros, Q > 0 where P > 0."""
    V = draw(st.integers(2, 40))
    logw = st.floats(-28, 0)
    lp = draw(arrays(np.float64, V, elements=logw))
    lq = draw(arrays(np.float64, V, elements=logw))
    zero = draw(arrays(np.bool_, V))
    zero[np.argmax(lp)] = False  # P keeps at least one token
    p = np.where(zero, 0.0, np.exp(lp))
    return p / p.sum(), np.exp(lq) / np.exp(lq).sum()


def logs(p, q):
    with np.errstate(divide="ignore"):
        return np.log(p), np.log(q)


@settings(max_examples=150, deadline=None)
@given(pq())
def test_normalised_and_covering(pair):
    p, q = pair
    log_p, log_q = logs(p, q)
    f = log_ratio(log_p, log_q)
    needs = (p * np.abs(f)) > 0
    for prop in ALL:
        log_r = prop(log_p, log_q)
        assert not np.any(np.isnan(log_r)), prop.name
        r = np.exp(log_r)
        assert math.isclose(r.sum(), 1.0, rel_tol=1e-9), prop.name
        assert np.all(r[needs] > 0), f"{prop.name} misses tokens where P·log P/Q ≠ 0"
        # importance sampling with r is then unbiased: Σ r·(P/r)·f = KL exactly
        ok = r > 0
        assert math.isclose(np.sum(p[ok] * f[ok]), np.sum(p * f), rel_tol=1e-9, abs_tol=1e-12)


@settings(max_examples=40, deadline=None)
@given(pq())
def test_torch_matches_numpy(pair):
    log_p, log_q = logs(*pair)
    tp, tq = torch.from_numpy(log_p), torch.from_numpy(log_q)
    for prop in ALL:
        got = prop(tp, tq)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_allclose(got.numpy(), prop(log_p, log_q), rtol=1e-10, atol=1e-10, err_msg=prop.name)


def test_batched_rows_are_independent():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(7), size=(3, 2)))
    lq = np.log(rng.dirichlet(np.ones(7), size=(3, 2)))
    for prop in ALL:
        full = prop(lp, lq)
        np.testing.assert_allclose(full[1, 0], prop(lp[1, 0], lq[1, 0]), rtol=1e-12)


def test_formulas_on_a_small_case():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.3, 0.5])
    f = np.log(p / q)
    lp, lq = np.log(p), np.log(q)

    def norm(w):
        return w / w.sum()

    opt = norm(p * np.abs(f))
    expected = {
        "Alpha-mixture (α=0.3)": 0.3 * opt + 0.7 * p,
        "Geometric (β=0.3)": norm(p ** 0.3 * q ** 0.7),
        "Fixed mixture (λ=0.3)": 0.3 * p + 0.7 * q,
        "Chi-square aware (α=0.3)": norm(p * (p / q) ** 0.3),
        "Cross-entropy tilted (t=0.3)": norm(p * np.exp(0.3 * -p * np.log(q))),
        "Exponential family (β=2)": norm(p * np.exp(2 * np.abs(f))),
        "Balanced 1": norm(np.sqrt(p * q) * np.abs(f)),
        "Balanced 2": norm(np.sqrt(p * np.abs(f) * q / (p + q))),
        "Balanced 3": norm(np.sqrt(p * q * (f ** 2 + 1))),
        "Adaptive": norm(p * (1 + np.abs(f))),
        "Optimal": opt,
    }
    for name, r in expected.items():
        np.testing.assert_allclose(np.exp(by_name(name)(lp, lq)), r, rtol=1e-12, err_msg=name)


def test_p_equal_q_falls_back_to_p():
    lp = np.log(np.array([0.6, 0.4]))
    for prop in ALL:
        r = np.exp(prop(lp, lp))
        assert math.isclose(r.sum(), 1.0)
    np.testing.assert_allclose(np.exp(proposal("Optimal")(lp, lp)), [0.6, 0.4])


def test_registry_grid_and_names():
    names = [p.name for p in build_proposals()]
    assert "Alpha-mixture (α=0.3)" in names and "Exponential family (β=5)" in names and "Optimal" in names
    assert len(names) == 5 * 4 + 5 + 5
    assert all(by_name(n).name == n for n in names)
    assert set(REGISTRY) >= {"Alpha-mixture", "Geometric", "Fixed mixture", "Chi-square aware",
                             "Cross-entropy tilted", "Exponential family", "Balanced 1", "Balanced 2", "Balanced 3",
                             "Adaptive", "Optimal"}


@pytest.mark.parametrize("family,param,match", [
    ("Alpha-mixture", 1.5, r"Alpha-mixture α must be in \[0, 1\]"),
    ("Fixed mixture", -0.1, r"λ must be in \[0, 1\]"),
    ("Geometric", -1, r"β must be in \[0, ∞\)"),
    ("Exponential family", float("nan"), "β must be in"),
    ("Cross-entropy tilted", -0.5, "t must be in"),
    ("Nope", 0.5, "unknown proposal family 'Nope'"),
    ("Optimal", 0.5, "takes no parameter"),
])
def test_bad_parameters(family, param, match):
    with pytest.raises(ValueError, match=match):
        proposal(family, param)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown proposal 'Geo'"):
        by_name("Geo")
