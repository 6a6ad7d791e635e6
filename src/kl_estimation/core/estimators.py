r"""KL estimators as small pure functions over per-sample arrays (numpy), shared by the synthetic and LLM halves.

Notation: f(x) = log P(x)/Q(x) is the log-ratio of a sample, log w(x) = log P(x)/r(x) its log importance weight when
x ~ r. Each ``*_terms`` function returns one unbiased term per sample; the estimate is their mean, computed with
``mean_estimate`` along an axis (so repeats, proposals or batches are leading axes).

=====================  =============================================  ==========================================
estimator              per-sample term                                 mean
=====================  =============================================  ==========================================
naive MC (= k1)        f(x),  x ~ P                                    KL(P‖Q)
importance sampling    w(x)·f(x),  x ~ r                               KL(P‖Q) if r > 0 wherever P·f ≠ 0
Schulman k2            f²/2,  x ~ P                                    ½E_P[f²] — biased, a reference row only
Schulman k3            (Q/P − 1) − log(Q/P) = e^{−f} − 1 + f ≥ 0        KL − Q(P = 0): unbiased when supp Q ⊆ supp P
Rao-Blackwell (RB)     Σ_{i∈K} P_i f_i + P(K^c)·f(x),  x ~ P(·|K^c)     KL(P‖Q): the top-k set K is summed exactly
sequence RB            Σ_t KL(P_t‖Q_t | x_<t),  x ~ P                  KL of the sequence process
sequence RB-IS         Σ_t w_<t(x)·KL(P_t‖Q_t | x_<t),  x ~ r           same; w_<t = Π_{s<t} P/r
=====================  =============================================  ==========================================

Self-normalised IS (``self_normalized_is``) is Σwf/Σw: biased at O(1/n), but it needs P and r only up to constants and
often has lower error when weights are heavy; its variance is the delta-method one, Σw²(f − est)²/(Σw)² · n.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy.special import softmax

from kl_estimation.core.kinds import Estimator
from kl_estimation.core.xp import array_namespace


@dataclass(frozen=True)
class Estimate:
    """An estimate with the per-sample variance behind it and its standard error (arrays over leading axes)."""

    estimate: np.ndarray
    variance: np.ndarray  # per-sample variance (ddof=1); Var(estimate) ≈ variance / n
    std_error: np.ndarray
    n: int


def mean_estimate(terms: np.ndarray, axis: int = -1) -> Estimate:
    """The mean of per-sample terms along `axis`, with the per-sample variance (ddof=1) and standard error."""
    terms = np.asarray(terms, dtype=np.float64)
    n = terms.shape[axis]
    var = terms.var(axis=axis, ddof=1) if n > 1 else np.full(np.mean(terms, axis=axis).shape, np.nan)
    return Estimate(terms.mean(axis=axis), var, np.sqrt(var / n), n)


def _arrays(*xs):
    """numpy arrays (float64) or torch tensors (dtype and device kept, so autograd and GPUs work) and their
    namespace; lists and scalars become numpy float64."""
    if any(type(x).__module__.startswith("torch") for x in xs):
        import torch

        ref = next(x for x in xs if isinstance(x, torch.Tensor))
        xs = [x if isinstance(x, torch.Tensor) else torch.as_tensor(x, device=ref.device) for x in xs]
        dt = torch.promote_types(torch.float32, ref.dtype if ref.is_floating_point() else torch.float32)
        xs = [x if x.dtype == torch.bool else x.to(dt) for x in xs]
    else:
        xs = [np.asarray(x, dtype=bool if np.asarray(x).dtype == bool else np.float64) for x in xs]
    return (array_namespace(*xs), *xs)


def _masked(xp, mask, *xs):
    if mask is None:
        return xs
    return tuple(xp.where(mask, x, xp.zeros_like(x)) for x in xs)


def naive_mc_terms(log_ratio):
    """k1: the log-ratio itself, for x ~ P."""
    return _arrays(log_ratio)[1]


def importance_sampling_terms(log_ratio, log_weight):
    """w·f for x ~ r, w = P/r given as log_weight: unbiased for KL(P‖Q) when r > 0 wherever P·f ≠ 0."""
    xp, f, lw = _arrays(log_ratio, log_weight)
    return xp.exp(lw) * f


def k2_terms(log_ratio):
    """Schulman's k2, f²/2 for x ~ P: biased (its mean is ½E_P[f²]); a reference row only."""
    f = _arrays(log_ratio)[1]
    return 0.5 * f * f


def k3_terms(log_ratio):
    """Schulman's k3, (Q/P − 1) − log(Q/P) = e^{−f} − 1 + f ≥ 0 for x ~ P: unbiased when supp Q ⊆ supp P."""
    xp, f = _arrays(log_ratio)
    return xp.expm1(-f) + f


def rao_blackwell_terms(head_kl: float, tail_mass: float, log_ratio_tail):
    """Sum-and-sample: the exact head sum plus the tail's mass times f at a draw from P restricted to the tail."""
    return head_kl + tail_mass * _arrays(log_ratio_tail)[1]


def _prefix_weights(xp, lw):
    """W_<t = Π_{s<t} w_s along the last axis (W_<1 = 1), from per-step log-weights."""
    return xp.exp(xp.cumulative_sum(lw, axis=-1) - lw)  # exclusive prefix sum


def rao_blackwell_is_terms(kl_step, log_weight_step, mask=None):
    """Σ_t w_<t·KL_t over the last axis; `log_weight_step` holds log P/r of each sampled token (w_<1 = 1).

    With r = P every weight is 1 and this is sequence RB. `mask` (same shape) zeroes steps after EOS.
    """
    xp, kl_step, lw, *m = _arrays(kl_step, log_weight_step, *(() if mask is None else (mask,)))
    kl_step, lw = _masked(xp, m[0] if m else None, kl_step, lw)
    return xp.sum(_prefix_weights(xp, lw) * kl_step, axis=-1)


def self_normalized_is(log_ratio, log_weight, axis: int = -1) -> Estimate:
    """Σw·f/Σw along `axis` with its delta-method variance: consistent, biased at O(1/n)."""
    log_weight = np.asarray(log_weight, dtype=np.float64)
    f = np.asarray(log_ratio, dtype=np.float64)
    w = softmax(log_weight, axis=axis)  # normalised weights, stable for huge log-weights
    est = (w * f).sum(axis=axis)
    n = f.shape[axis]
    var = n * (w ** 2 * (f - np.expand_dims(est, axis)) ** 2).sum(axis=axis)
    if n < 2:  # one draw has no spread to measure: no SE (as mean_estimate), not a zero-width interval
        var = np.full(np.shape(est), np.nan)
    return Estimate(est, var, np.sqrt(var / n), n)


Z95 = 1.959963984540054


def t_quantile(dof: int, confidence: float = 0.95) -> float:
    """Half-width factor of a two-sided `confidence` interval from an SE with `dof` degrees of freedom (Student t;
    NaN without any)."""
    return _t_quantile(int(dof), float(confidence)) if dof >= 1 else math.nan


@functools.lru_cache(maxsize=4096)
def _t_quantile(dof: int, confidence: float) -> float:  # ~0.1 ms a call; a run asks for a few dofs often
    from scipy.special import stdtrit  # what scipy.stats.t.ppf computes, without importing scipy.stats (~1 s)

    return float(stdtrit(dof, 0.5 + confidence / 2))


def t95(dof: int) -> float:
    """t_quantile at 95 %."""
    return t_quantile(dof)


def clustered_se(values, groups, center: float) -> float:
    """Cluster-robust (CR1) standard error of the mean of `values` around `center` (their mean, or 0 for terms
    that are already centred): √(G/(G−1)·Σ_g (S_g − n_g·center)²) / N over the G clusters' sums S_g and sizes n_g.
    `groups`: each value's cluster as 0 … G−1 (np.unique's inverse). NaN with fewer than 2 clusters."""
    G = int(groups.max()) + 1
    if G < 2:
        return math.nan
    sums, sizes = np.bincount(groups, values, G), np.bincount(groups, minlength=G)
    return math.sqrt(G / (G - 1) * float(np.sum((sums - sizes * center) ** 2))) / values.size


def rb_control_variate_terms(kl_step, log_ratio_step, log_weight_step, mask=None, folds: int = 2, fold=None):
    """RB(-IS) plus a fitted multiple of a mean-zero control, cross-fitted so that it stays unbiased.

    a = Σ_t W_<t·K_t (the RB-IS term) and d = Σ_t W_<t·(w_t·f_t − K_t): given the prefix, w_t·f_t has mean K_t, so
    every bracket, and d, has mean zero, and a + β·d is unbiased for any fixed β. With r = P (all w = 1) this is
    Σ_t [K_t + β·(f_t − K_t)], between RB (β = 0) and MC (β = 1). β = −Cov(a, d)/Var(d) is fitted on the other
    folds of the sequences and applied to this one: a β fitted on the same draws it weights would correlate with
    them and bias the estimate. Works over leading axes (repeats); the last axis of the per-step arrays is T, the
    one before it the sequences. numpy or torch (β is treated as a constant: no gradient flows through it).
    `fold` (one integer < folds per sequence) overrides the default i mod folds: dependent sequences (one
    randomization of a stratified sampler) must share a fold.
    """
    xp, kl_step, f, lw, *m = _arrays(kl_step, log_ratio_step, log_weight_step,
                                     *(() if mask is None else (mask,)))
    kl_step, f, lw = _masked(xp, m[0] if m else None, kl_step, f, lw)
    w_prefix = _prefix_weights(xp, lw)
    a = xp.sum(w_prefix * kl_step, axis=-1)
    d = xp.sum(w_prefix * (xp.exp(lw) * f - kl_step), axis=-1)
    n = a.shape[-1]
    fold = np.arange(n) % folds if fold is None else np.asarray(fold)
    out = xp.zeros_like(a)
    for k in range(folds):  # a loop over folds (2), not samples
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        if test.size == 0:
            continue
        if train.size == 0:  # nothing to fit β on (n = 1): β = 0, the RB(-IS) term itself
            out[..., _index(xp, test, a)] = xp.take(a, _index(xp, test, a), axis=-1)
            continue
        at, dt = xp.take(a, _index(xp, train, a), axis=-1), xp.take(d, _index(xp, train, a), axis=-1)
        ac = at - xp.mean(at, axis=-1, keepdims=True)
        dc = dt - xp.mean(dt, axis=-1, keepdims=True)
        var_d = xp.mean(dc * dc, axis=-1, keepdims=True)
        safe = xp.where(var_d > 0, var_d, xp.ones_like(var_d))
        beta = xp.where(var_d > 0, -xp.mean(ac * dc, axis=-1, keepdims=True) / safe, xp.zeros_like(var_d))
        if hasattr(beta, "detach"):
            beta = beta.detach()
        idx = _index(xp, test, a)
        out[..., idx] = xp.take(a, idx, axis=-1) + beta * xp.take(d, idx, axis=-1)
    return out


def _index(xp, idx: np.ndarray, like):
    """Integer positions as an index array of like's kind (and device)."""
    return idx if isinstance(like, np.ndarray) else xp.asarray(idx, device=like.device)


def sequence_estimates(log_p, log_q, log_r, kl_step, mask, proposal_is_p: bool) -> dict[str, dict]:
    """Every estimator from one set of sequences drawn from a proposal: arrays (..., N, T) of per-step values at
    the sampled tokens (leading axes: independent repeats), `kl_step` the exact KL(P_t‖Q_t) of each step, `mask`
    False after EOS.

    Names: with r = P, "MC", "SNIS" (identical to MC, weights are 1), "RB", "RB+CV" and "k3"; otherwise "IS",
    "SNIS", "RB-IS", "RB-IS+CV" and "k3-IS" (k3 of the sequence log-ratio, importance weighted). Each entry:
    estimate, std_error, variance (per sequence), ess (Kish, in sequences), max_weight, khat (Pareto k̂ of the
    sequence weights) and a normal 95 % confidence interval — floats, or lists over the leading axes — plus the
    proposal's degeneracy diagnostics (diagnostics.py), the same in every entry: weight_mean (sample mean of the
    sequence weight W, 1 in expectation), prefix_weight_mean / prefix_weight_z (the prefix weight W_≤t whose mean
    is furthest from 1 in its own SEs), q_over_r_mean / q_over_r_z (E_r[Q/r] = 1, what k3 relies on), n_distinct
    (distinct sequences drawn), modal_share (share of draws that are the most frequent sequence), top_weight_share
    (largest weight / Σw) and se_informative (False when fewer than MIN_OTHER_DRAWS draws differ from the most
    frequent sequence or fewer than MIN_DISTINCT sequences are distinct: the sample variance then measures the
    spread among a few sequences, not the estimator's, and the interval is NaN rather than zero-width).
    """
    from kl_estimation.core.diagnostics import (
        MIN_DISTINCT,
        MIN_OTHER_DRAWS,
        distinct_draws,
        kish_ess,
        mean_one_test,
        pareto_khat,
        prefix_weight_test,
        top_weight_share,
    )

    mask = np.asarray(mask, dtype=bool)
    f_step = np.where(mask, np.asarray(log_p) - np.asarray(log_q), 0.0)
    lw_step = np.where(mask, np.asarray(log_p) - np.asarray(log_r), 0.0)
    log_w, f = lw_step.sum(-1), f_step.sum(-1)
    ess = kish_ess(log_w)
    max_w = np.exp(log_w.max(-1))
    khat = pareto_khat(log_w) if not proposal_is_p else np.full(ess.shape, math.nan)
    w_mean = mean_one_test(log_w)[0]
    pw_mean, pw_z = prefix_weight_test(lw_step)
    qr_mean, qr_z = mean_one_test(log_w - f)  # Q/r of each sequence
    ident = np.concatenate([np.where(mask, log_p, 0.0), np.where(mask, log_q, 0.0), mask], axis=-1)
    n_distinct, modal = distinct_draws(ident)
    n = log_w.shape[-1]
    informative = ((1 - modal) * n >= MIN_OTHER_DRAWS) & (n_distinct >= MIN_DISTINCT)
    names = estimator_names(proposal_is_p)
    results = {
        names[0]: mean_estimate(importance_sampling_terms(f, log_w)),
        names[1]: self_normalized_is(f, log_w),
        names[2]: mean_estimate(rao_blackwell_is_terms(kl_step, lw_step, mask)),
        names[3]: mean_estimate(rb_control_variate_terms(kl_step, f_step, lw_step, mask)),
        names[4]: mean_estimate(importance_sampling_terms(k3_terms(f), log_w)),
    }

    def out(x):
        return np.asarray(x, dtype=np.float64).tolist()

    diag = dict(weight_mean=out(w_mean), prefix_weight_mean=out(pw_mean), prefix_weight_z=out(pw_z),
                q_over_r_mean=out(qr_mean), q_over_r_z=out(qr_z), n_distinct=np.asarray(n_distinct).tolist(),
                modal_share=out(modal), top_weight_share=out(top_weight_share(log_w)),
                se_informative=np.asarray(informative).tolist())
    half = np.where(informative, Z95, np.nan)
    return {name: dict(estimate=out(e.estimate), std_error=out(e.std_error), variance=out(e.variance),
                       ess=out(ess), max_weight=out(max_w), khat=out(khat), ci_low=out(e.estimate - half * e.std_error),
                       ci_high=out(e.estimate + half * e.std_error), n=e.n, **diag)
            for name, e in results.items()}


def estimator_names(proposal_is_p: bool) -> tuple[Estimator, ...]:
    """The estimators of one sample, in output order: MC, SNIS, RB, RB+CV, k3 from P; their weighted forms else."""
    E = Estimator
    return (E.MC, E.SNIS, E.RB, E.RB_CV, E.K3) if proposal_is_p else (E.IS, E.SNIS, E.RB_IS, E.RB_IS_CV, E.K3_IS)


SE_FROM_RANDOMIZATIONS = ("spread of the estimates over {r} independent randomizations (units; cluster-robust, "
                          "weighted by their sizes): the sequences of one randomization are dependent")


def randomization_estimates(log_p, log_q, log_r, kl_step, mask, proposal_is_p: bool, groups) -> dict[str, dict]:
    """sequence_estimates for sequences that are dependent within a randomization (stratified / quasi-random draws).

    Arrays (N, T) as for sequence_estimates; `groups` (N,) names each sequence's randomization (unit): different
    groups are independent, the sequences of one group are not. Each estimate is the mean over all N sequences (each
    is an exact draw, so it stays unbiased); its standard error comes from the spread between randomizations — the
    cluster-robust SE² = R/(R−1)·Σ_g (S_g − n_g·est)²/N² over the R groups' term sums S_g, which for equal sizes is
    the variance of the R per-group estimates over R — never from the spread of the N terms. The cross-fitted
    control variate fits β on other groups (folds by group), SNIS uses its linearised terms w·(f − est)/mean(w).
    ``variance`` is N·SE²: the per-sequence variance an i.i.d. sampler would need for the same SE. With R < 2 every
    SE is NaN. Each entry adds ``n_randomizations`` and ``std_error_method``.
    """
    base = sequence_estimates(log_p, log_q, log_r, kl_step, mask, proposal_is_p)
    _, groups = np.unique(np.asarray(groups), return_inverse=True)
    R, N = int(groups.max()) + 1, groups.size
    mask = np.asarray(mask, dtype=bool)
    f_step = np.where(mask, np.asarray(log_p) - np.asarray(log_q), 0.0)
    lw_step = np.where(mask, np.asarray(log_p) - np.asarray(log_r), 0.0)
    log_w, f = lw_step.sum(-1), f_step.sum(-1)
    names = estimator_names(proposal_is_p)
    w = np.exp(log_w)
    terms = {names[0]: importance_sampling_terms(f, log_w),
             names[2]: rao_blackwell_is_terms(kl_step, lw_step, mask),
             names[3]: (rb_control_variate_terms(kl_step, f_step, lw_step, mask, fold=groups % 2) if R >= 2
                        else np.full(N, np.nan)),
             names[4]: importance_sampling_terms(k3_terms(f), log_w)}
    snis = float(np.sum(w * f) / np.sum(w))
    terms[names[1]] = w * (f - snis) / w.mean()  # linearised: mean 0, the spread is the SE's

    out = {}
    half = t95(R - 1)  # an SE from R randomizations has R − 1 degrees of freedom: z = 1.96 covers 70 % at R = 2
    for name in names:
        est = snis if name == names[1] else float(np.mean(terms[name]))
        se = clustered_se(terms[name], groups, 0.0 if name == names[1] else est)
        out[name] = dict(base[name], estimate=est, std_error=se, variance=N * se * se, ci_low=est - half * se,
                         ci_high=est + half * se, n_randomizations=R,
                         std_error_method=SE_FROM_RANDOMIZATIONS.format(r=R))
    return out
