"""Training-loop KL terms against exact values: numpy and torch agree, gradients survive chunking, and the
sequence estimators are unbiased for the enumerated KL of a tiny transformer pair."""
import math

import numpy as np
import pytest
import torch

from kl_estimation import training as tr
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from tiny_lms import save_pair


def test_exact_token_kl_matches_float64_reference_and_masks():
    g = torch.Generator().manual_seed(0)
    lp, lq = torch.randn(3, 5, 11, generator=g) * 3, torch.randn(3, 5, 11, generator=g) * 3
    mask = torch.rand(3, 5, generator=g) > 0.3
    ref = tr.exact_token_kl(lp.double().numpy(), lq.double().numpy(), mask.numpy())
    p = torch.softmax(lp.double(), -1)
    by_hand = (p * (torch.log_softmax(lp.double(), -1) - torch.log_softmax(lq.double(), -1))).sum(-1) * mask
    np.testing.assert_allclose(ref, by_hand.numpy(), rtol=1e-12, atol=1e-14)
    for chunk in (1, 4, 1000):
        np.testing.assert_allclose(tr.exact_token_kl(lp, lq, mask, chunk_size=chunk).numpy(), ref, atol=2e-5)
    # log-probabilities in, same answer; temperature divides the logits
    np.testing.assert_allclose(tr.exact_token_kl(torch.log_softmax(lp, -1), lq).numpy(),
                               tr.exact_token_kl(lp, lq).numpy(), atol=2e-5)
    np.testing.assert_allclose(tr.exact_token_kl(lp, lq, temperature=2.0).numpy(),
                               tr.exact_token_kl(lp / 2, lq / 2).numpy(), atol=2e-6)
    assert tr.exact_token_kl(lp.bfloat16(), lq.bfloat16()).dtype == torch.float32


def test_chunked_gradients_equal_unchunked():
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(2, 7, 13, generator=g) * 2).requires_grad_()
    lq = (torch.randn(2, 7, 13, generator=g) * 2).requires_grad_()
    grads = []
    for chunk in (3, 10_000):
        lp.grad = lq.grad = None
        (tr.exact_token_kl(lp, lq, chunk_size=chunk) * torch.arange(7.0)).sum().backward()
        grads.append((lp.grad.clone(), lq.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    # the gradient of Σ KL wrt Q's logits is Q − P
    lq.grad = None
    tr.exact_token_kl(lp.detach(), lq, chunk_size=5).sum().backward()
    torch.testing.assert_close(lq.grad, torch.softmax(lq, -1).detach() - torch.softmax(lp, -1).detach())


def test_per_token_estimators_have_their_exact_expectations():
    P = np.array([0.5, 0.3, 0.15, 0.05])
    Q = np.array([0.25, 0.25, 0.25, 0.25])
    kl = float(np.sum(P * np.log(P / Q)))
    lp, lq = np.log(P), np.log(Q)
    assert np.sum(P * tr.k1(lp, lq)) == pytest.approx(kl, rel=1e-12)
    assert np.sum(P * tr.k3(lp, lq)) == pytest.approx(kl, rel=1e-12)  # supp Q ⊆ supp P: unbiased
    assert np.sum(P * tr.k2(lp, lq)) == pytest.approx(0.5 * np.sum(P * np.log(P / Q) ** 2), rel=1e-12)
    assert np.all(tr.k3(lp, lq) >= 0)
    t = tr.k3(torch.tensor(lp), torch.tensor(lq), mask=torch.tensor([True, False, True, True]))
    assert isinstance(t, torch.Tensor) and t[1] == 0 and t.dtype == torch.float64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return load_transformers_pair(*save_pair(tmp_path_factory.mktemp("tr"), seed=2), prompts="a b",
                                  temperature=0.9)


@pytest.mark.parametrize("proposal", ["P", "Fixed mixture (λ=0.5)"])  # bounded weights: w ≤ 2 per step
def test_sequence_estimators_unbiased_against_enumeration(pair, proposal):
    T, N = 3, 4000
    prop = engine.sequence_proposal(proposal)
    kl = enumeration.enumerate_sequences(pair, prop, T)["kl"]
    b = engine.sample_batch(pair, prop, N, T, engine.unit_generator(11, proposal, 0, "cpu"))
    arrays = {k: torch.as_tensor(getattr(b, k)) for k in ("log_p", "log_q", "log_r", "kl_step", "mask")}
    for est in tr.SEQUENCE_ESTIMATORS:
        terms = tr.sequence_kl(arrays["log_p"], arrays["log_q"], token_kl=arrays["kl_step"], logr=arrays["log_r"],
                               mask=arrays["mask"], estimator=est)
        as_np = tr.sequence_kl(b.log_p, b.log_q, token_kl=b.kl_step, logr=b.log_r, mask=b.mask, estimator=est)
        assert isinstance(terms, torch.Tensor) and terms.shape == (N,)
        np.testing.assert_allclose(terms.numpy(), as_np, rtol=1e-10)
        se = float(terms.std()) / math.sqrt(N)
        assert abs(float(terms.mean()) - kl) < 4 * se, (est, float(terms.mean()), kl, se)


def test_sequence_kl_is_differentiable_and_rejects_bad_input():
    lp = torch.randn(8, 4, requires_grad=True)
    tr.sequence_kl(lp, torch.randn(8, 4), estimator="mc").sum().backward()
    assert torch.all(lp.grad == 1)
    with pytest.raises(ValueError, match="estimator: unknown 'k9'"):
        tr.sequence_kl(lp, lp, estimator="k9")
    with pytest.raises(ValueError, match="token_kl: estimator 'rb'"):
        tr.sequence_kl(lp, lp)
    with pytest.raises(ValueError, match="logits_q: shape"):
        tr.exact_token_kl(torch.zeros(2, 3), torch.zeros(2, 4))
