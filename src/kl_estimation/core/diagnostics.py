r"""Weight diagnostics: is an estimate drawn from a proposal trustworthy, judged from its own samples alone?

Every function takes arrays whose last axis (or last two, for per-step arrays (N, T)) are the draws, and works
vectorised over any leading axes (repeats, proposals, prompts).

* Kish ESS = (Σw)² / Σw², computed as exp(2·logsumexp(lw) − logsumexp(2·lw)).
* **Mean identities** (the diagnostics that catch a degenerate proposal). For a proposal r that covers P, every weight
  has mean one: E_r[W] = 1 for the sequence weight W = P(x)/r(x) and for every prefix weight W_<t (a martingale
  under r; after EOS it stays at the sequence's W), and E_r[W·Q/P] = E_r[Q/r] = 1 when r covers Q (E_P[Q/P] = 1 for
  r = P) — what k3 needs. When the heavy weights were never drawn the sample mean of W falls far below one while
  its own standard error stays small: the sample looks calm, the estimate is wrong, and nothing else shows it (the
  issue's Exponential family β=5 runs: ESS 78–100 %, k̂ NaN or small). ``mean_one_test`` reports the sample mean
  and its z-score (mean − 1)/SE; ``prefix_weight_test`` the worst over prefixes.
* **Distinct draws** (``distinct_draws``): the number of distinct sequences among the draws and the share of the
  draws that are the most frequent one. When (nearly) every draw is the same sequence, the sample variance says
  nothing about the variance of the estimator: the SE is not informative (never a zero-width interval).
* **Top weight share**: the largest weight's share of Σw — one draw carrying the estimate.
* **Pareto k̂** (Vehtari, Simpson, Gelman, Yao & Gabry, "Pareto smoothed importance sampling", JMLR 2024): fit a
  generalised Pareto distribution to the exceedances of the M = ⌈min(0.2·S, 3√S)⌉ largest weights over the
  (M+1)-th largest, with the profile-likelihood / empirical-Bayes estimator of Zhang & Stephens (2009) and the same
  weakly informative prior on k (10 pseudo-observations at k = 0.5) as the reference implementations. k̂ < 0.5:
  finite variance; 0.5–0.7: usable, slowly converging; > 0.7: the IS estimate cannot be trusted.

  *Ties.* At low temperature or with early EOS the same few sequences are drawn again and again, so the largest
  weights tie. The fit here survives that: weights tied with the threshold are not exceedances (they are left out
  of the likelihood, which is then over the n ≤ M positive exceedances), tied exceedances are repeated observations
  (a GPD likelihood takes them as they are), and the grid's scale uses the lower quartile of the positive
  exceedances. k̂ is NaN when ties leave no tail to fit: fewer than 5 positive exceedances, or fewer than
  max(5, M/4) distinct values among them (a GPD fitted to a handful of atoms returns anything from −4 to 10) — there
  the distinct-draw count and the mean identities replace it, and in the single-token experiments the exact
  variance does.
  *Why not ArviZ.* arviz-stats 0.8 (light: numpy + scipy only) ships the same Zhang–Stephens fit
  (``array_stats.psislw``), looped in Python per slice, and on tied tails it raises ("All tail values are the same")
  or divides by a lower quartile of 0 and returns its prior's 0.5 — it does not survive ties, so we keep ours.
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

KHAT_LIMIT = 0.7
IDENTITY_Z = 3.0  # a mean identity off by more than this many of its own SEs fails
IDENTITY_FLOOR = 0.5  # ... and so does a sample mean of the weights below this, however wide its SE
IDENTITY_TOL = 1e-5  # float32 log-softmax: a mean this close to 1 passes whatever its SE (rounding over T steps)
MIN_OTHER_DRAWS = 10  # fewer draws than this differ from the most frequent sequence: the SE is not informative
MIN_DISTINCT = 10  # ... nor is it from fewer distinct sequences than this (it measures the spread among those few)
TOP_SHARE_LIMIT = 0.5  # the largest weight holds more than this share of Σw: the estimate rests on one draw


def kish_ess(log_w: np.ndarray, axis: int = -1) -> np.ndarray:
    """(Σw)²/Σw² — the number of equally weighted draws the weighted sample is worth."""
    log_w = np.asarray(log_w, dtype=np.float64)
    w = np.exp(log_w - log_w.max(axis=axis, keepdims=True))  # the scale cancels in the ratio
    return np.square(w.sum(axis=axis)) / np.square(w).sum(axis=axis)


def mean_one_test(log_x: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean of x = exp(log_x) along `axis` and its z-score (mean − 1)/SE against a true mean of one.

    Computed in log space (weights of 1e300 do not overflow). z is 0 where the mean is within IDENTITY_TOL of 1
    (all weights 1, or float32 rounding), ±inf where the SE is 0 and the mean is not 1 (every draw the same).
    """
    lx = np.moveaxis(np.asarray(log_x, dtype=np.float64), axis, -1)
    n = lx.shape[-1]
    m = np.max(lx, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    x = np.exp(lx - m)  # scaled by e^-m
    with np.errstate(over="ignore", invalid="ignore"):
        scale = np.exp(m[..., 0])
        mean = x.mean(-1) * scale
        se = x.std(-1, ddof=1) * scale / np.sqrt(n) if n > 1 else np.zeros_like(mean)
        dev = mean - 1
        z = np.where(np.abs(dev) <= IDENTITY_TOL, 0.0,
                     np.where(se > 0, dev / np.where(se > 0, se, 1.0), np.sign(dev) * np.inf))
    return mean, np.where(np.isnan(z), np.inf, z)


def prefix_weight_test(log_w_step: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean identity for every prefix weight W_≤t = Π_{s≤t} P/r (t = 1..T; the last is the sequence weight).

    `log_w_step` (..., N, T): log P/r of each drawn token, 0 (or masked) after EOS. Returns (mean, z) at the step
    whose z-score is worst (largest |z|; ties → the earliest), over the leading axes.
    """
    lw = np.asarray(log_w_step, dtype=np.float64)
    if mask is not None:
        lw = np.where(mask, lw, 0.0)
    means, z = mean_one_test(np.cumsum(lw, axis=-1), axis=-2)  # (..., T)
    worst = np.argmax(np.abs(z), axis=-1)[..., None]
    return np.take_along_axis(means, worst, -1)[..., 0], np.take_along_axis(z, worst, -1)[..., 0]


def identity_failure(mean, z) -> np.ndarray:
    """True where a mean identity fails: off by more than IDENTITY_Z SEs, or far below one."""
    mean, z = np.asarray(mean, dtype=np.float64), np.asarray(z, dtype=np.float64)
    return (np.abs(z) > IDENTITY_Z) | (mean < IDENTITY_FLOOR) | ~np.isfinite(mean)


def distinct_draws(values: np.ndarray, decimals: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(number of distinct rows, share of the rows equal to the most frequent one) over the draws axis (-2).

    `values` (..., N, T): per-step values that identify a sequence (its log P at each step, 0 after EOS). Rows are
    rounded to `decimals` (batched forward passes differ in the last float32 bits) and hashed by a fixed random
    projection, so the count is exact with probability one and vectorised over the leading axes.
    """
    v = np.round(np.asarray(values, dtype=np.float64), decimals)
    proj = np.random.default_rng(12345).standard_normal(v.shape[-1])
    h = np.sort(v @ proj, axis=-1)  # (..., N)
    new = np.diff(h, axis=-1) != 0
    n_distinct = 1 + new.sum(-1)
    # run lengths of the sorted hashes: the largest is the modal sequence's count
    n = h.shape[-1]
    idx = np.broadcast_to(np.arange(1, n), new.shape)
    starts = np.concatenate([np.zeros(new.shape[:-1] + (1,), int), np.where(new, idx, 0)], axis=-1)
    starts = np.maximum.accumulate(starts, axis=-1)  # start index of each element's run
    run_len = np.arange(n) - starts + 1
    return n_distinct, run_len.max(-1) / n


def top_weight_share(log_w: np.ndarray, axis: int = -1) -> np.ndarray:
    """The largest weight's share of Σw."""
    lw = np.asarray(log_w, dtype=np.float64)
    return np.exp(lw.max(axis=axis) - logsumexp(lw, axis=axis))


def gpd_fit(x: np.ndarray, prior_k: float = 10.0, prior_bs: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Zhang–Stephens GPD fit over the last axis of `x` (exceedances, sorted ascending, ≥ 0). Returns (k, σ).

    Zeros are ties with the threshold, not observations: the likelihood runs over the n positive entries (log1p(0)
    adds 0 to every sum; the means divide by n)."""
    n_all = x.shape[-1]
    n = (x > 0).sum(axis=-1, keepdims=True)
    m = 30 + int(np.sqrt(n_all))
    b = 1 - np.sqrt(m / (np.arange(1, m + 1) - 0.5))  # (m,)
    quartile = np.take_along_axis(x, n_all - n + np.maximum((n / 4 + 0.5).astype(int), 1) - 1, axis=-1)
    b = b / (prior_bs * quartile) + 1 / x[..., -1, None]  # (..., m)
    k = np.log1p(-b[..., :, None] * x[..., None, :]).sum(axis=-1) / n  # (..., m)
    profile = n * (np.log(-b / k) - k - 1)
    weights = softmax(profile, axis=-1)
    weights = np.where(weights >= 10 * np.finfo(float).eps, weights, 0.0)
    b_post = (b * weights).sum(axis=-1) / weights.sum(axis=-1)
    k_post = np.log1p(-b_post[..., None] * x).sum(axis=-1) / n[..., 0]
    sigma = -k_post / b_post
    return (n[..., 0] * k_post + prior_k * 0.5) / (n[..., 0] + prior_k), sigma


def pareto_khat(log_w: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pareto k̂ of the weights exp(log_w) along `axis` (NaN where there is no tail: see the module doc)."""
    lw = np.moveaxis(np.asarray(log_w, dtype=np.float64), axis, -1)
    S = lw.shape[-1]
    M = int(np.ceil(min(0.2 * S, 3 * np.sqrt(S))))
    if M < 5:
        return np.full(lw.shape[:-1], np.nan)
    top = np.sort(np.partition(lw, S - M - 1, axis=-1)[..., S - M - 1:], axis=-1)  # threshold + M largest
    lw_max = top[..., -1:]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        x = np.exp(top[..., 1:] - lw_max) - np.exp(top[..., :1] - lw_max)
        pos = x > 0  # ties with the threshold (and exceedances below float64's resolution) are not in the tail
        distinct = (np.diff(np.where(pos, top[..., 1:], -np.inf), axis=-1) > 0).sum(axis=-1) + 1 - (~pos).any(-1)
        flat = (pos.sum(-1) < 5) | (distinct < max(5, M / 4)) | ~np.isfinite(lw_max[..., 0])
        x = np.where(flat[..., None], np.linspace(0.1, 1, M), np.where(pos, x, 0.0))  # placeholders, masked below
        k, _ = gpd_fit(x)
    return np.where(flat, np.nan, k)
