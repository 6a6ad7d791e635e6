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

Those are values. As losses their autograd gradients are not ∇KL(P_θ‖Q) for sequences drawn from P_θ (k3 summed
gives a per-step *forward* KL's, k1 zero, Σ exact_token_kl drops the score term). For gradients, torch only:
``kl_loss`` (value = the MC or RB term, gradient unbiased for ∇KL, on- or off-policy), ``kl_rewards`` (the
reward-shaping form for PPO-style trainers) and ``token_logprobs_and_kl`` (their inputs from logits, one chunked
pass). docs/training.md has the table of which gradient each form has, each line tested in tests/test_kl_loss.py.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np

from kl_estimation.core import estimators as est
from kl_estimation.core.diagnostics import kish_ess
from kl_estimation.core.exact import kl_from_logits, token_terms


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _bool_mask(mask, device=None):
    """`mask` as booleans (a torch tensor where `device` is given, else numpy): booleans or 0 / 1, anything else
    (NaN, inf, 0.5) a ValueError naming ``mask`` — a float mask would otherwise count NaN as True."""
    if _is_torch(mask) or device is not None:
        import torch

        m = torch.as_tensor(mask, device=device)
        if m.dtype != torch.bool:
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("mask: must hold booleans or 0 / 1 (got other values: NaN, inf or a fraction)")
            m = m.bool()
        return m
    m = np.asarray(mask)
    if m.dtype != bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask: must hold booleans or 0 / 1 (got other values: NaN, inf or a fraction)")
        m = m.astype(bool)
    return m


def _zero_masked(x, mask):
    """x with 0 where `mask` is False (mask numpy, list or torch; moved to x's kind and device)."""
    if mask is None:
        return x
    if _is_torch(x):
        import torch

        return torch.where(_bool_mask(mask, x.device), x, torch.zeros_like(x))
    return np.where(_bool_mask(mask), x, 0.0)


def _check_finite(name: str, x, mask=None, *, logits: bool = False):
    """ValueError naming `name` when x holds NaN or ±inf where `mask` is True. For (..., T, V) ``logits`` −inf is
    allowed (a token the model cannot produce) and each row is checked through its sum, one reduction with no
    vocabulary-wide temporary: a NaN or +inf anywhere in the row makes the sum NaN or +inf, −inf alone does not."""
    if x is None:
        return
    if _is_torch(x):
        import torch

        if logits:
            x = x.sum(-1, dtype=torch.promote_types(torch.float32, x.dtype))
        bad = torch.isnan(x) | (torch.isposinf(x) if logits else torch.isinf(x))
        if mask is not None:
            bad = bad & _bool_mask(mask, x.device)
        found = bool(bad.any())
    else:
        a = np.asarray(x, dtype=np.float64)
        if logits:
            a = a.sum(-1)
        bad = np.isnan(a) | (np.isposinf(a) if logits else np.isinf(a))
        if mask is not None:
            bad = bad & _bool_mask(mask)
        found = bool(bad.any())
    if found:
        what = "NaN or +inf" if logits else "NaN or infinite"
        where = " at unmasked positions" if mask is not None else ""
        raise ValueError(f"{name}: {what} values{where}")


def exact_token_kl(logits_p, logits_q, mask=None, *, temperature: float = 1.0, chunk_size: int = 4096):
    """KL(P_t‖Q_t) at every position from full logits (or log-probs), (..., T, V) → (..., T).

    torch: core.exact.token_terms, the kernel of token_logprobs_and_kl: the vocabulary-wide float32 work is done
    `chunk_size` positions at a time, and the analytic backward recomputes each chunk, so a 150k vocabulary never
    needs a (B, T, V) float32 copy per model — only the inputs themselves. Gradients flow to both logits. numpy:
    float64 (core.exact.kl_from_logits).
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0 (got {temperature!r})")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: must be an integer ≥ 1 (got {chunk_size!r})")
    if tuple(logits_p.shape) != tuple(logits_q.shape):
        raise ValueError(f"logits_q: shape {tuple(logits_q.shape)} differs from logits_p's {tuple(logits_p.shape)}")
    _check_finite("logits_p", logits_p, mask, logits=True)
    _check_finite("logits_q", logits_q, mask, logits=True)
    if not (_is_torch(logits_p) or _is_torch(logits_q)):
        return _zero_masked(kl_from_logits(logits_p, logits_q, temperature=temperature), mask)
    import torch

    lead, V = logits_p.shape[:-1], logits_p.shape[-1]
    fp, fq = logits_p.reshape(-1, V), logits_q.reshape(-1, V)
    tok = torch.zeros(fp.shape[0], dtype=torch.long, device=fp.device)  # the token terms are not used
    kl = token_terms(fp, fq, tok, inv_tau=1.0 / temperature, chunk_size=chunk_size)[2]
    return _zero_masked(kl.reshape(lead), mask)


def _per_token(fn, logp, logq, mask):
    _check_finite("logp", logp, mask)
    _check_finite("logq", logq, mask)
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
    for name, x in (("logp", logp), ("logq", logq), ("token_kl", token_kl), ("logr", logr)):
        _check_finite(name, x, mask)
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


# ---------------------------------------------------------------------------------------------------------------
# Gradients. Everything above estimates the *value* of KL(P‖Q); autograd through those values is not the gradient
# of the sequence KL when the sequences are drawn from the P being trained: the sampling distribution depends on θ
# too. With K_t = KL(P_t‖Q_t | x_<t) (a function of the prefix only) and ρ_t = ∇log P_θ(x_t | x_<t),
#
#     ∇_θ KL(P_θ‖Q) = ∇_θ E_{x~P_θ}[Σ_t K_t] = E[Σ_t ∇K_t  +  Σ_t ρ_t · Σ_{s>t} K_s]            (Rao-Blackwellized)
#                   = ∇_θ E[Σ_t f_t]       = E[Σ_t ρ_t · Σ_{s≥t} f_s]   (+ E[Σ_t ∇f_t] = E[Σ_t ρ_t] = 0)  (MC)
#
# The score of x_t multiplies only KLs that come after it (K_t is fixed once x_<t is); the per-token losses keep the
# pathwise part and drop the score part, so they differentiate a different objective (docs/training.md's table).
# ---------------------------------------------------------------------------------------------------------------

KL_LOSS_ESTIMATORS = ("mc", "rb")
KL_LOSS_BASELINES = (None, "loo")



def token_logprobs_and_kl(logits_p, logits_q, tokens, mask=None, *, temperature: float = 1.0,
                          chunk_size: int | None = None, compile: bool = False):
    """log P(x_t), log Q(x_t) of the sampled tokens and the exact KL(P_t‖Q_t), in one chunked pass over the vocabulary.

    Parameters
    ----------
    logits_p, logits_q : torch.Tensor, (..., T, V)
        Logits (or log-probabilities) of the policy P and the reference Q at each position; any float dtype, any
        device. Gradients flow to whichever requires them.
    tokens : torch.Tensor, (..., T), integer
        The sampled tokens x_t. Padding positions (``mask`` False) may hold any value, −100 included.
    mask : torch.Tensor, (..., T), bool, optional
        False on padding; the three outputs are 0 there.
    temperature : float
        The logits are divided by it (the sampling temperature, so that P is the distribution sampled from).
    chunk_size : int, optional
        Positions per chunk; default ⌊2²⁴ / V⌋ (110 at V = 151,936), so the float32 temporaries stay near 64 MiB
        each whatever B × T is.
    compile : bool
        Run each chunk through kernels compiled by ``torch.compile`` (inductor: Triton on GPUs, C++ on CPUs), which
        fuse the log-softmaxes, the KL and the gradient into one or two passes over the logits: several times
        faster than the eager path and than the libraries' eager log_softmax (bench/bench_kl_loss.py). The first
        call compiles (seconds to a minute, once per process, dtype and temperature; any number of rows after
        that). Needs a working torch.compile; off by default so that nothing compiles unasked.

    Returns
    -------
    logp, logq, token_kl : torch.Tensor, (..., T)
        In float32 (float64 for float64 logits). Feed them to ``kl_loss`` or ``kl_rewards``.

    Notes
    -----
    This replaces ``log_softmax(logits).gather(...)`` for both models plus ``exact_token_kl``: the forward keeps
    nothing vocabulary-wide, the backward recomputes each chunk's log-softmax and writes the analytic gradient
    straight into a gradient of the logits' own dtype, so no (B, T, V) float32 tensor exists at any time (with
    bf16 logits, the one (B, T, V) tensor it allocates is their bf16 gradient). A token that Q gives probability 0
    where P does not makes that KL huge (the log-probability −inf is clamped to the most negative float).
    """
    import torch

    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be a finite number > 0 (got {temperature!r})")
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size: must be an integer ≥ 1 (got {chunk_size!r})")
    for name, x in (("logits_p", logits_p), ("logits_q", logits_q), ("tokens", tokens)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: must be a torch tensor (got {type(x).__name__})")
    if tuple(logits_p.shape) != tuple(logits_q.shape):
        raise ValueError(f"logits_q: shape {tuple(logits_q.shape)} differs from logits_p's {tuple(logits_p.shape)}")
    lead, V = tuple(logits_p.shape[:-1]), logits_p.shape[-1]
    if tuple(tokens.shape) != lead:
        raise ValueError(f"tokens: shape {tuple(tokens.shape)}, expected the logits' leading shape {lead}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: must be integer (got {tokens.dtype})")
    m = _mask_tensor(mask, lead, logits_p.device)
    tok = torch.where(m, tokens, torch.zeros_like(tokens)).long().reshape(-1)
    if bool(((tok < 0) | (tok >= V)).any()):
        raise ValueError(f"tokens: values outside [0, {V}) at unmasked positions")
    outs = token_terms(logits_p.reshape(-1, V), logits_q.reshape(-1, V), tok, inv_tau=1.0 / temperature,
                       chunk_size=chunk_size, compile=compile)
    if not bool(torch.stack([torch.isfinite(o) | ~m.reshape(-1) for o in outs]).all()):
        # NaN or +inf in a row of either logits makes all three outputs of that row NaN: look at the inputs only then
        _check_finite("logits_p", logits_p, m, logits=True)
        _check_finite("logits_q", logits_q, m, logits=True)
    return tuple(torch.where(m, o.reshape(lead), torch.zeros((), dtype=o.dtype, device=o.device)) for o in outs)


def _mask_tensor(mask, shape, device):
    import torch

    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = torch.as_tensor(mask, device=device)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"mask: shape {tuple(m.shape)} differs from logp's {tuple(shape)}")
    return _bool_mask(m)


def _loss_inputs(fn: str, logp, logq, mask, token_kl, logp_old):
    """The per-step inputs as tensors of one float dtype (float32 or wider), zeroed where `mask` is False."""
    import torch

    for name, x in (("logp", logp), ("logq", logq), ("token_kl", token_kl), ("logp_old", logp_old)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: {fn} needs torch tensors, for autograd (got {type(x).__name__})")
        if tuple(x.shape) != tuple(logp.shape):
            raise ValueError(f"{name}: shape {tuple(x.shape)} differs from logp's {tuple(logp.shape)}")
    if logp.ndim < 1:
        raise ValueError("logp: needs a time axis (…, T)")
    dt = torch.promote_types(torch.float32, logp.dtype)
    m = _mask_tensor(mask, logp.shape, logp.device)
    zero = torch.zeros((), dtype=dt, device=logp.device)

    for name, x in (("logp", logp), ("logq", logq), ("token_kl", token_kl), ("logp_old", logp_old)):
        _check_finite(name, x, m)

    def clean(x):
        return None if x is None else torch.where(m, x.to(dt), zero)

    return m, clean(logp), clean(logq), clean(token_kl), clean(logp_old)


def _future(c, inclusive: bool):
    """Σ_{s≥t} c_s (inclusive) or Σ_{s>t} c_s along the last axis."""
    import torch

    rev = torch.flip(torch.cumsum(torch.flip(c, (-1,)), -1), (-1,))
    return rev if inclusive else rev - c


def _future_relative(log_w, v, log_ref, inclusive: bool):
    """Σ_{s≥t or s>t} exp(log_w_s − log_ref_t)·v_s in log space (v of either sign), so prefix weights that under- or
    overflow on their own still give finite ratios."""
    import torch

    out = torch.zeros_like(v)
    for sign, part in ((1.0, v.clamp(min=0)), (-1.0, (-v).clamp(min=0))):
        a = torch.flip(torch.logcumsumexp(torch.flip(log_w + torch.log(part), (-1,)), -1), (-1,))
        if not inclusive:
            a = torch.cat([a[..., 1:], torch.full_like(a[..., :1], -math.inf)], -1)
        out = out + sign * torch.exp(a - log_ref)
    return out


def _leave_one_out(d, m):
    """At each step, the mean of `d` over the *other* sequences (axis −2) that are not padding there: it does not
    depend on the sequence it is used for, so subtracting it from that sequence's return keeps the gradient
    unbiased."""
    import torch

    mf = m.to(d.dtype)
    num = (d * mf).sum(-2, keepdim=True) - d * mf
    den = mf.sum(-2, keepdim=True) - mf
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(d))


KL_LOSS_WEIGHTS = ("clip", "full")
RATIO_CLIP = 0.2  # PPO's ε, TRL's and OpenRLHF's default
MIN_ESS_FRACTION = 0.5


class OffPolicyWeights(NamedTuple):
    """How far the policy being trained has moved from the one that drew the batch: what a trainer should log."""

    ess: float  # Kish ESS of the full-prefix weights Π_t P_θ/P_old of the whole sequences, over the batch
    n: int  # sequences in the batch
    max_ratio: float  # the largest per-token ratio P_θ/P_old at an unmasked position
    min_ratio: float  # the smallest
    outside_clip: float  # share of unmasked tokens whose ratio lies outside [1 − ratio_clip, 1 + ratio_clip]


def offpolicy_weights(logp, logp_old, mask=None, *, ratio_clip: float = RATIO_CLIP) -> OffPolicyWeights:
    """The spread of the importance weights between the policy being trained (``logp``) and the one that drew the
    sequences (``logp_old``), (..., T) each: sequence weights' ESS, per-token ratios, share outside PPO's clip."""
    import torch

    if not ratio_clip > 0:
        raise ValueError(f"ratio_clip: must be > 0 (got {ratio_clip!r})")
    m, lp, _, _, old = _loss_inputs("offpolicy_weights", logp, logp, mask, None, logp_old)
    if old is None:
        raise ValueError("logp_old: needed (the log-probabilities under the policy that drew the sequences)")
    log_r = (lp - old).detach()
    seq = log_r.sum(-1).reshape(-1).double().cpu().numpy()
    r = torch.exp(log_r[m]) if bool(m.any()) else torch.ones(1, dtype=log_r.dtype)
    outside = ((r < 1 - ratio_clip) | (r > 1 + ratio_clip)).double().mean()
    return OffPolicyWeights(float(kish_ess(seq)), int(seq.size), float(r.max()), float(r.min()), float(outside))


def _warn_if_degenerate(w: OffPolicyWeights, min_ess: float):
    if w.ess < min_ess * w.n:
        warnings.warn(f"logp_old: the full-prefix weights have ESS {w.ess:.3g} of {w.n} sequences (per-token ratio "
                      f"up to {w.max_ratio:.3g}, {w.outside_clip:.0%} of tokens outside the clip): the loss rests on a "
                      "few sequences and its variance is huge; weights='clip' keeps it bounded", stacklevel=3)


def _check_weights(weights, ratio_clip, min_ess):
    if weights not in KL_LOSS_WEIGHTS:
        raise ValueError(f"weights: unknown {weights!r}; allowed: {', '.join(KL_LOSS_WEIGHTS)}")
    if not ratio_clip > 0:
        raise ValueError(f"ratio_clip: must be > 0 (got {ratio_clip!r})")
    if not 0 <= min_ess <= 1:
        raise ValueError(f"min_ess: must be a fraction in [0, 1] (got {min_ess!r})")


def kl_loss(logp, logq, mask=None, *, token_kl=None, estimator: str = "rb", logp_old=None, baseline=None,
            weights: str = "clip", ratio_clip: float = RATIO_CLIP, min_ess: float = MIN_ESS_FRACTION):
    r"""One KL term per sequence whose value estimates KL(P_θ‖Q) and whose autograd gradient estimates
    ∇_θ KL(P_θ‖Q), for sequences drawn from P_θ (or from an older P, with ``logp_old``): without bias on-policy
    and with ``weights="full"``; with a stated, bounded bias with the default ``weights="clip"``.

    Parameters
    ----------
    logp : torch.Tensor, (..., T)
        log P_θ(x_t | x_<t) of the sampled tokens under the policy being trained, with its autograd graph.
    logq : torch.Tensor, (..., T)
        log Q(x_t | x_<t) under the reference (usually without gradient; with one, Q's gradient is right too).
    mask : torch.Tensor, (..., T), bool, optional
        False on padding and after EOS.
    token_kl : torch.Tensor, (..., T)
        The exact KL(P_t‖Q_t) at each step with its graph: ``token_logprobs_and_kl`` (one fused pass, cheapest) or
        ``exact_token_kl``. Needed by "rb".
    estimator : {"rb", "mc"}
        "rb": value Σ_t W_<t·K_t (= ``sequence_kl(..., "rb")``); gradient Σ_t W_<t·∇K_t + Σ_t ρ_t·(Σ_{s>t} W_<s·K_s),
        the exact per-step KL plus the score of each token times the exact KL still to come (Amini, Vieira &
        Cotterell 2025). "mc": value Σ_t W_≤t·f_t, f_t = log P/Q; gradient Σ_t ρ_t·Σ_{s≥t} W_≤s·f_s (the zero-mean
        pathwise Σ∇log P is dropped; a gradient of Q flows through −log Q).
    logp_old : torch.Tensor, (..., T), optional
        log-probabilities under the policy that drew the sequences (PPO's old policy; TRL's
        ``old_per_token_logps``). Without it (on-policy) every weight is 1.
    baseline : {None, "loo"}
        "loo": subtract from each return the mean of the other sequences' returns at that step (leave-one-out over
        axis −2, the batch; at least 2 sequences). Unbiased, since another sequence's return is independent of this
        one's tokens; it changes the gradient's variance, never the value.
    weights : {"clip", "full"}
        How ``logp_old`` enters. "clip" (default, for trainers): each token's own ratio r_t = P_θ/P_old, detached
        and clipped to [1 − ratio_clip, 1 + ratio_clip], multiplies its score term, and prefix weights are
        truncated to 1: gradient Σ_t ∇K_t + Σ_t c_t·ρ_t·Σ_{s>t} K_s ("rb"), value Σ_t K_t. Bounded whatever the
        drift, exact on-policy, biased off-policy (the prefix distribution's shift is ignored; docs/training.md
        measures it). "full": W_<t = Π_{s<t} r_s, which makes value and gradient unbiased at the current θ but
        whose variance grows with the drift over the sequence; it warns when the batch's sequence weights have an
        ESS below ``min_ess`` × their number.
    ratio_clip : float
        ε of "clip" (0.2, PPO's); ``math.inf`` keeps the per-token ratio unclipped.
    min_ess : float
        The ESS fraction below which "full" warns (0.5).

    Returns
    -------
    torch.Tensor, (...,)
        One term per sequence; ``beta * kl_loss(...).mean()`` is the penalty. Divide by a constant if you want
        a per-token scale: dividing each sequence by its own length changes the objective.

    Notes
    -----
    ρ_t = log P_θ(x_t) − stopgrad(log P_θ(x_t)) is 0 in value, so the score terms change the gradient only. Under
    the per-token losses of the RL libraries (k3 or k1 summed, ``sequence_kl`` differentiated) the score terms are
    missing and the gradient is that of another objective: see docs/training.md and ``kl_estimation.audit`` for
    which. ``offpolicy_weights`` gives the weights' ESS, ratio range and share outside the clip, for logging.
    """
    import torch

    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}")
    if baseline not in KL_LOSS_BASELINES:
        raise ValueError(f"baseline: unknown {baseline if isinstance(baseline, str) else type(baseline).__name__!r}; "
                         "allowed: None, loo")
    _check_weights(weights, ratio_clip, min_ess)
    if estimator == "rb" and token_kl is None:
        raise ValueError("token_kl: estimator 'rb' needs the exact per-token KL (token_logprobs_and_kl or "
                         "exact_token_kl)")
    m, lp, lq, kl, old = _loss_inputs("kl_loss", logp, logq, mask, token_kl, logp_old)
    if baseline == "loo" and (lp.ndim < 2 or lp.shape[-2] < 2):
        raise ValueError(f"logp: baseline 'loo' needs at least 2 sequences on axis -2 (got shape {tuple(lp.shape)})")
    score = lp - lp.detach()
    v = kl.detach() if estimator == "rb" else (lp - lq).detach()
    inclusive = estimator == "mc"
    if old is None or weights == "clip":
        # per-token weights c_t (1 on-policy); the prefix's weight is truncated to 1
        c = 1.0 if old is None else torch.exp(lp.detach() - old).clamp(max(0.0, 1 - ratio_clip), 1 + ratio_clip)
        per_step = kl if estimator == "rb" else c * (lp.detach() - lq)
        to_go = _future(v, inclusive)
        if baseline == "loo":
            to_go = to_go - _leave_one_out(torch.where(m, to_go, torch.zeros_like(to_go)), m)
        return per_step.sum(-1) + (score * c * to_go).sum(-1)
    _warn_if_degenerate(offpolicy_weights(lp, old, m), min_ess)
    # log prefix weights W_≤t (inclusive) and W_<t (exclusive)
    log_wi = torch.cumsum(lp.detach() - old, -1)
    log_wx = log_wi - (lp.detach() - old)
    log_w = log_wi if inclusive else log_wx
    per_step = torch.exp(log_wx) * kl if estimator == "rb" else torch.exp(log_wi) * (lp.detach() - lq)
    to_go = _future(torch.exp(log_w) * v, inclusive)
    if baseline == "loo":
        # the return relative to this step's own weight, so that W_≤t·b is a valid (mean-zero) control
        rel = _future_relative(log_w, v, log_wi, inclusive)
        to_go = to_go - torch.exp(log_wi) * _leave_one_out(torch.where(m, rel, torch.zeros_like(rel)), m)
    return per_step.sum(-1) + (score * to_go).sum(-1)


class KLRewards(NamedTuple):
    """Per-token KL penalties for a policy-gradient trainer, and the pathwise loss term that goes with them."""

    rewards: Any  # torch.Tensor (..., T), detached: subtract β·rewards from the per-token reward
    pathwise: Any  # torch.Tensor (...,), with gradient: add β·pathwise.mean() to the loss


KL_REWARD_ESTIMATORS = ("mc", "rb")


def kl_rewards(logp, logq, mask=None, *, token_kl=None, estimator: str = "rb", logp_old=None,
               weights: str = "clip", min_ess: float = MIN_ESS_FRACTION) -> KLRewards:
    r"""KL penalties shaped as per-token rewards for PPO/REINFORCE-style trainers, with the loss term they need.

    Parameters
    ----------
    logp, logq, mask, token_kl
        As for ``kl_loss`` (at the policy that generated the sequences: rewards are computed at rollout).
    estimator : {"rb", "mc"}
        "mc": rewards f_t = log P/Q(x_t) (k1); pathwise Σ_t (stopgrad(log P) − log Q), which has no gradient
        for P. "rb": rewards K_{t+1} = KL(P_{t+1}‖Q_{t+1} | x_≤t), the exact KL of the *next* step, which x_t
        decides (0 at the last step and at padding); pathwise Σ_t K_t with its gradient. K_1 depends on the prompt
        alone, so no token is credited with it: rewards.sum(-1) + K_1 is the RB value.
    logp_old, weights, min_ess
        For the pathwise term in later PPO epochs (``logp`` at the current θ, ``logp_old`` the rollout's): "clip"
        (default) leaves it Σ_t K_t; "full" weights it by the detached prefix weights, Σ_t W_<t·K_t, and warns as
        ``kl_loss`` does when their ESS is low. Neither repairs the stale rewards (Notes).

    Returns
    -------
    KLRewards(rewards, pathwise)
        Use both: reward_t ← reward_t − β·rewards_t, and loss ← loss + β·pathwise.mean(). The policy-gradient
        part then contributes E[Σ_t ∇log P(x_t)·Σ_{s≥t} rewards_s] (γ = 1, Monte-Carlo return, any baseline of the
        prefix), and with the pathwise part the expected gradient is exactly ∇_θ KL(P_θ‖Q) on-policy. For "mc" the
        pathwise term only matters when Q is trained; for "rb" it is half of the gradient: K_t as a reward without
        it (or the per-step KL as a loss without the reward) is biased.

    Notes
    -----
    Crediting K_t to x_t instead (the exact KL of the step as that step's reward) has the same expectation, since
    K_t is fixed before x_t is drawn, but adds ∇log P(x_t)·K_t noise: six times the variance in the tests' chain.
    Exact for on-policy gradients (PPO's first epoch, ratio 1). Later PPO epochs reuse the rollout's rewards under
    the per-token ratio, as they do for the task reward: an approximation this function does not repair; use
    ``kl_loss(..., logp_old=..., weights="full")`` for an unbiased off-policy KL gradient. A discount γ < 1 or a
    learned critic (GAE λ < 1) bias the KL part as they bias the rest of the return.
    """
    if estimator not in KL_REWARD_ESTIMATORS:
        raise ValueError(f"estimator: unknown {estimator!r}; allowed: {', '.join(KL_REWARD_ESTIMATORS)}")
    if estimator == "rb" and token_kl is None:
        raise ValueError("token_kl: estimator 'rb' needs the exact per-token KL (token_logprobs_and_kl or "
                         "exact_token_kl)")
    import torch

    _check_weights(weights, RATIO_CLIP, min_ess)
    m, lp, lq, kl, old = _loss_inputs("kl_rewards", logp, logq, mask, token_kl, logp_old)
    if estimator == "rb":
        nxt = torch.cat([kl[..., 1:], torch.zeros_like(kl[..., :1])], -1).detach()
        if old is None or weights == "clip":
            return KLRewards(nxt, kl.sum(-1))
        _warn_if_degenerate(offpolicy_weights(lp, old, m), min_ess)
        log_r = lp.detach() - old
        return KLRewards(nxt, (torch.exp(torch.cumsum(log_r, -1) - log_r) * kl).sum(-1))
    return KLRewards((lp - lq).detach(), (lp.detach() - lq).sum(-1))
