"""core.exact: the one exact KL of a row of distributions — numpy and torch agree, 0·log 0 = 0, inf where Q = 0 < P,
float32 or wider, gradients without NaN; and every area uses it."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from kl_estimation.core.exact import kl_from_logits, kl_from_probs, kl_rows


def test_matches_scipy_and_handles_zeros_and_infinity():
    rng = np.random.default_rng(0)
    P, Q = rng.dirichlet(np.ones(50), size=4), rng.dirichlet(np.ones(50), size=4)
    np.testing.assert_allclose(kl_from_probs(P, Q), entropy(P.T, Q.T), rtol=1e-12)
    assert kl_from_probs([0.5, 0.5, 0.0], [0.5, 0.25, 0.25]) == pytest.approx(0.5 * math.log(2))
    assert kl_from_probs([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0  # 0·log(0/0) = 0, not NaN
    assert kl_from_probs([0.5, 0.5], [1.0, 0.0]) == math.inf
    np.testing.assert_allclose(kl_from_probs(P.T, Q.T, axis=0), kl_from_probs(P, Q), rtol=1e-14)


def test_torch_and_numpy_agree_and_dtypes_are_float32_or_wider():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(30), size=(3, 2)))
    lq = np.log(rng.dirichlet(np.ones(30), size=(3, 2)))
    lp[0, 0, :5] = -np.inf  # P = 0 on some tokens
    expect = kl_rows(lp, lq)
    got = kl_rows(torch.from_numpy(lp), torch.from_numpy(lq))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-12)
    half = kl_rows(torch.from_numpy(lp).bfloat16(), torch.from_numpy(lq).bfloat16())
    assert half.dtype == torch.float32  # bf16 inputs: terms in float32
    acc = kl_rows(torch.from_numpy(lp).float(), torch.from_numpy(lq).float(), accumulate=torch.float64)
    assert acc.dtype == torch.float64 and np.allclose(acc.numpy(), expect, rtol=1e-5)


def test_gradients_are_finite_where_p_is_zero():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]])).requires_grad_()
    lq = torch.log(torch.tensor([[0.4, 0.6, 0.0]])).requires_grad_()
    kl_rows(lp, lq).sum().backward()
    assert torch.isfinite(lq.grad).all() and torch.isfinite(lp.grad[:, :2]).all()
    logits = torch.randn(2, 7, requires_grad=True)
    kl_from_logits(torch.randn(2, 7), logits, temperature=0.5).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_every_area_uses_the_one_function():
    """The engine's per-step KL, the synthetic exact KL and the toy DP's per-step KL are this function."""
    from kl_estimation.llm.engine import exact_step_kl
    from kl_estimation.synthetic.evaluation import exact_kl
    from kl_estimation.toy import markov

    rng = np.random.default_rng(2)
    P, Q = rng.dirichlet(np.ones(9), size=5), rng.dirichlet(np.ones(9), size=5)
    lp, lq = np.log(P), np.log(Q)
    ref = kl_rows(lp, lq)
    np.testing.assert_array_equal(exact_kl(P, Q), kl_from_probs(P, Q))
    np.testing.assert_allclose(exact_step_kl(torch.from_numpy(lp), torch.from_numpy(lq)).numpy(), ref, rtol=1e-14)
    tb = markov.markov_pair("zipf", "medium", 5, 1, 3, np.random.default_rng(0))
    one = markov.MarkovTables(tb.log_p[:1], tb.log_q[:1], 1)  # T = 1: the KL is the first step's, at the start
    assert markov.exact_values(one).kl == pytest.approx(float(kl_rows(tb.log_p[0, -1], tb.log_q[0, -1])),
                                                         rel=1e-14)
