r"""KL terms for training loops (RLHF, distillation): what the RL libraries each re-implement, tested against exact
values here. numpy arrays or torch tensors on any device; torch inputs keep autograd.

Shapes: ``logits_*`` (..., T, V) — logits or log-probabilities (log-softmax of log-probabilities is themselves);
``logp``, ``logq`` (..., T) — log P and log Q of the tokens actually sampled; ``mask`` (..., T), False on padding.
Per-token functions return (..., T) with masked positions 0; sum over T for a sequence, average over sequences.

==================  ============================================  =============================================
function            per token                                     expectation over x_t ~ P_t (given the prefix)
==================  ============================================  =============================================
exact_token_kl      KL(P_t‖Q_t) = Σ_v P_t(v)·log P_t(v)/Q_t(v)    itself: the Rao-Blackwellized (RB) term
k1                  f = log P/Q (x_t)                             KL(P_t‖Q_t): unbiased, noisy, can be < 0
k2                  f²/2                                          ½E[f²]: biased (≈ KL only when P ≈ Q)
k3                  e^{−f} − 1 + f ≥ 0                            KL(P_t‖Q_t) when supp Q ⊆ supp P
==================  ============================================  =============================================

Summed over a sequence drawn from P, k1 and the exact per-token KL both give unbiased estimates of the sequence
KL (MC and RB); neither has uniformly smaller variance (sequence_kl's docstring).
"""
from __future__ import annotations

import numpy as np

from kl_estimation.core import estimators as est


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _zero_masked(x, mask):
    """x with 0 where `mask` is False (mask numpy, list or torch; moved to x's kind and device)."""
    if mask is None:
        return x
    if _is_torch(x):
        import torch

        return torch.where(torch.as_tensor(mask, device=x.device), x, torch.zeros_like(x))
    return np.where(mask, x, 0.0)


def _kl_rows(lp, lq):
    """KL of each row of (unnormalised) log-probabilities, in float32 or wider; 0·log 0 = 0."""
    import torch

    lp = torch.log_softmax(lp.float() if lp.dtype in (torch.float16, torch.bfloat16) else lp, dim=-1)
    lq = torch.log_softmax(lq.float() if lq.dtype in (torch.float16, torch.bfloat16) else lq, dim=-1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)


def exact_token_kl(logits_p, logits_q, mask=None, *, temperature: float = 1.0, chunk_size: int = 4096):
    """KL(P_t‖Q_t) at every position from full logits (or log-probs), (..., T, V) → (..., T).

    torch: the vocabulary-wide float32 work is done `chunk_size` positions at a time, and with autograd each chunk is
    recomputed in the backward pass (activation checkpointing), so a 150k vocabulary never needs a (B, T, V) float32
    copy per model — only the inputs themselves. Gradients flow to both logits. numpy: float64.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 (got {temperature!r})")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: must be an integer ≥ 1 (got {chunk_size!r})")
    if tuple(logits_p.shape) != tuple(logits_q.shape):
        raise ValueError(f"logits_q: shape {tuple(logits_q.shape)} differs from logits_p's {tuple(logits_p.shape)}")
    if not (_is_torch(logits_p) or _is_torch(logits_q)):
        from scipy.special import log_softmax

        lp = log_softmax(np.asarray(logits_p, dtype=np.float64) / temperature, axis=-1)
        lq = log_softmax(np.asarray(logits_q, dtype=np.float64) / temperature, axis=-1)
        p = np.exp(lp)
        return _zero_masked(np.where(p > 0, p * (lp - lq), 0.0).sum(-1), mask)
    import torch
    from torch.utils.checkpoint import checkpoint

    lead, V = logits_p.shape[:-1], logits_p.shape[-1]
    fp, fq = logits_p.reshape(-1, V), logits_q.reshape(-1, V)
    if temperature != 1.0:
        fp, fq = fp / temperature, fq / temperature
    grad = torch.is_grad_enabled() and (fp.requires_grad or fq.requires_grad)
    parts = [checkpoint(_kl_rows, fp[i:i + chunk_size], fq[i:i + chunk_size], use_reentrant=False) if grad
             else _kl_rows(fp[i:i + chunk_size], fq[i:i + chunk_size]) for i in range(0, fp.shape[0], chunk_size)]
    return _zero_masked(torch.cat(parts).reshape(lead), mask)


def _per_token(fn, logp, logq, mask):
    _, lp, lq = est._arrays(logp, logq)
    return _zero_masked(fn(lp - lq), mask)


def k1(logp, logq, mask=None):
    """log P/Q of the sampled tokens (Schulman's k1): unbiased per token, may be negative."""
    return _per_token(est.naive_mc_terms, logp, logq, mask)


def k2(logp, logq, mask=None):
    """½(log P/Q)² of the sampled tokens (Schulman's k2): ≥ 0, biased; its gradient is the KL's when x ~ P."""
    return _per_token(est.k2_terms, logp, logq, mask)


def k3(logp, logq, mask=None):
    """(Q/P − 1) − log(Q/P) of the sampled tokens (Schulman's k3): ≥ 0, unbiased when supp Q ⊆ supp P."""
    return _per_token(est.k3_terms, logp, logq, mask)


SEQUENCE_ESTIMATORS = ("mc", "rb", "rb+cv", "k3")


def sequence_kl(logp, logq, *, token_kl=None, logr=None, mask=None, estimator: str = "rb"):
    """One KL term per sequence, (..., N, T) per-step arrays → (..., N); their mean estimates the sequence KL.

    ``estimator``: "mc" Σ_t f_t; "rb" Σ_t KL_t (needs ``token_kl``, e.g. from exact_token_kl); "rb+cv" RB plus a
    cross-fitted multiple of (MC − RB), never worse than the better of the two asymptotically (needs ``token_kl``
    and N ≥ 4 sequences on the second-to-last axis); "k3" k3 of the sequence log-ratio. With ``logr`` (log r of the
    sampled tokens, sequences drawn from a proposal r ≠ P) each becomes its importance-weighted form (IS, RB-IS, …).
    Neither MC nor RB has the smaller variance in general: RB's terms K_t condition on different prefixes and
    covary with earlier steps, so sequence-level RB can exceed MC.
    """
    if estimator not in SEQUENCE_ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}; allowed: {', '.join(SEQUENCE_ESTIMATORS)}")
    if estimator in ("rb", "rb+cv") and token_kl is None:
        raise ValueError(f"token_kl: estimator {estimator!r} needs the exact per-token KL (exact_token_kl)")
    xp, lp, lq, *rest = est._arrays(logp, logq, *(x for x in (token_kl, logr) if x is not None))
    kl = rest.pop(0) if token_kl is not None else None
    lr = rest.pop(0) if logr is not None else lp
    f, lw = _zero_masked(lp - lq, mask), _zero_masked(lp - lr, mask)
    if estimator == "rb":
        return est.rao_blackwell_is_terms(kl, lw, mask)
    if estimator == "rb+cv":
        if lp.shape[-2] < 4:
            raise ValueError(f"logp: rb+cv needs at least 4 sequences on axis -2 (got {lp.shape[-2]})")
        return est.rb_control_variate_terms(kl, f, lw, mask)
    seq_f, seq_lw = xp.sum(f, axis=-1), xp.sum(lw, axis=-1)
    g = seq_f if estimator == "mc" else est.k3_terms(seq_f)
    return xp.exp(seq_lw) * g
