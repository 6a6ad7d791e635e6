r"""The trust policy of a run: rows with flags, their ranking, and the one estimate to recommend.

A *run* here is one set of draws of several proposals for one target — an LLM run at one prompt, one repeat of a toy
Markov pair — given as entries (proposal, estimates {estimator: entry}, uncovered mass). Pure: no printing, no files.

Each row gets the sample-only checks of verdicts.checks, and then, when the run includes P, the consistency check:

* INCONSISTENT — the row disagrees with the best trusted P-based estimate (MC, RB or RB+CV of P, smallest SE) by more
  than CONSISTENCY_Z combined standard errors: every unbiased estimator targets the same KL. When every P row's SE is
  not informative (few distinct sequences: a low temperature, a small support), the best of those still serves as
  the yardstick: RB still sums the exact per-step KL along the sequences that carry P's mass, and the check only
  ever adds flags.

P's SNIS is not a row: with r = P every weight is 1 and SNIS is MC itself.

The recommendation: among trusted rows of unbiased estimators (not SNIS), the smallest SE — except that P's RB+CV is
kept unless a row beats its SE by more than ``CHALLENGER_MARGIN``: with a cross-fitted coefficient RB+CV is unbiased
and asymptotically never worse than the better of MC and RB (β = 0 is RB, β = 1 is MC), its weights are all 1
(nothing to degenerate), and an SE that is smaller only by a few percent is within the noise of the SE estimates
themselves (choosing the smallest of many noisy SEs favours the one that was underestimated). Where P's RB+CV
cannot be fitted (CV_TOO_FEW: fewer than MIN_CV_SEQUENCES sequences) and is flagged for nothing else, P's RB — the
β = 0 member of the same family — takes its place as the default.
"""
from __future__ import annotations

import math

from kl_estimation.verdicts.checks import finite, sample_flags
from kl_estimation.verdicts.flags import Code, Flag, codes
from kl_estimation.verdicts.kinds import Estimator, kind

P_NAME, P_KEY = "P", "p"
CONSISTENCY_Z = 3.0
CHALLENGER_MARGIN = 0.7  # a challenger must have SE below this fraction of RB+CV's (about half the variance)
DEFAULT_REASON = ("RB+CV (cross-fitted β) is the default: unbiased, weights all 1, and asymptotically never worse "
                  "than the better of MC and RB")
RB_FALLBACK_REASON = ("RB is the default here: RB+CV's control variate cannot be fitted on so few sequences (RB is "
                      "its β = 0 member: unbiased, weights all 1)")


def spec_of(proposal):
    """A SequenceProposal from a spec, a key or a label (parsed strictly: llm.engine.sequence_proposal)."""
    from kl_estimation.llm.engine import sequence_proposal

    return sequence_proposal(proposal)


def _entry(e, r: int | None):
    """Repeat `r` of an entry whose values are lists over repeats (None: the entry as it is)."""
    if r is None:
        return e
    return {k: (v[r] if isinstance(v, list) else v) for k, v in e.items()}


def judge_rows(entries, extra_flags: dict | None = None, repeat: int | None = None) -> list[dict]:
    """One run's entries → ranked rows with ``flags`` (list of Flag) and ``flag`` (their codes, '' = trusted).

    `entries`: dicts {proposal (a SequenceProposal, key or label), estimates {estimator: entry}, uncovered (float),
    exact_known (estimators whose exact variance is known: the tail heuristics are then not applied)} or tuples
    (proposal, estimates, uncovered). `extra_flags` {(proposal key, estimator): [Flag]}: flags found elsewhere (at a
    prompt of a prompt set). `repeat`: judge that repeat of entries whose values are lists over repeats."""
    rows = []
    for item in entries:
        if not isinstance(item, dict):
            item = dict(zip(("proposal", "estimates", "uncovered"), item))
        spec = spec_of(item["proposal"])
        for est_name, e in item["estimates"].items():
            if spec.is_p and est_name == Estimator.SNIS:  # r = P: SNIS is MC itself, not a row of its own
                continue
            e = _entry(e, repeat)
            flags = sample_flags(est_name, e, is_p=spec.is_p, uncovered_mass=item.get("uncovered") or 0.0,
                                 exact_variance_known=est_name in item.get("exact_known", ()))
            extra = (extra_flags or {}).get((spec.key, est_name), [])
            # a code found at the prompts is said once, by the prompts' (more specific) flag
            flags = [f for f in flags if f.code not in {x.code for x in extra}] + list(extra)
            rows.append(dict(proposal=spec.label, proposal_key=spec.key, estimator=str(est_name), **e, flags=flags))
    check_consistency(rows)
    for r in rows:
        r["flag"] = codes(r["flags"])
    return rank(rows)


def check_consistency(rows: list[dict]) -> None:
    """Add INCONSISTENT to every row that disagrees with the reference P row (see the module doc)."""
    ref = reference(rows)
    if ref is None:
        return
    for r in rows:
        if r is ref or not (finite(r["estimate"]) and finite(r["std_error"])):
            continue
        combined = math.hypot(r["std_error"], ref["std_error"])
        gap = abs(r["estimate"] - ref["estimate"])
        if gap > CONSISTENCY_Z * combined:  # both SEs 0 (an uninformative reference): any gap disagrees
            r["flags"].append(Flag(Code.INCONSISTENT,
                                   f"disagrees with P · {ref['estimator']} ({ref['estimate']:.4g}, SE "
                                   f"{ref['std_error']:.2g}) by {gap / combined if combined else math.inf:.1f} "
                                   f"combined SEs"))


def is_p_row(r: dict) -> bool:
    return r.get("proposal_key", P_KEY if r["proposal"] == P_NAME else None) == P_KEY


def reference(rows: list[dict]) -> dict | None:
    """The yardstick of the consistency check: the P-based row (MC, RB, RB+CV) with the smallest SE among those
    with no flag — or, when every P row's SE is not informative, among those flagged for that alone. None without a
    P row."""
    p_rows = [r for r in rows if is_p_row(r) and (k := kind(r["estimator"])) is not None and k.p_based
              and finite(r["std_error"])]
    for ok in (lambda r: not r["flags"], lambda r: all(f.code is Code.SE_NOT_INFORMATIVE for f in r["flags"])):
        cands = [r for r in p_rows if ok(r)]
        if cands:
            return min(cands, key=lambda r: r["std_error"])
    return None


def rank(rows: list[dict]) -> list[dict]:
    """Trusted rows first, each group by standard error."""
    return sorted(rows, key=lambda r: (bool(r["flags"]), r["std_error"] if finite(r["std_error"]) else math.inf))


REC_KEYS = ("proposal", "proposal_key", "estimator", "estimate", "std_error", "ci_low", "ci_high", "n",
            "std_error_population", "ci_population_low", "ci_population_high")


def recommend(rows: list[dict]) -> dict | None:
    """The estimate to report (see the module doc), or None when no trusted unbiased row exists."""
    cands = [r for r in rows if not r["flags"] and (k := kind(r["estimator"])) is not None and k.unbiased
             and finite(r["std_error"])]
    if not cands:
        return None
    best = min(cands, key=lambda r: r["std_error"])
    p_cv = next((r for r in rows if is_p_row(r) and r["estimator"] == Estimator.RB_CV), None)
    default, default_reason = None, DEFAULT_REASON
    if p_cv is not None and not p_cv["flags"]:
        default = p_cv
    elif p_cv is not None and all(f.code is Code.CV_TOO_FEW for f in p_cv["flags"]):
        default = next((r for r in cands if is_p_row(r) and r["estimator"] == Estimator.RB), None)
        default_reason = RB_FALLBACK_REASON
    if default is not None and best["std_error"] >= CHALLENGER_MARGIN * default["std_error"]:
        best, reason = default, default_reason
    elif default is not None:
        reason = (f"the smallest SE among trusted unbiased rows, {default['std_error'] / best['std_error']:.2g}× "
                  f"below P's {default['estimator']}")
    elif p_cv is not None:
        reason = f"the smallest SE among trusted unbiased rows (P's RB+CV is flagged: {codes(p_cv['flags'])})"
    elif any(is_p_row(r) for r in rows):
        reason = "the smallest SE among trusted unbiased rows (the run has no RB+CV from P)"
    else:
        reason = "the smallest SE among trusted unbiased rows (the run has no P, so nothing checks its consistency)"
    return dict({k: best[k] for k in REC_KEYS if k in best}, reason=reason, recommended=True)


def mark_recommended(rows: list[dict], rec: dict | None) -> None:
    """Each row's ``recommended`` (True for the recommended one)."""
    for r in rows:
        r["recommended"] = rec is not None and (r.get("proposal_key"), r["estimator"]) == \
            (rec.get("proposal_key"), rec["estimator"])


def _at_prompts(per_prompt_rows: list[list[dict]]) -> dict:
    """{(key, estimator): [Flag]} for the overall rows: each code found at some prompts, once, naming them."""
    found: dict = {}
    for i, rows in enumerate(per_prompt_rows):
        for r in rows:
            for f in r["flags"]:
                found.setdefault((r["proposal_key"], r["estimator"]), {}).setdefault(f.code, (f.message, []))[1] \
                    .append(i)
    out = {}
    for k, by_code in found.items():
        out[k] = []
        for code, (message, ps) in by_code.items():
            where = f"prompt{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps[:5]))}{' …' if len(ps) > 5 else ''}"
            out[k].append(Flag(code, f"{where} of {len(per_prompt_rows)}: {message}"))
    return out


def unit_of(docs: list[dict]) -> dict:
    """What a KL of these documents is measured in: nats per sequence of up to T new tokens (cut at EOS or not)."""
    cfg = (docs[0].get("config") or {}) if docs else {}
    t = cfg.get("max_new_tokens")
    truncation = (docs[0].get("truncation") or "") if docs else ""
    return dict(unit="nats/sequence", max_new_tokens=t, eos=("EOS" in truncation) if truncation else None)


def judge(docs: list[dict]) -> dict:
    """A run's documents → {"rows" (overall, ranked, with flags), "recommended", "per_prompt", "proposals", "unit"}
    where per_prompt (prompt sets only, else []) holds {prompt, rows, recommended} per prompt and proposals the
    typed identity of each proposal (key, label, family, param, prefix_aware).

    Documents: ``proposal`` (a key, label or SequenceProposal; ``proposal_key`` wins when present), ``estimates``
    overall, ``per_prompt`` for prompt sets, ``max_uncovered_mass``."""
    specs = [spec_of(d.get("proposal_key") or d["proposal"]) for d in docs]
    unit = unit_of(docs)
    per_prompt = []
    n_prompts = len(docs[0].get("per_prompt", [])) if docs else 0
    for i in range(n_prompts):
        rows = judge_rows([(s, d["per_prompt"][i]["estimates"], d.get("max_uncovered_mass", 0.0))
                           for s, d in zip(specs, docs)])
        rec = recommend(rows)
        mark_recommended(rows, rec)
        per_prompt.append(dict(prompt=i, rows=rows, recommended=rec and dict(rec, **unit)))
    extra = _at_prompts([p["rows"] for p in per_prompt])
    rows = judge_rows([(s, d["estimates"], d.get("max_uncovered_mass", 0.0)) for s, d in zip(specs, docs)], extra)
    rec = recommend(rows)
    mark_recommended(rows, rec)
    return dict(rows=rows, recommended=rec and dict(rec, **unit), per_prompt=per_prompt,
                proposals=[s.record() for s in specs], unit=unit)


def flagged_counts(rows: list[dict]) -> dict:
    """How many rows were checked and flagged, overall and among P-based rows (for reports and tests)."""
    p_rows = [r for r in rows if is_p_row(r) and (k := kind(r["estimator"])) is not None and k.p_based]
    return dict(rows=len(rows), flagged=sum(bool(r["flags"]) for r in rows), p_rows=len(p_rows),
                p_flagged=sum(bool(r["flags"]) for r in p_rows))


def judge_repeats(entries, n_repeats: int) -> dict:
    """Entries whose values are lists over `n_repeats` independent repeats (each repeat one run of every proposal,
    as in the toy Markov experiment) → {(proposal key, estimator): [Flag]}: each repeat judged by judge_rows exactly
    as an LLM run is, a code found in some repeats reported once, naming how many ("in 3 of 10 repeats: …")."""
    found: dict = {}
    for r in range(n_repeats):
        for row in judge_rows(entries, repeat=r):
            for f in row["flags"]:
                found.setdefault((row["proposal_key"], row["estimator"]), {}).setdefault(f.code, [f.message, 0])
                found[(row["proposal_key"], row["estimator"])][f.code][1] += 1
    return {k: [Flag(code, f"in {count} of {n_repeats} repeat{'s' if n_repeats > 1 else ''}: {message}")
                for code, (message, count) in by_code.items()] for k, by_code in found.items()}


def table_rows(rows: list[dict], **tags) -> list[dict]:
    """Rows for CSV files and DataFrames: every field but the flag records (the short ``flag`` codes stay, and
    ``recommended``); `tags` (e.g. prompt=3) go first."""
    return [dict(tags, **{k: v for k, v in r.items() if k != "flags"}) for r in rows]


def from_records(rows: list[dict]) -> list[dict]:
    """Rows read back from JSON: their flag records as Flag objects again."""
    from kl_estimation.verdicts.flags import as_flags

    return [dict(r, flags=as_flags(r.get("flags"))) for r in rows]
