"""Estimates of a proposal's records: per prompt, and over the prompt set with its two standard errors."""
from __future__ import annotations

import math

import numpy as np

from kl_estimation.core.estimators import randomization_estimates, sequence_estimates
from kl_estimation.core.results import pool_prompts
from kl_estimation.llm.head import head_estimates
from kl_estimation.llm.run.store import records_to_arrays


def prompt_set_estimates(records: list[dict], max_new_tokens: int, n_prompts: int, proposal_is_p: bool,
                         groups=None, heads=None) -> dict:
    """Every estimator per prompt and over the prompt set (the mean of the per-prompt estimates).

    Returns ``estimates`` (overall; with one prompt exactly that prompt's) and, for several prompts, ``per_prompt``
    (a list of {prompt, n_sequences, estimates}). Overall ``std_error`` (and ``ci_low``/``ci_high``) is over this
    fixed prompt set, ``std_error_population`` over prompts drawn i.i.d. from a population (between-prompt spread
    included; NaN for m = 1), with a Student-t interval ``ci_population_low``/``ci_population_high`` on m − 1 degrees
    of freedom (a normal one covers about 0.89 at m = 8): core.results.pool_prompts.
    `groups` (one unit index per record, for samplers with dependent rows): per-prompt SEs from the spread between
    units (estimators.randomization_estimates), never from the spread of the sequences.
    `heads` {prompt: head.Head}: at those prompts the records are a head's remainder (they carry ``log_p_cond``)
    and the estimates are the head's (head.head_estimates: MC, RB, RB+CV only); the overall rows are the
    estimators every prompt has.
    """
    by_prompt = [[r for r in records if r.get("prompt", 0) == i] for i in range(n_prompts)]
    prompt_of = np.array([r.get("prompt", 0) for r in records])
    per = []
    for i, recs in enumerate(by_prompt):
        a = records_to_arrays(recs, max_new_tokens)
        args = (a["log_p"], a["log_q"], a["log_r"], a["kl_step"], a["mask"], proposal_is_p)
        if heads and i in heads and "log_p_cond" in a:
            per.append(head_estimates(heads[i], a, proposal_is_p))
        else:
            per.append(sequence_estimates(*args) if groups is None else
                       randomization_estimates(*args, np.asarray(groups)[prompt_of == i]))
    if n_prompts == 1:
        only = {k: dict(v, std_error_population=math.nan) for k, v in per[0].items()}
        return {"estimates": only}
    overall = {}
    for est in (k for k in per[0] if all(k in p for p in per)):  # a head's prompts have MC, RB, RB+CV only
        pooled = pool_prompts([p[est]["estimate"] for p in per], [p[est]["std_error"] for p in per])
        overall[est] = {k: pooled[k] for k in ("estimate", "std_error", "std_error_population", "ci_population_low",
                                               "ci_population_high")}
        overall[est].update(variance=float(np.mean([p[est]["variance"] for p in per])),
                            ess=float(np.sum([p[est]["ess"] for p in per])),
                            max_weight=float(np.max([p[est]["max_weight"] for p in per])),
                            khat=max((k for p in per if np.isfinite(k := p[est]["khat"])), default=math.nan),
                            ci_low=pooled["ci_low"], ci_high=pooled["ci_high"], n=len(records))
    if groups is not None:
        for est in overall:
            overall[est]["std_error_method"] = per[0][est]["std_error_method"] + ", per prompt, combined over prompts"
    return {"estimates": overall,
            "per_prompt": [dict(prompt=i, n_sequences=len(recs), estimates=p)
                           for i, (recs, p) in enumerate(zip(by_prompt, per))]}
