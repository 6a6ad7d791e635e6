r"""The directions of a run in its outputs: verdicts in each direction's own names, and the Jeffreys row of a run of
both directions.

A direction is judged by verdicts.judge exactly as a forward run is, in the *sampling frame*: proposal "P" is plain
Monte Carlo from the sampling model and "Q" the other model (engine.SwappedPair). :func:`relabel` then writes the
reverse verdicts in the reverse direction's names: the plain Monte Carlo rows are proposal "Q" (sequences from Q),
and in the flags and reasons P and Q trade places ("disagrees with Q RB+CV", "the sample mean of P/Q"), so that
nothing a reader sees on a reverse row speaks of P where Q is meant. Every row gets ``direction``.

The Jeffreys divergence J = KL(P‖Q) + KL(Q‖P), in nats per sequence: the sum of the two directions' recommended
estimates; the directions' sequences are drawn independently (different streams), so SE_J = √(SE_f² + SE_r²). For
a prompt set the population SE comes from the per-prompt sums J_i of the same two rows (the directions share the
prompts, so their per-prompt estimates covary and the two population SEs do not add in quadrature). Where a
direction has no recommendation, its row of the same estimator (and proposal) as the other direction's
recommendation stands in and the Jeffreys row is flagged; where no such row exists the estimate is NaN.
"""
from __future__ import annotations

import math
import re

import numpy as np

from kl_estimation.core.estimators import Z95, t95
from kl_estimation.llm.engine import FORWARD, P_NAME, REVERSE, SAMPLED_FROM, TARGET, proposal_label
from kl_estimation.verdicts.flags import Flag

BOTH = "both"
UNIT = "nats per sequence"
JEFFREYS_TARGET = f"{TARGET[FORWARD]} + {TARGET[REVERSE]}"
_LETTER = re.compile(r"(?<![A-Za-z0-9_])[PQ](?![A-Za-z0-9_])")
TEXT_FIELDS = ("flags", "reason")  # words to relabel; ``flag`` holds codes only


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


def swap_roles(text: str) -> str:
    """P ↔ Q where they stand as model names ("P's RB+CV", "Q/P", "P > 0"), not inside words or "P_t"."""
    return _LETTER.sub(lambda m: "Q" if m[0] == "P" else "P", text)


def _swap_any(x):
    if isinstance(x, str):
        return swap_roles(x)
    if isinstance(x, list):
        return [_swap_any(v) for v in x]
    if isinstance(x, Flag):  # its message, not its code
        return Flag(x.code, swap_roles(x.message))
    if isinstance(x, dict):  # a flag as a JSON record, likewise
        return {k: v if k == "code" else _swap_any(v) for k, v in x.items()}
    return x


def relabel_row(row: dict | None, direction: str) -> dict | None:
    """A row (or recommendation) judged in the sampling frame, in `direction`'s names, with ``direction``."""
    if row is None:
        return None
    out = {"direction": direction, **row}
    out["direction"] = direction
    if direction == REVERSE:
        out["proposal"] = proposal_label(row["proposal"], direction)
        for k in TEXT_FIELDS:
            if k in out:
                out[k] = _swap_any(out[k])
    return out


def relabel(verdict: dict, direction: str) -> dict:
    """verdicts.judge's output for one direction in that direction's names (see the module doc)."""
    def advice(x):
        return _swap_any(x) if direction == REVERSE else x

    return dict(verdict, rows=[relabel_row(r, direction) for r in verdict["rows"]],
                recommended=relabel_row(verdict["recommended"], direction), advice=advice(verdict.get("advice")),
                per_prompt=[dict(p, rows=[relabel_row(r, direction) for r in p["rows"]],
                                 recommended=relabel_row(p["recommended"], direction),
                                 advice=advice(p.get("advice")))
                            for p in verdict["per_prompt"]])


def _key(row: dict, direction: str) -> tuple[str, str]:
    """(proposal as configured, estimator): the same estimator in both directions ("Q" in reverse is "P")."""
    name = P_NAME if row["proposal"] == SAMPLED_FROM[direction] else row["proposal"]
    return name, row["estimator"]


def _find(rows: list[dict], key: tuple, direction: str) -> dict | None:
    return next((r for r in rows if _key(r, direction) == key), None)


def _sides(rows: dict, recommended: dict) -> tuple[dict, list[str]]:
    """Per direction the row entering the sum (the recommendation, else the stand-in) and the flags."""
    chosen, flags = {}, []
    for d in (FORWARD, REVERSE):
        if recommended[d] is not None:
            chosen[d] = recommended[d]
            continue
        other = recommended[REVERSE if d == FORWARD else FORWARD]
        key = _key(other, REVERSE if d == FORWARD else FORWARD) if other is not None else (P_NAME, "RB+CV")
        stand_in = _find(rows[d], key, d)
        chosen[d] = stand_in
        what = f"{d} {TARGET[d]} has no trusted estimate"
        if stand_in is None:
            flags.append(f"{what} and no {proposal_label(key[0], d)} {key[1]} row")
        else:
            flags.append(f"{what}; its {stand_in['proposal']} {stand_in['estimator']} is used, flagged: "
                         f"{stand_in.get('flag') or 'not recommended'}")
    return chosen, flags


def jeffreys_row(rows: dict, recommended: dict, per_prompt_rows: list[dict] | None = None) -> dict:
    """The Jeffreys row from {direction: ranked rows} and {direction: recommendation or None} (relabelled, as
    :func:`relabel` returns them). `per_prompt_rows` (prompt sets): [{direction: rows}] per prompt, for the
    population SE over prompts."""
    chosen, flags = _sides(rows, recommended)
    f, r = chosen[FORWARD], chosen[REVERSE]
    ok = f is not None and r is not None
    est = f["estimate"] + r["estimate"] if ok else math.nan
    se = math.hypot(f["std_error"], r["std_error"]) if ok else math.nan
    out = dict(direction=BOTH, proposal=" + ".join(f"{d} {c['proposal'] if c else '—'}" for d, c in chosen.items()),
               estimator=" + ".join(c["estimator"] if c else "—" for c in chosen.values()), estimate=est,
               std_error=se, ci_low=est - Z95 * se, ci_high=est + Z95 * se, std_error_population=math.nan,
               flag="; ".join(flags), target=JEFFREYS_TARGET, unit=UNIT,
               se_method="√(SE_forward² + SE_reverse²): the directions' sequences are independent",
               **{d: None if c is None else {k: c[k] for k in ("proposal", "estimator", "estimate", "std_error")}
                  for d, c in chosen.items()})
    if ok and per_prompt_rows:
        sums = []
        for p in per_prompt_rows:
            a, b = _find(p[FORWARD], _key(f, FORWARD), FORWARD), _find(p[REVERSE], _key(r, REVERSE), REVERSE)
            sums.append(math.nan if a is None or b is None else a["estimate"] + b["estimate"])
        m = len(sums)
        if m > 1 and all(math.isfinite(s) for s in sums):
            se_pop = float(np.std(sums, ddof=1) / math.sqrt(m))
            half = t95(m - 1)
            out.update(std_error_population=se_pop, ci_population_low=est - half * se_pop,
                       ci_population_high=est + half * se_pop)
    return out


def jeffreys(by_direction: dict) -> tuple[dict, list[dict]]:
    """The overall Jeffreys row and one per prompt (prompt sets; else []) from {direction: relabelled verdict}."""
    fwd, rev = by_direction[FORWARD], by_direction[REVERSE]
    per_prompt = [{FORWARD: a["rows"], REVERSE: b["rows"]} for a, b in zip(fwd["per_prompt"], rev["per_prompt"])]
    overall = jeffreys_row({FORWARD: fwd["rows"], REVERSE: rev["rows"]},
                           {FORWARD: fwd["recommended"], REVERSE: rev["recommended"]}, per_prompt)
    prompts = [dict(jeffreys_row({FORWARD: a["rows"], REVERSE: b["rows"]},
                                 {FORWARD: a["recommended"], REVERSE: b["recommended"]}), prompt=a["prompt"])
               for a, b in zip(fwd["per_prompt"], rev["per_prompt"])]
    return overall, prompts
