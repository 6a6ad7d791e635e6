r"""The directions of a run in its outputs, and the Jeffreys row of a run of both directions.

A direction is judged by verdicts.judge exactly as a forward run is, in the *sampling frame*: proposal "P" is plain
Monte Carlo from the sampling model and "Q" the other model (engine.SwappedPair). Each row carries its direction
(core.results.Row), so a reverse row is said in the reverse direction's names where it is rendered: its plain Monte
Carlo rows are proposal "Q" (sequences from Q), and its flags and reasons speak of Q where the sampling model is meant
("disagrees with Q · RB+CV", "the sample mean of P/Q"). Nothing rewrites a message.

The Jeffreys divergence J = KL(P‖Q) + KL(Q‖P), in nats per sequence: the sum of the two directions' recommended
estimates; the directions' sequences are drawn independently (different streams), so SE_J = √(SE_f² + SE_r²). For
a prompt set the population SE comes from the per-prompt sums J_i of the same two rows (the directions share the
prompts, so their per-prompt estimates covary and the two population SEs do not add in quadrature). Where a
direction has no recommendation, its row of the same estimator (and proposal) as the other direction's
recommendation stands in and the Jeffreys row is flagged; where no such row exists the estimate is NaN.
"""
from __future__ import annotations

import math

from kl_estimation.core.estimators import Z95, t95
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.proposals import FORWARD, P_KEY, REVERSE, SAMPLED_FROM, TARGET, proposal_label
from kl_estimation.core.results import Row, pool_prompts

BOTH = "both"
UNIT = "nats per sequence"
JEFFREYS_TARGET = f"{TARGET[FORWARD]} + {TARGET[REVERSE]}"


def direction_title(direction: str) -> str:
    """"KL(P‖Q) forward: sequences from P" / "KL(Q‖P) reverse: sequences from Q"."""
    return f"{TARGET[direction]} {direction}: sequences from {SAMPLED_FROM[direction]}"


def recommendation_scope(direction: str, n_directions: int, prompt=None) -> str:
    """What a recommendation line is for: "" for a plain forward run (its line reads as before), else the
    direction's target, and the prompt where there is one."""
    where = [] if prompt is None else [f"prompt {prompt}"]
    if n_directions > 1 or direction != FORWARD:
        where.append(f"{TARGET[direction]} ({direction})")
    return f"for {', '.join(where)}" if where else ""


def _key(row: Row) -> tuple[str, str]:
    """(proposal key, estimator): the same estimator in both directions (plain Monte Carlo is key "p" in both)."""
    return row.proposal_key, str(row.estimator)


def _find(rows: list[Row], key: tuple) -> Row | None:
    return next((r for r in rows if _key(r) == key), None)


def _sides(rows: dict, recommended: dict) -> tuple[dict, list[str]]:
    """Per direction the row entering the sum (the recommendation, else the stand-in) and the flags."""
    chosen, flags = {}, []
    for d in (FORWARD, REVERSE):
        if recommended[d] is not None:
            chosen[d] = recommended[d]
            continue
        other = recommended[REVERSE if d == FORWARD else FORWARD]
        key = _key(other) if other is not None else (P_KEY, str(Estimator.RB_CV))
        stand_in = _find(rows[d], key)
        chosen[d] = stand_in
        what = f"{d} {TARGET[d]} has no trusted estimate"
        if stand_in is None:
            flags.append(f"{what} and no {proposal_label(key[0], d)} {key[1]} row")
        else:
            flags.append(f"{what}; its {stand_in.proposal} {stand_in.estimator} is used, flagged: "
                         f"{stand_in.flag or 'not recommended'}")
    return chosen, flags


def jeffreys_row(rows: dict, recommended: dict, per_prompt_rows: list[dict] | None = None) -> dict:
    """The Jeffreys row from {direction: ranked Rows} and {direction: recommended Row or None}. `per_prompt_rows`
    (prompt sets): [{direction: rows}] per prompt, for the population SE over prompts (core.results.pool_prompts
    of the per-prompt sums)."""
    chosen, flags = _sides(rows, recommended)
    f, r = chosen[FORWARD], chosen[REVERSE]
    ok = f is not None and r is not None
    est = f.estimate + r.estimate if ok else math.nan
    se = math.hypot(f.std_error, r.std_error) if ok else math.nan
    out = dict(direction=BOTH, proposal=" + ".join(f"{d} {c.proposal if c else '—'}" for d, c in chosen.items()),
               estimator=" + ".join(str(c.estimator) if c else "—" for c in chosen.values()), estimate=est,
               std_error=se, ci_low=est - Z95 * se, ci_high=est + Z95 * se, std_error_population=math.nan,
               flag="; ".join(flags), target=JEFFREYS_TARGET, unit=UNIT,
               se_method="√(SE_forward² + SE_reverse²): the directions' sequences are independent",
               **{d: None if c is None else {"proposal": c.proposal, "estimator": str(c.estimator),
                                             "estimate": c.estimate, "std_error": c.std_error}
                  for d, c in chosen.items()})
    if ok and per_prompt_rows:
        sums = []
        for p in per_prompt_rows:
            a, b = _find(p[FORWARD], _key(f)), _find(p[REVERSE], _key(r))
            sums.append(math.nan if a is None or b is None else a.estimate + b.estimate)
        if len(sums) > 1 and all(math.isfinite(s) for s in sums):
            se_pop = pool_prompts(sums, [0.0] * len(sums))["std_error_population"]
            half = t95(len(sums) - 1)
            out.update(std_error_population=se_pop, ci_population_low=est - half * se_pop,
                       ci_population_high=est + half * se_pop)
    return out


def jeffreys(by_direction: dict) -> tuple[dict, list[dict]]:
    """The overall Jeffreys row and one per prompt (prompt sets; else []) from {direction: verdict}."""
    fwd, rev = by_direction[FORWARD], by_direction[REVERSE]
    per_prompt = [{FORWARD: a["rows"], REVERSE: b["rows"]} for a, b in zip(fwd["per_prompt"], rev["per_prompt"])]
    overall = jeffreys_row({FORWARD: fwd["rows"], REVERSE: rev["rows"]},
                           {FORWARD: fwd["recommended"], REVERSE: rev["recommended"]}, per_prompt)
    prompts = [dict(jeffreys_row({FORWARD: a["rows"], REVERSE: b["rows"]},
                                 {FORWARD: a["recommended"], REVERSE: b["recommended"]}), prompt=a["prompt"])
               for a, b in zip(fwd["per_prompt"], rev["per_prompt"])]
    return overall, prompts
