r"""Verdicts on an LLM run: which (proposal, estimator) rows to trust, and the one estimate to report.

Input: the per-proposal documents of a run (llm.run.runner.run_experiment's ``docs``: ``proposal``, ``estimates`` overall,
``per_prompt`` for prompt sets, ``max_uncovered_mass``), whose estimate entries carry the diagnostics of
core.estimators.sequence_estimates. Output: rows with a ``flag`` (empty = trusted; else what went wrong, in words),
flagged rows ranked after every trusted row, and a recommendation. Pure: no printing, no files.

A row is flagged when
* its proposal gives r = 0 to tokens with P > 0 (biased: the sequences through them are never drawn);
* it is self-normalised IS under a proposal ≠ P (biased at O(1/n));
* its SE is not informative: (nearly) every draw is the same sequence;
* its proposal's weights fail the mean identity E_r[W_≤t] = 1 at some prefix (off by more than IDENTITY_Z of its
  own SEs, or a mean below IDENTITY_FLOOR): the heavy weights were never drawn, so the estimate and its SE are both
  too small — this is what catches the degenerate proposals that k̂ and ESS miss;
* one draw holds more than TOP_SHARE_LIMIT of the total weight, or k̂ > 0.7 (weights too heavy-tailed);
* k3 / k3-IS only: the sample mean of Q/r is off from 1 the same way (Q's mass lies on sequences never drawn: k3's
  variance is then enormous though its sample variance looks calm);
* the run includes P and the row disagrees with the best trusted P-based estimate (MC, RB or RB+CV, smallest SE)
  by more than CONSISTENCY_Z combined standard errors: every unbiased estimator targets the same KL.
For a prompt set, each prompt is judged on its own; an overall row is flagged when it is flagged at any prompt.

The recommendation: among trusted rows of unbiased estimators (not SNIS), the smallest SE — except that P's RB+CV
is kept unless a row beats its SE by more than ``CHALLENGER_MARGIN``: with a cross-fitted coefficient RB+CV is
unbiased and asymptotically never worse than the better of MC and RB (β = 0 is RB, β = 1 is MC, the fitted β
minimises the variance over all mixes), its weights are all 1 (nothing to degenerate), and an SE that is smaller
only by a few percent is within the noise of the SE estimates themselves (choosing the smallest of many noisy SEs
favours the one that was underestimated).
"""
from __future__ import annotations

import math

from kl_estimation.core.diagnostics import (
    IDENTITY_FLOOR,
    IDENTITY_Z,
    KHAT_LIMIT,
    MIN_DISTINCT,
    MIN_OTHER_DRAWS,
    TOP_SHARE_LIMIT,
    identity_failure,
)

P_NAME = "P"
P_BASED = ("RB+CV", "RB", "MC")
BIASED = ("SNIS",)
CONSISTENCY_Z = 3.0
CHALLENGER_MARGIN = 0.7  # a challenger must have SE below this fraction of RB+CV's (about half the variance)
NOT_INFORMATIVE = "SE not informative"
MIN_CV_SEQUENCES = 100  # below this the cross-fitted β is noise (n = 20: up to 6.5× the better of MC and RB)
DEFAULT_REASON = ("RB+CV (cross-fitted β) is the default: unbiased, weights all 1, and asymptotically never worse "
                  "than the better of MC and RB")


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def estimate_flags(proposal: str, estimator: str, e: dict, uncovered_mass: float = 0.0) -> list[str]:
    """What is wrong with one estimate (empty: nothing found), each reason in words."""
    flags = []
    if uncovered_mass > 0:
        flags.append(f"biased: the proposal gives r = 0 to tokens with P > 0 (up to {uncovered_mass:.2g} of P's "
                     f"mass at a step): sequences through them are never drawn")
    if estimator in BIASED and proposal != P_NAME:
        flags.append("self-normalised: biased at O(1/n)")
    if not e.get("se_informative", True):
        flags.append(f"{NOT_INFORMATIVE}: {e['n_distinct']} distinct sequences in {e['n']} draws, "
                     f"{e['modal_share']:.0%} of them one sequence (needs ≥ {MIN_DISTINCT} distinct and ≥ "
                     f"{MIN_OTHER_DRAWS} draws off the most frequent) — the sample has not seen the variance")
    elif e.get("std_error") == 0 and e.get("n", 0) > 1:
        flags.append(f"{NOT_INFORMATIVE}: every draw gave the same value — the sample has not seen the variance")
    if estimator.endswith("+CV") and e.get("n", MIN_CV_SEQUENCES) < MIN_CV_SEQUENCES:
        flags.append(f"control variate fitted on {e['n']} < {MIN_CV_SEQUENCES} sequences: its cross-fitted β is "
                     f"noisy, so its variance can exceed both MC's and RB's and its SE is too small")
    if proposal != P_NAME:
        m, z = e.get("prefix_weight_mean"), e.get("prefix_weight_z")
        if m is not None and identity_failure(m, z):
            why = (f"{z:+.1f} SE from 1" if abs(z) > IDENTITY_Z else f"below {IDENTITY_FLOOR}")
            flags.append(f"weights degenerate: a sample mean of the weights is {m:.3g} where it must be 1 ({why}) — "
                         f"the sequences with large weights were {'never ' if m < 1 else 'over-'}drawn")
        share = e.get("top_weight_share")
        if _finite(share) and share > TOP_SHARE_LIMIT and e.get("n", 0) > 1:
            flags.append(f"one draw holds {share:.0%} of the total weight: the estimate rests on it")
        if _finite(e.get("khat")) and e["khat"] > KHAT_LIMIT:
            flags.append(f"k̂ {e['khat']:.2f} > {KHAT_LIMIT}: weights too heavy-tailed to trust")
    if estimator.startswith("k3"):
        m, z = e.get("q_over_r_mean"), e.get("q_over_r_z")
        if m is not None and identity_failure(m, z):
            flags.append(f"k3: the sample mean of Q/{'P' if proposal == P_NAME else 'r'} is {m:.3g} where it must "
                         f"be 1 ({z:+.1f} SE): Q's mass lies on sequences that were never drawn")
    return flags


def judge_rows(entries: list[tuple[str, dict, float]], extra_flags: dict | None = None) -> list[dict]:
    """(proposal, estimates {estimator: entry}, uncovered mass) per proposal → ranked rows with a `flag`.

    `extra_flags` {(proposal, estimator): [reasons]}: flags found elsewhere (a prompt of a prompt set)."""
    rows = []
    for proposal, estimates, uncovered in entries:
        for est_name, e in estimates.items():
            reasons = estimate_flags(proposal, est_name, e, uncovered)
            reasons += (extra_flags or {}).get((proposal, est_name), [])
            rows.append(dict(proposal=proposal, estimator=est_name, **e, flags=reasons))
    ref = reference(rows)
    if ref is not None:
        for r in rows:
            if r is ref or not (_finite(r["estimate"]) and _finite(r["std_error"])):
                continue
            combined = math.hypot(r["std_error"], ref["std_error"])
            gap = abs(r["estimate"] - ref["estimate"])
            if gap > CONSISTENCY_Z * combined:  # both SEs 0 (an uninformative reference): any gap disagrees
                r["flags"].append(f"disagrees with P {ref['estimator']} ({ref['estimate']:.4g} ± "
                                  f"{ref['std_error']:.2g}) by {gap / combined if combined else math.inf:.1f} "
                                  f"combined SEs")
    for r in rows:
        r["flag"] = "; ".join(r.pop("flags"))
    return rank(rows)


def reference(rows: list[dict]) -> dict | None:
    """The yardstick of the consistency check: the P-based row (MC, RB, RB+CV) with the smallest SE among those
    with no flag — or, when every P row's SE is not informative (few distinct sequences: low temperature, a small
    support), among those flagged for that alone. RB's estimate then still sums the exact per-step KL along the
    sequences that carry P's mass, and the check only ever adds flags: an IS row that disagrees with it is not
    to be trusted either. None without a P row."""
    p_rows = [r for r in rows if r["proposal"] == P_NAME and r["estimator"] in P_BASED and _finite(r["std_error"])]
    for ok in (lambda r: not r["flags"], lambda r: all(f.startswith(NOT_INFORMATIVE) for f in r["flags"])):
        cands = [r for r in p_rows if ok(r)]
        if cands:
            return min(cands, key=lambda r: r["std_error"])
    return None


def rank(rows: list[dict]) -> list[dict]:
    """Trusted rows first, each group by standard error."""
    return sorted(rows, key=lambda r: (bool(r["flag"]), r["std_error"] if _finite(r["std_error"]) else math.inf))


def recommend(rows: list[dict]) -> dict | None:
    """The estimate to report (see the module doc), or None when no trusted unbiased row exists."""
    cands = [r for r in rows if not r["flag"] and r["estimator"] not in BIASED and _finite(r["std_error"])]
    if not cands:
        return None
    best = min(cands, key=lambda r: r["std_error"])
    default = next((r for r in cands if r["proposal"] == P_NAME and r["estimator"] == "RB+CV"), None)
    if default is not None and best["std_error"] >= CHALLENGER_MARGIN * default["std_error"]:
        best, reason = default, DEFAULT_REASON
    elif default is not None:
        reason = (f"the smallest SE among trusted unbiased rows, {default['std_error'] / best['std_error']:.2g}× "
                  f"below P's RB+CV")
    else:
        reason = "the smallest SE among trusted unbiased rows (the run has no P-based RB+CV)"
    keys = ("proposal", "estimator", "estimate", "std_error", "ci_low", "ci_high", "std_error_population",
            "ci_population_low", "ci_population_high")
    return dict({k: best[k] for k in keys if k in best}, reason=reason)


def judge(docs: list[dict]) -> dict:
    """A run's documents → {"rows" (overall, ranked, with `flag`), "recommended", "per_prompt"} where per_prompt
    (prompt sets only, else []) holds {prompt, rows, recommended} per prompt."""
    per_prompt, extra = [], {}
    n_prompts = len(docs[0].get("per_prompt", [])) if docs else 0
    for i in range(n_prompts):
        rows = judge_rows([(d["proposal"], d["per_prompt"][i]["estimates"], d.get("max_uncovered_mass", 0.0))
                           for d in docs])
        per_prompt.append(dict(prompt=i, rows=rows, recommended=recommend(rows)))
        for r in rows:
            for reason in filter(None, r["flag"].split("; ")):
                extra.setdefault((r["proposal"], r["estimator"]), {}).setdefault(reason, []).append(i)
    extra = {k: [f"prompt{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps[:5]))}{' …' if len(ps) > 5 else ''}: "
                 f"{reason}" for reason, ps in v.items()] for k, v in extra.items()}
    rows = judge_rows([(d["proposal"], d["estimates"], d.get("max_uncovered_mass", 0.0)) for d in docs], extra)
    return dict(rows=rows, recommended=recommend(rows), per_prompt=per_prompt)


def flagged_counts(rows: list[dict]) -> dict:
    """How many rows were checked and flagged, overall and among P-based rows (for reports and tests)."""
    p_rows = [r for r in rows if r["proposal"] == P_NAME and r["estimator"] in P_BASED]
    return dict(rows=len(rows), flagged=sum(bool(r["flag"]) for r in rows), p_rows=len(p_rows),
                p_flagged=sum(bool(r["flag"]) for r in p_rows))

