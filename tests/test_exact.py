"""core.exact: the exact KL of rows of distributions — numpy and torch agree, 0·log 0 = 0, inf where Q = 0 < P,
float32 or wider, gradients without NaN; and every area uses it: kl_rows for probabilities, the chunked kernel
(token_terms) for logits in training and the corpus run."""
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


def _naive_kl(zp, zq):
    """Σ_{P>0} P·(log P − log Q) from logits, float64 log-softmax, written out with nothing shared."""
    from scipy.special import log_softmax

    lp, lq = log_softmax(np.asarray(zp, np.float64), -1), log_softmax(np.asarray(zq, np.float64), -1)
    with np.errstate(invalid="ignore"):
        return np.where(lp > -np.inf, np.exp(lp) * (lp - lq), 0.0).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_logit_areas_call_the_chunked_kernel_and_agree_with_float64(dtype, monkeypatch):
    """training.exact_token_kl and training.token_logprobs_and_kl go through core.exact's one kernel; they and the
    corpus run's token_stats (both directions, its own passes with the normalisers in double) agree with a naive
    float64 log-softmax sum: to 1e-10 relative for float64 logits (−inf logits included), to float32 rounding for bf16
    ones (computed in float32)."""
    from kl_estimation import training
    from kl_estimation.core import exact
    from kl_estimation.llm.corpus.stats import token_stats

    g = torch.Generator().manual_seed(0)
    zp = (3 * torch.randn(2, 6, 13, generator=g, dtype=torch.float64)).to(dtype)
    zq = (zp.double() + torch.randn(2, 6, 13, generator=g, dtype=torch.float64)).to(dtype)
    zp[0, 1, :3] = zq[0, 1, :3] = -math.inf  # impossible under both
    zp[1, 2, 5] = -math.inf  # P = 0 < Q: nothing in KL(P‖Q), KL(Q‖P) infinite (checked apart)
    tok = torch.randint(3, 13, (2, 6), generator=g)
    exact.token_terms(zp[0], zq[0], tok[0])  # builds the kernel
    calls = []
    function = exact._KERNEL

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append("token_terms")
            return function.apply(*args)

    monkeypatch.setattr(exact, "_KERNEL", Spy)
    ref, rev = _naive_kl(zp.double(), zq.double()), _naive_kl(zq.double(), zp.double())
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    got = {"exact_token_kl": training.exact_token_kl(zp, zq, chunk_size=5),
           "token_logprobs_and_kl": training.token_logprobs_and_kl(zp, zq, tok, chunk_size=5)[2]}
    st = token_stats(zp, zq, tok, chunk_size=5)
    got["token_stats"] = st["kl_forward"]
    assert calls.count("token_terms") == 2
    for name, kl in got.items():
        assert kl.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        np.testing.assert_allclose(kl.double().numpy(), ref, rtol=rtol, atol=1e-300, err_msg=name)
    finite = np.isfinite(rev)
    assert not finite[1, 2]
    np.testing.assert_allclose(st["kl_reverse"].double().numpy()[finite], rev[finite], rtol=rtol, atol=1e-300)
    assert st["kl_reverse"][1, 2] == math.inf  # P = 0 < Q (the training kernel clamps: a huge finite KL)
    # with float64 logits the numpy path (kl_rows, float64) is the same number to rounding
    np.testing.assert_allclose(training.exact_token_kl(zp.double().numpy(), zq.double().numpy()), ref, rtol=1e-10)

