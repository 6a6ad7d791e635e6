r"""Exact values, metrics and rankings: holding estimates against the truth.

For a method that draws x ~ r and averages a per-sample term g(x), its mean and per-sample variance are exact sums
over the vocabulary: E[g] = Σ r·g and Var[g] = Σ r·(g − E[g])² (the centred form avoids cancellation when the
variance is tiny). Special cases: naive MC Var_P[f] = Σ P f² − KL² (the "theoretical variance"), IS
Σ P² f²/r − KL², sum-and-sample RB the tail part (1 − P_K)·Σ_tail P f² − (Σ_tail P f)².

A method without an exact value (exact_mean / exact_variance None: the prefix-aware sequence proposals) is judged
by its empirical numbers alone and ranks last by exact variance.

A method is *flagged* (never ranked above an unflagged one) when
* it is biased (its exact mean differs from the exact KL: Schulman's k2), or
* its sample variance is more than ``DEGENERATE_RATIO``× below its exact variance — its weights degenerated: the
  rare huge weights that carry the variance were never drawn, so the sample looks calm while the estimator is not, or
* it has no exact variance (prefix-aware sequence proposals) and its mean Pareto k̂ exceeds 0.7.

Where the exact variance is known it decides, not k̂: a single-token proposal with bounded weights (Optimal,
Alpha-mixture α=0.9: exact variance 0.06–0.13× naive MC) draws the same few tokens again and again, and a tail fit to
those tied weights says nothing about a variance that is known exactly. The degeneracy check above already catches
the proposals whose calm sample hides a large exact variance.
"""
from __future__ import annotations

import math

import numpy as np

from kl_estimation.core.diagnostics import KHAT_LIMIT

DEGENERATE_RATIO = 10.0
COMBINED_WEIGHTS = (0.7, 0.3)  # the seed's score: 0.7·|error|/KL + 0.3·variance/theoretical variance


def exact_kl(P: np.ndarray, Q: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(P‖Q) = Σ P log(P/Q) in log space; 0·log 0 = 0; inf where Q = 0 < P (equals scipy.stats.entropy(P, Q))."""
    P, Q = np.asarray(P, dtype=np.float64), np.asarray(Q, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(P > 0, P * (np.log(P) - np.log(Q)), 0.0)
    return terms.sum(axis=axis)


def exact_moments(r: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(E_r[g], Var_r[g]) over the support of r."""
    support = r > 0
    r, g = r[support], g[support]
    mean = float(np.sum(r * g))
    return mean, float(np.sum(r * np.square(g - mean)))


def _mean(values) -> float | None:
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(vals.mean()) if vals.size else None


def method_metrics(m: dict, true_kl: float, theoretical_variance: float, naive_empirical_variance: float) -> dict:
    """Add the across-repeat metrics and flags to one method entry (keys as written to results.json)."""
    est = np.asarray(m["estimates"])
    err = np.abs(est - true_kl)
    emp_var = float(np.mean(m["sample_variances"]))
    exact_var = m["exact_variance"]
    out = dict(m)
    out.update(
        mean_estimate=float(est.mean()),
        bias=float(est.mean() - true_kl),
        mse=float(np.mean((est - true_kl) ** 2)),
        abs_error=float(err.mean()),
        rel_error_pct=float(100 * err.mean() / true_kl) if true_kl > 0 else None,
        empirical_variance=emp_var,
        variance_reduction_exact_pct=(100 * (1 - exact_var / theoretical_variance)
                                      if exact_var is not None and theoretical_variance > 0 else None),
        variance_reduction_empirical_pct=(100 * (1 - emp_var / naive_empirical_variance)
                                          if naive_empirical_variance > 0 else None),
        combined_score=(COMBINED_WEIGHTS[0] * err.mean() / true_kl
                        + COMBINED_WEIGHTS[1] * emp_var / theoretical_variance
                        if true_kl > 0 and theoretical_variance > 0 else None),
        mean_khat=_mean(m["khat"]),
        mean_ess_pct=_mean(m["ess_pct"]),
    )
    flags = []
    if m["exact_mean"] is not None and abs(m["exact_mean"] - true_kl) > 1e-9 * max(1.0, abs(true_kl)):
        flags.append(f"biased: exact mean {m['exact_mean']:.4g} vs KL {true_kl:.4g}")
    if exact_var == math.inf:
        flags.append("exact variance beyond float64 (> 1e308): weights degenerate")
    elif exact_var is not None and exact_var > DEGENERATE_RATIO * max(emp_var, 1e-300):
        ratio = exact_var / emp_var if emp_var > 0 else math.inf
        flags.append(f"degenerate weights: sample variance {ratio:.2g}x below exact")
    if exact_var is None and out["mean_khat"] is not None and out["mean_khat"] > KHAT_LIMIT:
        flags.append(f"Pareto k̂ {out['mean_khat']:.2f} > {KHAT_LIMIT}")
    out["flags"] = flags
    return out


RANKING_KEYS = {
    "by_accuracy": "abs_error",
    "by_variance": "empirical_variance",
    "by_exact_variance": "exact_variance",
    "by_combined": "combined_score",
}


def rankings(methods: list[dict]) -> dict[str, list[str]]:
    """Method names best first for each ranking; flagged methods always come after every unflagged one.

    by_exact_variance is the noise-free ranking; there only bias demotes (a degenerate method's exact variance
    already puts it where it belongs).
    """
    def key(field, m):
        v = m[field]
        demoted = bool(m["flags"]) if field != "exact_variance" else any(f.startswith("biased") for f in m["flags"])
        return (demoted, math.inf if v is None or not np.isfinite(v) else v)

    return {rank: [m["name"] for m in sorted(methods, key=lambda m: key(field, m))]
            for rank, field in RANKING_KEYS.items()}
