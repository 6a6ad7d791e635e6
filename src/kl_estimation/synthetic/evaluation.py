r"""Exact values, metrics and rankings: holding estimates against the truth.

For a method that draws x ~ r and averages a per-sample term g(x), its mean and per-sample variance are exact sums
over the vocabulary: E[g] = Σ r·g and Var[g] = Σ r·(g − E[g])² (the centred form avoids cancellation when the
variance is tiny). Special cases: naive MC Var_P[f] = Σ P f² − KL² (the "theoretical variance"), IS
Σ P² f²/r − KL², sum-and-sample RB the tail part (1 − P_K)·Σ_tail P f² − (Σ_tail P f)².

A method without an exact value (exact_mean / exact_variance None: the prefix-aware sequence proposals) is judged
by its empirical numbers alone and ranks last by exact variance.

A method is *flagged* (never ranked above an unflagged one) by the one trust policy of the package (verdicts):
the exact checks (verdicts.checks.exact_flags) — it is biased (its exact mean differs from the exact KL:
Schulman's k2), its exact variance is beyond float64, or its sample variance is more than ``DEGENERATE_RATIO``× below
its exact variance (its weights degenerated: the rare huge weights that carry the variance were never drawn, so the
sample looks calm while the estimator is not) — plus the flags the caller found in the draws (``sample_flags``: the
toy Markov rows go through verdicts.judge_repeats, the same checks as an LLM run), or, without either (a
prefix-aware row judged by its numbers alone), a mean Pareto k̂ above 0.7.

Where the exact variance is known it decides, not k̂: a single-token proposal with bounded weights (Optimal,
Alpha-mixture α=0.9: exact variance 0.06–0.13× naive MC) draws the same few tokens again and again, and a tail fit to
those tied weights says nothing about a variance that is known exactly. The degeneracy check above already catches
the proposals whose calm sample hides a large exact variance. The single-token rows keep no per-draw diagnostics
(weight means, distinct draws), so for them the exact checks are the whole verdict.
"""
from __future__ import annotations

import math

import numpy as np

from kl_estimation.core.exact import kl_from_probs
from kl_estimation.verdicts import DEGENERATE_RATIO, Code, Estimator, exact_flags, has, mean_khat_flag  # noqa: F401

COMBINED_WEIGHTS = (0.7, 0.3)  # the seed's score: 0.7·|error|/KL + 0.3·variance/theoretical variance


def exact_kl(P: np.ndarray, Q: np.ndarray, axis: int = -1) -> np.ndarray:
    """KL(P‖Q) = Σ P log(P/Q) (core.exact: log space, 0·log 0 = 0, inf where Q = 0 < P; equals
    scipy.stats.entropy(P, Q))."""
    return kl_from_probs(P, Q, axis=axis)


def exact_moments(r: np.ndarray, g: np.ndarray) -> tuple[float, float]:
    """(E_r[g], Var_r[g]) over the support of r."""
    support = r > 0
    r, g = r[support], g[support]
    mean = float(np.sum(r * g))
    return mean, float(np.sum(r * np.square(g - mean)))


def _mean(values) -> float | None:
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    return float(vals.mean()) if vals.size else None


def method_metrics(m: dict, true_kl: float, theoretical_variance: float, naive_empirical_variance: float,
                   sample_flags=None) -> dict:
    """Add the across-repeat metrics, its estimator kind and its flags (a list of verdicts.Flag) to one method entry
    (keys as written to results.json). `sample_flags`: what the draws' own checks found (verdicts.judge_repeats)."""
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
    out["estimator"] = str(m["estimator"])
    flags = exact_flags(m["exact_mean"], exact_var, true_kl, emp_var) + list(sample_flags or [])
    if exact_var is None and sample_flags is None:
        flags += mean_khat_flag(out["mean_khat"])
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
        demoted = bool(m["flags"]) if field != "exact_variance" else has(m["flags"], Code.BIASED, Code.UNCOVERED_MASS)
        return (demoted, math.inf if v is None or not np.isfinite(v) else v)

    return {rank: [m["name"] for m in sorted(methods, key=lambda m: key(field, m))]
            for rank, field in RANKING_KEYS.items()}
