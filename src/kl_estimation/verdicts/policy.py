r"""The trust policy of a run: rows with flags, their ranking, and the one estimate to recommend.

A *run* here is one set of draws of several proposals for one target — an LLM run at one prompt, one repeat of a toy
Markov pair — given as entries (proposal, estimates {estimator: entry}, uncovered mass). Pure: no printing, no files.

Each row gets the sample-only checks of verdicts.checks, and then, when the run includes P, the consistency checks
(check_consistency):

* INCONSISTENT — the row disagrees with the best trusted P-based estimate (MC, RB or RB+CV of P, smallest SE) by more
  than CONSISTENCY_Z combined standard errors: every unbiased estimator targets the same KL. When every P row's SE is
  not informative (few distinct sequences: a low temperature, a small support, a near-deterministic first step), the
  best of those still serves as the yardstick. The disagreement is blamed on P too when healthy rows of at least
  MIN_DISPUTERS proposals contradict it on the same side (P's own sample can miss a rare heavy region); of two
  healthy proposals more than PAIR_Z combined SEs apart the less precise one is flagged; and every estimator of a
  proposal whose plain IS estimate is inconsistent is flagged with it (the same weights).
* UNCONFIRMED — **the rule that never recommends what nothing trustworthy confirms.** Where P's rows are not
  informative, the consistency check can only confirm an importance-sampling row to within what P's own draws
  resolve (the largest SE of P's MC, RB and RB+CV). A weighted row whose SE is below CONFIRM_RATIO (½) of that is
  flagged — its precision rests on its own SE alone, and its own sample cannot show the heavy sequences it never
  drew — and so is every weighted row when P's draws were all one sequence (they resolve nothing). Nothing is then
  recommended at that prompt, and ``advice`` says how many sequences from P would make the check possible (enough
  for ≥ 10 draws off P's most frequent sequence, and for P's SE to reach twice the row's). Issue 19's case — P
  rows all not informative, an IS row at 0.0231 ± 0.012 against P's MC 0.108 ± 0.067, truth 0.218 — is caught:
  0.012 < ½ × 0.067.

P's SNIS is not a row: with r = P every weight is 1 and SNIS is MC itself.

The recommendation: among trusted rows of unbiased estimators other than k3 (not SNIS, and not k3 / k3-IS: their
terms grow like Q/P, the heaviest tails of all, and their SE is the first to be understated — in the
near-deterministic grid a k3-IS row 5.6 of its SEs off passed every check; MC, RB and RB+CV come from the same
draws), the smallest SE — except that P's RB+CV is
kept unless a row beats its SE by more than ``CHALLENGER_MARGIN``: with a cross-fitted coefficient RB+CV is unbiased
and asymptotically never worse than the better of MC and RB (β = 0 is RB, β = 1 is MC), its weights are all 1
(nothing to degenerate), and an SE that is smaller only by a few percent is within the noise of the SE estimates
themselves (choosing the smallest of many noisy SEs favours the one that was underestimated). Where P's RB+CV
cannot be fitted (CV_TOO_FEW: fewer than MIN_CV_SEQUENCES sequences) and is flagged for nothing else, P's RB — the
β = 0 member of the same family — takes its place as the default.

Rows are typed (core.results.Row, frozen): a row carries its direction, so its flags, the advice (core.results.Advice)
and the reason of a recommendation (core.results.Reason) are data rendered in that direction's names at the edge;
nothing here writes or reads a sentence. judge(docs, direction) judges in the sampling frame — proposal "P" is plain
Monte Carlo from the sampling model, whichever it is.

For a prompt set each prompt is judged on its own, and an overall row carries every flag found at any prompt. When
that leaves no overall row trusted, the recommendation comes from the prompts where a row is trusted, if they are
at least 2 and at least half of the set (recommend_subset): it is then the mean KL over those prompts — its
``covers`` says which, and why the others are left out. Otherwise ``advice`` says in one line what to change (how
many sequences per prompt from P, which prompts are the problem, that P is missing, …).
"""
from __future__ import annotations

import math
from dataclasses import replace

from kl_estimation.core.diagnostics import MIN_OTHER_DRAWS
from kl_estimation.core.kinds import Estimator, kind
from kl_estimation.core.proposals import FORWARD, P_KEY, sequence_proposal
from kl_estimation.core.results import (
    CONTRADICTED,
    DISAGREES,
    FEW_DISTINCT,
    MORE_PRECISE,
    SAME_DRAWS,
    Advice,
    Code,
    Flag,
    Reason,
    Row,
    codes,
    identity,
    pool_prompts,
)
from kl_estimation.verdicts.checks import MIN_CV_SEQUENCES, finite, sample_flags

CONSISTENCY_Z = 3.0
CHALLENGER_MARGIN = 0.7  # a challenger must have SE below this fraction of RB+CV's (about half the variance)
CONFIRM_RATIO = 0.5  # uninformative P: a weighted row's SE below this fraction of P's resolution is unconfirmed
PAIR_Z = 4.0  # two healthy importance-sampling rows of different proposals further apart than this: one is off
MIN_DISPUTERS = 2  # healthy rows of this many proposals contradicting P on one side: P is not trusted either
CONCENTRATED = 0.5  # P's most frequent sequence holds at least this share: "almost all one sequence"


def _entry(e, r: int | None):
    """Repeat `r` of an entry whose values are lists over repeats (None: the entry as it is)."""
    if r is None:
        return e
    return {k: (v[r] if isinstance(v, list) else v) for k, v in e.items()}


class _Judged:
    """A row while the consistency checks add to its flags (a Row is frozen): the row's fields, growing flags."""

    def __init__(self, row: Row):
        self.row, self.flags = row, list(row.flags)

    def __getattr__(self, name):
        value = getattr(self.row, name)
        setattr(self, name, value)  # the checks compare rows pairwise: read each field through here once
        return value


def judge_rows(entries, extra_flags: dict | None = None, repeat: int | None = None,
               direction: str = FORWARD) -> list[Row]:
    """One run's entries → ranked Rows with their flags (empty = trusted), in `direction`.

    `entries`: dicts {proposal (a SequenceProposal, key or label), estimates {estimator: entry}, uncovered (float),
    exact_known (estimators whose exact variance is known: the tail heuristics are then not applied)} or tuples
    (proposal, estimates, uncovered). `extra_flags` {(proposal key, estimator): [Flag]}: flags found elsewhere (at a
    prompt of a prompt set). `repeat`: judge that repeat of entries whose values are lists over repeats."""
    rows = []
    for item in entries:
        if not isinstance(item, dict):
            item = dict(zip(("proposal", "estimates", "uncovered"), item))
        spec = sequence_proposal(item["proposal"])
        for est_name, e in item["estimates"].items():
            if spec.is_p and est_name == Estimator.SNIS:  # r = P: SNIS is MC itself, not a row of its own
                continue
            e = _entry(e, repeat)
            flags = sample_flags(est_name, e, is_p=spec.is_p, uncovered_mass=item.get("uncovered") or 0.0,
                                 exact_variance_known=est_name in item.get("exact_known", ()))
            extra = (extra_flags or {}).get((spec.key, str(est_name)), [])
            # a code found at the prompts is said once, by the prompts' (more specific) flag
            flags = [f for f in flags if f.code not in {x.code for x in extra}] + list(extra)
            rows.append(_Judged(Row.from_entry(spec, est_name, e, flags=tuple(flags), direction=direction)))
    check_consistency(rows)
    return rank([replace(r.row, flags=tuple(r.flags)) for r in rows])


def _gap(r, x) -> float:
    """|r − x| in combined standard errors (inf when both SEs are 0 and the estimates differ)."""
    combined = math.hypot(r.std_error, x.std_error)
    gap = abs(r.estimate - x.estimate)
    return gap / combined if combined else (math.inf if gap > 0 else 0.0)


def _healthy(r) -> bool:
    """An importance-sampling row that can serve as a second yardstick: it passed every check of its own draws (only
    consistency flags, if any) and is not k3 (whose terms are the heaviest-tailed of all and whose SE is the first to
    be understated)."""
    k = kind(r.estimator)
    return (not r.is_p and k is not None and k.unbiased and not k.k3 and finite(r.std_error)
            and r.std_error > 0 and all(f.code is Code.INCONSISTENT for f in r.flags))


def _inconsistent(r, test: str | None = None) -> bool:
    return any(f.code is Code.INCONSISTENT and (test is None or f.data.get("test") == test) for f in r.flags)


def _against(test: str, other, z: float, **data) -> Flag:
    return Flag(Code.INCONSISTENT, {"test": test, "against": identity(other), "z": z, **data})


def check_consistency(rows: list[_Judged]) -> None:
    """The consistency checks of one run (see the module doc), in order:

    1. INCONSISTENT on every row that disagrees with the reference P row by more than CONSISTENCY_Z combined SEs
       (where P's draws are not informative, P's own rows are not compared with each other — they come from the same
       few sequences — and a reference with SE 0 compares nothing: step 5 says what P cannot confirm);
    2. when healthy importance-sampling rows (every check of their own draws passed) of at least MIN_DISPUTERS
       proposals contradict P on the same side, the disagreement is not blamed on them alone: P's rows that disagree
       with them are flagged too, and so is every other row that does (test "contradicted") — P's own sample can
       miss a rare heavy region just as a proposal's can, and the run cannot tell which SEs are wrong;
    3. of two healthy rows of different proposals more than PAIR_Z combined SEs apart, the less precise one;
    4. every estimator of a proposal whose plain IS estimate is inconsistent (the weights of those draws miss mass);
    5. UNCONFIRMED where P's draws are not informative (check_confirmable)."""
    ref = reference(rows)
    if ref is None:
        return
    usable = [r for r in rows if finite(r.estimate) and finite(r.std_error)]
    cold = any(f.code is Code.SE_NOT_INFORMATIVE for f in ref.flags)
    if not (cold and _no_spread(ref)):
        disputes = []
        for r in usable:
            if r is ref or (cold and r.is_p) or _gap(r, ref) <= CONSISTENCY_Z:
                continue
            r.flags.append(_against(DISAGREES, ref, _gap(r, ref)))
            if _healthy(r):
                disputes.append(r)
        for above in (True, False):  # P is disputed when healthy rows of two proposals contradict it on one side
            side = [d for d in disputes if (d.estimate > ref.estimate) is above]
            if len({d.proposal_key for d in side}) < MIN_DISPUTERS:
                disputes = [d for d in disputes if d not in side]
        for r in usable:
            if r in disputes or _inconsistent(r):
                continue
            worst = max(disputes, key=lambda d: _gap(r, d), default=None)
            if worst is not None and _gap(r, worst) > CONSISTENCY_Z:
                r.flags.append(_against(CONTRADICTED, worst, _gap(r, worst), disputers=MIN_DISPUTERS))
    healthy = [r for r in usable if _healthy(r) and not r.flags]
    for r in healthy:  # two healthy proposals far apart: the less precise one is the likelier to be off
        worst = max((x for x in healthy if x.proposal_key != r.proposal_key and x.std_error < r.std_error),
                    key=lambda x: _gap(r, x), default=None)
        if worst is not None and _gap(r, worst) > PAIR_Z:
            r.flags.append(_against(MORE_PRECISE, worst, _gap(r, worst)))
    for r in usable:
        sib = next((x for x in rows if x.proposal_key == r.proposal_key and x.estimator == Estimator.IS
                    and _inconsistent(x)), None)
        if not r.is_p and sib is not None and not _inconsistent(r):
            r.flags.append(_against(SAME_DRAWS, sib, _gap(r, sib)))
    check_confirmable(rows, ref)


def _no_spread(r) -> bool:
    """An SE of 0 up to float rounding (every draw the same sequence: the 'SE' is rounding noise)."""
    return r.std_error <= 1e-9 * max(1.0, abs(r.estimate))


def p_resolution(rows) -> float | None:
    """What P's own draws resolve: the largest SE among P's MC, RB and RB+CV rows (None without one, or when every
    such SE is 0 up to rounding: P's draws were all one sequence and resolve nothing)."""
    ses = [r.std_error for r in rows if r.is_p and (k := kind(r.estimator)) is not None and k.p_based
           and finite(r.std_error) and not _no_spread(r)]
    return max(ses) if ses else None


def needed_sequences(row) -> int | None:
    """About how many sequences from P make P's SE informative at this prompt (≥ MIN_OTHER_DRAWS draws off its most
    frequent sequence with probability ≈ 0.9: (10 + 2√10)/(1 − modal share); when every draw was the same sequence,
    the rule of three bounds the rest of P's mass by 3/n)."""
    n, modal = row.n, row.details.get("modal_share")
    if not n or modal is None or not finite(modal):
        return None
    other = (1 - modal) if modal < 1 else 3 / n
    return math.ceil((MIN_OTHER_DRAWS + 2 * math.sqrt(MIN_OTHER_DRAWS)) / max(other, 1e-12))


def check_confirmable(rows: list[_Judged], ref) -> None:
    """UNCONFIRMED — where P's rows are not informative (the reference is flagged SE_NOT_INFORMATIVE), the consistency
    check can only confirm an importance-sampling row to within what P's draws resolve (p_resolution). A weighted row
    whose SE is below CONFIRM_RATIO of that is flagged: its precision rests on its own SE alone, which the sample
    cannot check (its heavy sequences may never have been drawn). With no finite, positive P SE nothing is
    confirmable. The flag says how many sequences from P would make the check possible (``needed_n``)."""
    if not any(f.code is Code.SE_NOT_INFORMATIVE for f in ref.flags):
        return
    res = p_resolution(rows)
    n_inf = needed_sequences(ref)
    for r in rows:
        k = kind(r.estimator)
        if r.is_p or k is None or not k.uses_weights or not finite(r.std_error):
            continue
        if res is not None and res > 0 and r.std_error >= CONFIRM_RATIO * res:
            continue
        n = ref.n or 0
        need = [x for x in (n_inf, math.ceil(n * (CONFIRM_RATIO * res / r.std_error) ** 2)
                            if res and r.std_error > 0 and n else None) if x]
        r.flags.append(Flag(Code.UNCONFIRMED, {"resolution": res, "std_error": r.std_error, "ratio": CONFIRM_RATIO,
                                               "needed_n": max(need) if need else None}))


def reference(rows):
    """The yardstick of the consistency check: the P-based row (MC, RB, RB+CV) with the smallest SE among those
    with no flag — or, when every P row's SE is not informative, among those flagged for that alone. None without a
    P row."""
    p_rows = [r for r in rows if r.is_p and (k := kind(r.estimator)) is not None and k.p_based
              and finite(r.std_error)]
    for ok in (lambda r: not r.flags, lambda r: all(f.code is Code.SE_NOT_INFORMATIVE for f in r.flags)):
        cands = [r for r in p_rows if ok(r)]
        if cands:
            return min(cands, key=lambda r: r.std_error)
    return None


def rank(rows: list[Row]) -> list[Row]:
    """Trusted rows first, each group by standard error."""
    return sorted(rows, key=lambda r: (bool(r.flags), r.std_error if finite(r.std_error) else math.inf))


def recommend(rows: list[Row]) -> Row | None:
    """The estimate to report (see the module doc) with its ``reason``, or None when no trusted unbiased row
    exists."""
    cands = [r for r in rows if not r.flags and (k := kind(r.estimator)) is not None and k.recommendable
             and finite(r.std_error)]
    if not cands:
        return None
    best = min(cands, key=lambda r: r.std_error)
    p_cv = next((r for r in rows if r.is_p and r.estimator == Estimator.RB_CV), None)
    default, default_reason = None, Reason("default_cv")
    if p_cv is not None and not p_cv.flags:
        default = p_cv
    elif p_cv is not None and all(f.code is Code.CV_TOO_FEW for f in p_cv.flags):
        default = next((r for r in cands if r.is_p and r.estimator == Estimator.RB), None)
        default_reason = Reason("default_rb")
    if default is not None and best.std_error >= CHALLENGER_MARGIN * default.std_error:
        best, reason = default, default_reason
    elif default is not None:
        reason = Reason("smaller_se", {"ratio": default.std_error / best.std_error, "default": str(default.estimator)})
    elif p_cv is not None:
        reason = Reason("p_cv_flagged", {"codes": codes(p_cv.flags)})
    elif any(r.is_p for r in rows):
        reason = Reason("no_p_cv")
    else:
        reason = Reason("no_p")
    return replace(best, reason=reason, recommended=True)


def mark_recommended(rows: list[Row], rec: Row | None) -> list[Row]:
    """The rows with ``recommended`` set on the recommended one."""
    def same(r):
        return rec is not None and (r.proposal_key, r.estimator) == (rec.proposal_key, rec.estimator)

    return [replace(r, recommended=same(r)) for r in rows]


def _at_prompts(per_prompt_rows: list[list[Row]]) -> dict:
    """{(key, estimator): [Flag]} for the overall rows: each code found at some prompts, once, naming them."""
    found: dict = {}
    for i, rows in enumerate(per_prompt_rows):
        for r in rows:
            for f in r.flags:
                found.setdefault((r.proposal_key, str(r.estimator)), {}).setdefault(f.code, (f, []))[1].append(i)
    return {k: [Flag(code, {**first.data, "prompts": ps, "n_prompts": len(per_prompt_rows)})
                for code, (first, ps) in by_code.items()] for k, by_code in found.items()}


def unit_of(docs: list[dict]) -> dict:
    """What a KL of these documents is measured in: nats per sequence of up to T new tokens (cut at EOS or not)."""
    cfg = (docs[0].get("config") or {}) if docs else {}
    t = cfg.get("max_new_tokens")
    truncation = (docs[0].get("truncation") or "") if docs else ""
    return {"unit": "nats/sequence", "max_new_tokens": t, "eos": ("EOS" in truncation) if truncation else None}


def _with_unit(rec: Row | None, unit: dict) -> Row | None:
    return rec and replace(rec, details={**rec.details, **unit})


def judge(docs: list[dict], direction: str = FORWARD) -> dict:
    """A run's documents → {"rows" (overall, ranked Rows), "recommended", "advice", "per_prompt", "proposals",
    "unit"} where per_prompt (prompt sets only, else []) holds {prompt, rows, recommended, advice} per prompt,
    proposals the typed identity of each proposal (key, label, family, param, prefix_aware), and advice (an Advice,
    when nothing is recommended) what to change. Every row carries `direction`.

    A prompt set whose overall rows are all flagged (one low-entropy prompt flags every overall row) still gets a
    recommendation when that is sound: from the prompts where a row is trusted (recommend_subset), saying what it
    covers.

    Documents: ``proposal`` (a key, label or SequenceProposal; ``proposal_key`` wins when present), ``estimates``
    overall, ``per_prompt`` for prompt sets, ``max_uncovered_mass``."""
    specs = [sequence_proposal(d.get("proposal_key") or d["proposal"]) for d in docs]
    unit = unit_of(docs)
    per_prompt = []
    n_prompts = len(docs[0].get("per_prompt", [])) if docs else 0
    for i in range(n_prompts):
        rows = judge_rows([(s, d["per_prompt"][i]["estimates"], d.get("max_uncovered_mass", 0.0))
                           for s, d in zip(specs, docs)], direction=direction)
        rec = recommend(rows)
        per_prompt.append({"prompt": i, "rows": mark_recommended(rows, rec), "recommended": _with_unit(rec, unit),
                           "advice": None if rec else advise([rows], direction)})
    extra = _at_prompts([p["rows"] for p in per_prompt])
    rows = judge_rows([(s, d["estimates"], d.get("max_uncovered_mass", 0.0)) for s, d in zip(specs, docs)], extra,
                      direction=direction)
    rec = recommend(rows)
    rows = mark_recommended(rows, rec)
    if rec is None and per_prompt:
        rec = recommend_subset(per_prompt)
    advice = None if rec else advise([p["rows"] for p in per_prompt] or [rows], direction)
    return {"rows": rows, "recommended": _with_unit(rec, unit), "advice": advice, "per_prompt": per_prompt,
            "proposals": [s.record() for s in specs], "unit": unit}


def recommend_subset(per_prompt: list[dict]) -> Row | None:
    """The recommendation of a prompt set whose overall rows are all flagged, from the prompts where a row is trusted.

    For each (proposal, estimator) of an unbiased kind, S = the prompts where its row is unflagged. The largest S
    (P's RB+CV, then P's RB, preferred on ties) is used when it holds at least 2 prompts and at least half of them;
    the rows trusted on all of S are averaged over S (core.results.pool_prompts: fixed-set SE √(Σ SE_i²)/|S| with a
    normal interval, population SE √(s²/|S|) with Student t on |S| − 1 degrees of freedom, as for the whole set)
    and recommend() picks among them. The result is the mean KL over those prompts — not over the set — and its
    population interval generalises only to prompts like them (the prompts left out, typically low-entropy ones, may
    differ systematically): its ``covers`` says which prompts it covers and why the others are left out. None when
    no such S exists."""
    m = len(per_prompt)
    trusted: dict = {}
    at_prompt = [{(r.proposal_key, str(r.estimator)): r for r in p["rows"]} for p in per_prompt]
    for i in range(m):
        for key, r in at_prompt[i].items():
            k = kind(r.estimator)
            if not r.flags and k is not None and k.recommendable and finite(r.std_error):
                trusted.setdefault(key, []).append(i)
    if not trusted:
        return None
    prefer = {(P_KEY, Estimator.RB_CV.value): 0, (P_KEY, Estimator.RB.value): 1}
    best = min(trusted, key=lambda k: (-len(trusted[k]), prefer.get(k, 2)))
    S = trusted[best]
    if len(S) < max(2, math.ceil(m / 2)):
        return None
    rows = []  # every row present at all of S, averaged over S, with the flags it has there (recommend's defaults)
    for key in at_prompt[S[0]]:
        rs = [at_prompt[i].get(key) for i in S]
        if any(r is None or not finite(r.std_error) or not finite(r.estimate) for r in rs):
            continue
        pooled = pool_prompts([r.estimate for r in rs], [r.std_error for r in rs])
        flags = tuple({f.code: f for r in rs for f in r.flags}.values())
        rows.append(Row.from_entry(rs[0].identity, rs[0].estimator, {**rs[0].details, **pooled},
                                   n=sum(r.n or 0 for r in rs), flags=flags, direction=rs[0].direction))
    S = [per_prompt[i]["prompt"] for i in S]
    rec = recommend(rows)
    if rec is None:
        return None
    left = [p for p in per_prompt if p["prompt"] not in S]
    why = "; ".join(f"prompt {p['prompt']}: {_left_out_reason(p, rec)}" for p in left[:5]) + (" …" if len(left) > 5
                                                                                                  else "")
    covers = (f"prompts {', '.join(map(str, S))} ({len(S)} of {m}; left out — {why}; the estimate is the mean KL over "
              f"these {len(S)} prompts, not over all {m}, and its population interval speaks for prompts like them)")
    return replace(rec, details={**rec.details, "covers": covers, "prompts_covered": S})


def _left_out_reason(p: dict, rec: Row) -> str:
    row = next((r for r in p["rows"] if (r.proposal_key, r.estimator) == (rec.proposal_key, rec.estimator)), None)
    return codes(row.flags) if row is not None else "no such row"


def _concentrated(rows: list[Row]) -> bool:
    """P's draws at a prompt are almost all one sequence (not merely too few to show their spread)."""
    for r in rows:
        for f in r.flags:
            if f.code is Code.SE_NOT_INFORMATIVE and f.data.get("why") == FEW_DISTINCT:
                share = f.data.get("modal_share")
                return share is not None and share >= CONCENTRATED
    return False


def advise(per_prompt_rows: list[list[Row]], direction: str = FORWARD) -> Advice:
    """What to change when nothing can be recommended, from the flags' data: how many sequences from P would make
    its draws informative (and the prompts where they are not, and why: almost all one sequence, or too few to show
    their spread), that P is missing, that P and a proposal disagree, or that RB+CV needs ≥ MIN_CV_SEQUENCES
    sequences."""
    multi = len(per_prompt_rows) > 1
    if not any(r.is_p for rows in per_prompt_rows for r in rows):
        return Advice("include_p", direction=direction)
    cold, need, disputed, few_cv, concentrated, n_drawn = [], [], [], False, [], []
    for i, rows in enumerate(per_prompt_rows):
        p_rows = [r for r in rows if r.is_p and (k := kind(r.estimator)) is not None and k.p_based]
        if p_rows and all(r.has(Code.SE_NOT_INFORMATIVE) for r in p_rows):
            cold.append(i)
            concentrated.append(_concentrated(p_rows))
            need += [n for r in p_rows if (n := needed_sequences(r))]
        else:  # P is informative here; a row it cannot confirm says how many sequences would confirm it
            need += [f.data["needed_n"] for r in rows for f in r.flags
                     if f.code is Code.UNCONFIRMED and f.data.get("needed_n")]
        n_drawn += [r.n for r in p_rows if r.n]
        if any(_inconsistent(r, CONTRADICTED) for r in p_rows):
            disputed.append(i)
        few_cv |= any(r.has(Code.CV_TOO_FEW) for r in p_rows)
    per = {"per_prompt": multi, "n_prompts": len(per_prompt_rows)}
    if cold or need:
        why = "one_sequence" if cold and all(concentrated) else "too_few" if cold else "unconfirmed"
        return Advice("draw_more", {"needed_n": max(need) if need else None, "cold": cold, "why": why,
                                    "n_drawn": max(n_drawn, default=None), **per}, direction)
    if disputed:
        return Advice("disputed", direction=direction)
    if few_cv:
        return Advice("cv_too_few", {"needed_n": MIN_CV_SEQUENCES, **per}, direction)
    return Advice("all_flagged", direction=direction)


def judge_repeats(entries, n_repeats: int) -> dict:
    """Entries whose values are lists over `n_repeats` independent repeats (each repeat one run of every proposal,
    as in the toy Markov experiment) → {(proposal key, estimator): [Flag]}: each repeat judged by judge_rows exactly
    as an LLM run is, a code found in some repeats reported once, naming how many ("in 3 of 10 repeats: …")."""
    found: dict = {}
    for r in range(n_repeats):
        for row in judge_rows(entries, repeat=r):
            for f in row.flags:
                found.setdefault((row.proposal_key, str(row.estimator)), {}).setdefault(f.code, [f, 0])[1] += 1
    return {k: [Flag(code, {**first.data, "repeats": count, "n_repeats": n_repeats})
                for code, (first, count) in by_code.items()] for k, by_code in found.items()}


def table_rows(rows: list[Row], **tags) -> list[dict]:
    """Rows for CSV files and DataFrames: every field but the flag records (the short ``flag`` codes stay, and
    ``recommended``); `tags` (e.g. prompt=3) go first."""
    return [dict(tags, **r.to_dict(records=False)) for r in rows]


def from_records(rows: list[dict]) -> list[Row]:
    """Rows read back from summary.json (old folders' {code, message} flags included)."""
    return [Row.from_dict(r) for r in rows]
