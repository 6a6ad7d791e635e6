"""Array-namespace helpers so the same math runs on numpy arrays and torch tensors (array-API style)."""
from __future__ import annotations

from array_api_compat import array_namespace

__all__ = ["array_namespace", "logsumexp", "log_normalize"]


def logsumexp(x, axis: int = -1, keepdims: bool = True):
    """log Σ exp(x) over `axis`, stable for -inf entries (an all -inf row gives -inf, not NaN)."""
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, xp.zeros_like(m))
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_normalize(log_w, fallback):
    """log_w − logsumexp(log_w) over the last axis; rows whose total is 0 or ∞ become `fallback`.

    The fallback matters when P = Q on a row: every |log P/Q|-weighted proposal is then 0 everywhere,
    and sampling from P (the fallback) still estimates that row's KL of 0 exactly.
    """
    xp = array_namespace(log_w, fallback)
    lse = logsumexp(log_w)
    ok = xp.isfinite(lse)
    return xp.where(ok, log_w - xp.where(ok, lse, xp.zeros_like(lse)), fallback)
