r"""The exact KL of a row of distributions — one function for every area (numpy and torch, in log space).

    KL(P‖Q) = Σ_v P(v)·(log P(v) − log Q(v))   over the last axis

Conventions, the same everywhere:

* 0·log 0 = 0: a token with P = 0 contributes nothing, whatever Q is there (also Q = 0: no −inf − (−inf) = NaN).
* P > 0 = Q gives +inf (KL(P‖Q) is infinite), as scipy.stats.entropy does.
* numpy: float64 throughout. torch: the terms in float32 or wider (bfloat16 / float16 inputs are upcast to float32,
  float64 stays float64); ``accumulate`` (e.g. torch.float64) sums the row in that dtype. Gradients flow to both
  inputs, and the 0·log 0 positions contribute a zero gradient (never NaN): the masked difference is formed before
  the product, so no inf·0 appears on either pass.

Used by the synthetic evaluation (probabilities → ``kl_from_probs``), the sampling engine's per-step KL, enumeration
ground truth, and the toy Markov DP. (training.py, owned elsewhere, still has its own copy; see the report.)
"""
from __future__ import annotations

import math

import numpy as np


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def kl_rows(log_p, log_q, *, accumulate=None):
    """KL(P‖Q) over the last axis from normalised log-probabilities (numpy arrays or torch tensors).

    ``accumulate``: torch only, the dtype of the sum over the row (default: the terms' dtype)."""
    if _is_torch(log_p) or _is_torch(log_q):
        import torch

        lp, lq = (torch.as_tensor(x) for x in (log_p, log_q))
        dt = torch.promote_types(torch.promote_types(lp.dtype, lq.dtype), torch.float32)
        lp, lq = lp.to(dt), lq.to(device=lp.device, dtype=dt)
        has_p = lp > -math.inf
        diff = torch.where(has_p, lp - torch.where(has_p, lq, torch.zeros_like(lq)), torch.zeros_like(lp))
        terms = torch.where(has_p, lp.exp(), torch.zeros_like(lp)) * diff
        return terms.sum(-1) if accumulate is None else terms.sum(-1, dtype=accumulate)
    lp, lq = np.asarray(log_p, dtype=np.float64), np.asarray(log_q, dtype=np.float64)
    has_p = lp > -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(has_p, lp - np.where(has_p, lq, 0.0), 0.0)
        return np.sum(np.where(has_p, np.exp(lp), 0.0) * diff, axis=-1)


def kl_from_probs(P, Q, axis: int = -1):
    """KL(P‖Q) along `axis` from probabilities (numpy, float64); equals scipy.stats.entropy(P, Q) for normalised
    rows."""
    P = np.moveaxis(np.asarray(P, dtype=np.float64), axis, -1)
    Q = np.moveaxis(np.asarray(Q, dtype=np.float64), axis, -1)
    with np.errstate(divide="ignore"):
        return kl_rows(np.log(P), np.log(Q))


def kl_from_logits(logits_p, logits_q, *, temperature: float = 1.0, accumulate=None):
    """KL(P_τ‖Q_τ) over the last axis from unnormalised logits (log-softmax after dividing by τ)."""
    if _is_torch(logits_p) or _is_torch(logits_q):
        import torch

        def norm(x):
            x = torch.as_tensor(x)
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)

        return kl_rows(norm(logits_p), norm(logits_q), accumulate=accumulate)
    from scipy.special import log_softmax

    return kl_rows(log_softmax(np.asarray(logits_p, dtype=np.float64) / temperature, axis=-1),
                   log_softmax(np.asarray(logits_q, dtype=np.float64) / temperature, axis=-1))
