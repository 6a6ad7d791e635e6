r"""The checks of one estimate: sample-only checks (any run) and exact checks (where an exact mean / variance is known).

Sample-only checks read the diagnostics an estimate entry carries (core.estimators.sequence_estimates; a check whose
diagnostic is absent is skipped) and apply in every area — single-token synthetic rows, the toy Markov rows, LLM rows:

* UNCOVERED_MASS — the proposal gives r = 0 to tokens with P > 0: the sequences through them are never drawn;
* SELF_NORMALIZED — SNIS under a proposal ≠ P (biased at O(1/n));
* SE_NOT_INFORMATIVE — (nearly) every draw the same sequence, every draw the same value, fewer than 2 draws, or
  importance weights whose Kish ESS is below MIN_ESS draws (the weighted sample is worth a handful of draws);
* CV_TOO_FEW — a control variate fitted on fewer than MIN_CV_SEQUENCES sequences (its β is noise);
* WEIGHT_IDENTITY — a mean identity E_r[W_≤t] = 1 fails (diagnostics.identity_failure): the heavy weights were never
  drawn (or over-drawn), so estimate and SE are both off;
* TOP_SHARE / KHAT — one draw holds more than TOP_SHARE_LIMIT of Σw, or Pareto k̂ > KHAT_LIMIT;
* K3_IDENTITY — k3 only: the sample mean of Q/r is off from 1 the same way.

Exact checks need the exact mean and per-sample variance of the estimator (single-token sums, the toy DP):

* BIASED — the exact mean is not the KL (k2; token-level Optimal / Balanced 1–2 on sequences);
* EXACT_VAR_OVERFLOW — the exact variance is beyond float64;
* SAMPLE_VAR_COLLAPSE — the sample variance is more than DEGENERATE_RATIO× below the exact variance: the rare huge
  weights that carry the variance were never drawn.

Where the exact variance is known it decides, not the tail heuristics: TOP_SHARE and KHAT are then not applied (a
single-token proposal with bounded weights redraws the same few tokens, and a tail fit to those tied weights says
nothing about a variance that is known exactly).
"""
from __future__ import annotations

import math

from kl_estimation.core.diagnostics import KHAT_LIMIT, TOP_SHARE_LIMIT, identity_failure
from kl_estimation.core.kinds import Estimator, kind
from kl_estimation.core.results import CONSTANT, FEW_DISTINCT, FEW_DRAWS, LOW_ESS, MIN_ESS, Code, Flag

MIN_CV_SEQUENCES = 100  # below this the cross-fitted β is noise (n = 20: up to 6.5× the better of MC and RB)
DEGENERATE_RATIO = 10.0  # exact variance this many times the sample variance: the heavy tail was never drawn


def finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def sample_flags(estimator, e: dict, *, is_p: bool, uncovered_mass: float = 0.0,
                 exact_variance_known: bool = False) -> list[Flag]:
    """What the draws themselves say is wrong with one estimate `e` of kind `estimator` (empty: nothing found)."""
    k = kind(estimator)
    flags = []
    n = e.get("n")
    if finite(uncovered_mass) and uncovered_mass > 0:
        flags.append(Flag(Code.UNCOVERED_MASS, {"mass": uncovered_mass}))
    if k is Estimator.SNIS and not is_p:
        flags.append(Flag(Code.SELF_NORMALIZED))
    se = e.get("std_error")
    if n is not None and n < 2:
        flags.append(Flag(Code.SE_NOT_INFORMATIVE, {"why": FEW_DRAWS, "n": n}))
    elif not e.get("se_informative", True):
        flags.append(Flag(Code.SE_NOT_INFORMATIVE, {"why": FEW_DISTINCT, "n": n, "n_distinct": e.get("n_distinct"),
                                                    "modal_share": e.get("modal_share")}))
    elif se == 0 and (n or 0) > 1:
        flags.append(Flag(Code.SE_NOT_INFORMATIVE, {"why": CONSTANT, "n": n}))
    elif not is_p and finite(e.get("ess")) and e["ess"] < MIN_ESS and (n or 0) >= MIN_ESS:
        flags.append(Flag(Code.SE_NOT_INFORMATIVE, {"why": LOW_ESS, "n": n, "ess": e["ess"]}))
    if k is not None and k.control_variate and (n if n is not None else MIN_CV_SEQUENCES) < MIN_CV_SEQUENCES:
        flags.append(Flag(Code.CV_TOO_FEW, {"n": n, "needed_n": MIN_CV_SEQUENCES}))
    if not is_p:
        m, z = e.get("prefix_weight_mean"), e.get("prefix_weight_z")
        if m is not None and z is not None and identity_failure(m, z):
            flags.append(Flag(Code.WEIGHT_IDENTITY, {"mean": m, "z": z}))
        if not exact_variance_known:
            share = e.get("top_weight_share")
            if finite(share) and share > TOP_SHARE_LIMIT and (n or 0) > 1:
                flags.append(Flag(Code.TOP_SHARE, {"share": share}))
            if finite(e.get("khat")) and e["khat"] > KHAT_LIMIT:
                flags.append(Flag(Code.KHAT, {"khat": e["khat"]}))
    if k is not None and k.k3:
        m, z = e.get("q_over_r_mean"), e.get("q_over_r_z")
        if m is not None and z is not None and identity_failure(m, z):
            flags.append(Flag(Code.K3_IDENTITY, {"mean": m, "z": z, "is_p": is_p}))
    return flags


def exact_flags(exact_mean, exact_variance, true_kl: float, sample_variance) -> list[Flag]:
    """What the exact values say (single-token sums, the toy DP): bias, and a sample variance that hides the exact
    one. `exact_mean` / `exact_variance` None: nothing is known, nothing is flagged."""
    flags = []
    if exact_mean is not None and abs(exact_mean - true_kl) > 1e-9 * max(1.0, abs(true_kl)):
        flags.append(Flag(Code.BIASED, {"exact_mean": exact_mean, "kl": true_kl}))
    if exact_variance == math.inf:
        flags.append(Flag(Code.EXACT_VAR_OVERFLOW))
    elif exact_variance is not None and sample_variance is not None \
            and exact_variance > DEGENERATE_RATIO * max(sample_variance, 1e-300):
        ratio = exact_variance / sample_variance if sample_variance > 0 else math.inf
        flags.append(Flag(Code.SAMPLE_VAR_COLLAPSE, {"ratio": ratio}))
    return flags


def mean_khat_flag(mean_khat) -> list[Flag]:
    """Rows without an exact variance and without per-draw diagnostics: the mean k̂ over repeats."""
    if finite(mean_khat) and mean_khat > KHAT_LIMIT:
        return [Flag(Code.KHAT, {"khat": mean_khat, "over_repeats": True})]
    return []
