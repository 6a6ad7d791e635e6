"""Issue 19, the recommendation's safety: pairs whose first step is near-deterministic (P(EOS first) 0.9–0.98) and
whose rare continuations carry the KL — the case where P's draws are (nearly) all the same sequence and an
importance-sampling row's own SE is all there is. Property, with fixed seeds: the recommended estimate always lies
within 5 of its SEs of the exact KL (by DP over the toy Markov tables, checked against enumeration), and nothing is
recommended on the strength of an SE that nothing in the run can confirm.

The pairs are order-1 Markov tables run through the LLM sampler and the LLM verdicts (the same start/step interface
as a transformers pair): at t = 0 both models end at once with probability `eos_first` and agree on it; later rows
differ strongly (Gaussian noise of σ = 2 on the logits), so the KL lives in the continuations.
"""
import math

import numpy as np
import pytest

from kl_estimation import report, verdicts
from kl_estimation.core.estimators import sequence_estimates
from kl_estimation.llm import engine, enumeration
from kl_estimation.toy import markov as sq
from kl_estimation.verdicts import Code

TOL_SE = 5.0
EOS_FIRST = (0.9, 0.95, 0.98)
SEEDS = range(12)
NS = (64, 256, 1000)
PROPOSALS = ("P", "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)", "Exponential family (β=0.5)",
             "Adaptive", "Adaptive [prefix-aware]", "Exponential family (β=5)")
SUMMARY: dict = {}


def near_deterministic_pair(seed: int, eos_first: float, V: int = 6, T: int = 4, sigma: float = 2.0):
    """Order-1 tables over V tokens (0 = EOS), horizon T: P(EOS at t = 0) = Q(EOS at t = 0) = eos_first."""
    rng = np.random.default_rng(seed)
    S = V + 1
    lp = rng.normal(0, 1.5, size=(T, S, V))
    lp[..., 0] += 0.5
    lq = lp + rng.normal(0, sigma, size=(T, S, V))
    lp, lq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (lp, lq))
    start = S - 1
    for table in (lp, lq):
        rest = table[0, start, 1:] - np.logaddexp.reduce(table[0, start, 1:])
        table[0, start, 0] = math.log(eos_first)
        table[0, start, 1:] = math.log1p(-eos_first) + rest
    return sq.MarkovTables(lp, lq, 1, "near-deterministic", f"eos={eos_first}")


def run_setting(tables, n, seed, proposals=PROPOSALS):
    pair = sq.MarkovPair(tables)
    docs = []
    for name in proposals:
        prop = engine.sequence_proposal(name)
        b = engine.sample_batch(pair, prop, n, tables.shape[0], engine.unit_generator(seed, prop, 0, "cpu"))
        docs.append(dict(proposal=name, max_uncovered_mass=float(b.uncovered.max(initial=0.0)),
                         estimates=sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, prop.is_p)))
    return verdicts.judge(docs)


@pytest.fixture(scope="module")
def grid():
    cells, recs = [], []
    for eos in EOS_FIRST:
        for seed in SEEDS:
            tables = near_deterministic_pair(seed, eos)
            kl = sq.exact_values(tables).kl
            for n in NS:
                judged = run_setting(tables, n, seed=1000 * seed + n)
                setting = f"eos_first={eos} seed={seed} n={n}"
                for r in judged["rows"]:
                    z = abs(r["estimate"] - kl) / r["std_error"] if r["std_error"] and r["std_error"] > 0 else math.inf
                    cells.append(dict(r, setting=setting, kl=kl, z=z))
                rec = judged["recommended"]
                recs.append((setting, kl, rec, judged["advice"] and str(judged["advice"])))
    unflagged = [c for c in cells if not c["flag"]]
    SUMMARY.update(settings=len(recs), cells=len(cells), flagged=len(cells) - len(unflagged), unflagged=len(unflagged),
                   unflagged_outside_5se=sum(c["z"] > TOL_SE for c in unflagged),
                   unflagged_outside_5se_not_k3=sum(c["z"] > TOL_SE and not c["estimator"].startswith("k3")
                                                    for c in unflagged),
                   recommended=sum(r is not None for _, _, r, _ in recs),
                   recommended_outside_5se=sum(r is not None and abs(r["estimate"] - kl) > TOL_SE * r["std_error"]
                                               for _, kl, r, _ in recs))
    print("\nnear-deterministic grid:", SUMMARY)
    return dict(cells=cells, recs=recs)


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_the_recommended_estimate_is_always_within_5_se(grid):
    bad = [(s, rec["proposal"], rec["estimator"], rec["estimate"], rec["std_error"], kl)
           for s, kl, rec, _ in grid["recs"]
           if rec is not None and abs(rec["estimate"] - kl) > TOL_SE * rec["std_error"]]
    assert not bad, bad


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_unflagged_estimates_are_right_and_the_grid_says_something(grid):
    s = SUMMARY
    assert s["settings"] == len(EOS_FIRST) * len(SEEDS) * len(NS) and s["cells"] > 2000
    outside = [(c["setting"], c["proposal"], c["estimator"], c["estimate"], c["std_error"], c["kl"])
               for c in grid["cells"] if not c["flag"] and c["z"] > TOL_SE]
    # k3 / k3-IS rows (never recommended: their terms grow like Q/P) may be off unflagged, rarely; no other row is
    assert s["unflagged_outside_5se_not_k3"] == 0, outside
    assert s["unflagged_outside_5se"] <= 0.005 * s["unflagged"], outside
    assert s["recommended"] >= 0.6 * s["settings"]  # a few hundred sequences usually give an answer
    at_1000 = [r for setting, _, r, _ in grid["recs"] if setting.endswith("n=1000")]
    assert sum(r is not None for r in at_1000) >= 0.85 * len(at_1000)


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_where_nothing_is_recommended_the_advice_says_what_to_change(grid):
    nothing = [(s, a) for s, _, rec, a in grid["recs"] if rec is None]
    assert nothing and all(a for _, a in nothing)
    assert any("sequences from P" in a for _, a in nothing)


def test_the_dp_and_enumeration_agree_on_a_near_deterministic_pair():
    tables = near_deterministic_pair(0, 0.95)
    leaves = enumeration.enumerate_sequences(sq.MarkovPair(tables), engine.sequence_proposal("P"), tables.shape[0])
    assert leaves["kl"] == pytest.approx(sq.exact_values(tables).kl, rel=1e-9)
    p_eos_first = math.exp(tables.log_p[0, tables.start_state, 0])
    assert p_eos_first == pytest.approx(0.95)


# ------------------------------------------------------------------------------------------------ the issue's case

def _entry(est, se, n=64, informative=True, **kw):
    return dict(dict(estimate=est, std_error=se, variance=se * se * n, ess=0.9 * n, max_weight=1.0, khat=math.nan,
                     ci_low=est - 1.96 * se, ci_high=est + 1.96 * se, n=n, prefix_weight_mean=1.0,
                     prefix_weight_z=0.0, q_over_r_mean=1.0, q_over_r_z=0.0,
                     n_distinct=40 if informative else 3, modal_share=0.3 if informative else 0.97,
                     top_weight_share=0.05, se_informative=informative), **kw)


def issue_docs():
    """SmolLM2-135M-Instruct Q4_1 vs Q4_0 at prompt 3 (issue 19): 64 sequences, ~97 % of P's draws end at once, so
    every P row is "SE not informative"; Alpha-mixture (α=0.5) k3-IS read 0.0231 ± 0.012 and P's MC 0.108 ± 0.067;
    a 1024-sequence run from P gives 0.218 ± 0.046."""
    cold = dict(informative=False)
    p = dict(proposal="P", estimates={"MC": _entry(0.108, 0.067, **cold), "RB": _entry(0.150, 0.050, **cold),
                                      "RB+CV": _entry(0.140, 0.048, **cold), "k3": _entry(0.09, 0.05, **cold)})
    alpha = dict(proposal="Alpha-mixture (α=0.5)",
                 estimates={"IS": _entry(0.031, 0.016), "SNIS": _entry(0.030, 0.016), "RB-IS": _entry(0.026, 0.013),
                            "RB-IS+CV": _entry(0.025, 0.013), "k3-IS": _entry(0.0231141, 0.012)})
    return [p, alpha]


def test_the_issue_case_is_not_recommended_and_says_how_many_sequences_from_p():
    out = verdicts.judge(issue_docs())
    rows = {(r["proposal"], r["estimator"]): r for r in out["rows"]}
    k3 = rows[("Alpha-mixture (α=0.5)", "k3-IS")]
    assert k3["flag"] == "UNCONFIRMED", k3["flags"]  # consistent with P's MC (1.3 SE) yet far below what P resolves
    assert "P's draws are not informative here and resolve only SE 0.067" in k3["flags"][0].message
    assert out["recommended"] is None
    n = out["advice"].data["needed_n"]
    assert 400 <= n <= 1100 and str(out["advice"]).startswith(f"draw ≥ {n} sequences from P")  # 1024 resolved it
    line = report.recommendation_line(out["recommended"], advice=out["advice"])
    assert line.startswith("Recommended: none — draw ≥ ")
    # the real follow-up: 1024 sequences from P are informative and P's RB says 0.218 ± 0.046 — the IS row is then
    # inconsistent with it (4.1 combined SEs) and flagged for that
    warm = issue_docs()
    warm[0]["estimates"] = {k: _entry(0.218, 0.046, n=1024) for k in ("MC", "RB", "RB+CV", "k3")}
    rows = {(r["proposal"], r["estimator"]): r for r in verdicts.judge(warm)["rows"]}
    assert "INCONSISTENT" in rows[("Alpha-mixture (α=0.5)", "k3-IS")]["flag"]


def test_an_is_row_as_coarse_as_p_can_still_be_judged_when_p_is_cold():
    """The rule is about confirmation, not about IS as such: an IS row whose SE is not far below what P resolves
    is checked against P as before (here it agrees, and it is recommended)."""
    docs = issue_docs()
    docs[1]["estimates"] = {k: _entry(0.15, 0.04, n=1000) for k in ("IS", "SNIS", "RB-IS", "RB-IS+CV", "k3-IS")}
    out = verdicts.judge(docs)
    assert out["recommended"] is not None and out["recommended"]["proposal"] == "Alpha-mixture (α=0.5)"
    assert not any(f.code is Code.UNCONFIRMED for r in out["rows"] for f in r["flags"])


# ------------------------------------------------------------------------------------------------ prompt sets

def _prompt_set_docs(n=64, m=6, cold=(3,), proposals=("P", "Alpha-mixture (α=0.5)")):
    """A prompt set of m toy pairs (one per prompt; prompt 3 near-deterministic), n sequences each, through the run
    layer's records and prompt-set estimates."""
    from kl_estimation.llm.run.aggregate import prompt_set_estimates
    from kl_estimation.llm.run.units import batch_records

    tables = [near_deterministic_pair(i, 0.98 if i in cold else 0.3) for i in range(m)]
    docs = []
    for name in proposals:
        prop = engine.sequence_proposal(name)
        records = []
        for i, tb in enumerate(tables):
            pair = sq.MarkovPair(tb)
            b = engine.sample_batch(pair, prop, n, tb.shape[0], engine.unit_generator(7, prop, 0, "cpu", i))
            records += batch_records(b, pair.decode, prompt=np.full(n, i), batch=np.zeros(n, int))
        docs.append(dict(proposal=prop.label, proposal_key=prop.key, max_uncovered_mass=0.0,
                         config={"max_new_tokens": 4},
                         truncation="KL of the sequence process truncated at 4 tokens or at EOS",
                         **prompt_set_estimates(records, 4, m, prop.is_p)))
    return docs, [sq.exact_values(tb).kl for tb in tables]


def test_a_few_hundred_sequences_over_a_prompt_set_with_one_cold_prompt_give_an_answer():
    docs, truth = _prompt_set_docs()
    out = verdicts.judge(docs)
    assert all(r["flag"] for r in out["rows"])  # prompt 3 flags every overall row …
    rec = out["recommended"]  # … but the informative prompts still give an answer, saying what it covers
    assert rec is not None and 3 not in rec["prompts_covered"] and len(rec["prompts_covered"]) >= 3
    assert rec["covers"].startswith(f"prompts {', '.join(map(str, rec['prompts_covered']))}")
    assert "prompt 3:" in rec["covers"] and "not over all 6" in rec["covers"]
    target = np.mean([truth[i] for i in rec["prompts_covered"]])
    assert abs(rec["estimate"] - target) <= TOL_SE * rec["std_error"]
    # 64 < 100 sequences per prompt: RB+CV cannot be fitted, RB takes its place wherever P is the default
    assert all(p["recommended"]["estimator"] != "RB+CV" for p in out["per_prompt"] if p["recommended"])
    block = report.recommendation_block(out, columns=120)
    assert "Recommended over prompts " in block and "prompt 3: none" in block


def test_nothing_recommendable_over_a_prompt_set_says_what_to_change():
    docs, _ = _prompt_set_docs(n=64, m=3, cold=(0, 1, 2))
    out = verdicts.judge(docs)
    if out["recommended"] is None:
        assert str(out["advice"]).startswith("draw ≥ ") and "per prompt from P" in str(out["advice"])
    assert all(p["advice"] for p in out["per_prompt"] if p["recommended"] is None)


def test_texts_that_contradicted_themselves():
    from kl_estimation.verdicts.checks import sample_flags

    # a weight mean that is not 1 must never print as 1 (the issue: "is 1 where it must be 1 (+inf SE from 1)")
    f = sample_flags("RB-IS", _entry(0.1, 0.01, prefix_weight_mean=0.99995, prefix_weight_z=-math.inf), is_p=False)
    msg = next(x.message for x in f if x.code is Code.WEIGHT_IDENTITY)
    assert "is 0.99995 where it must be 1" in msg and "inf" not in msg
    # "(the run has no P-based RB+CV)" when it had one that was flagged
    docs = issue_docs()
    docs[0]["estimates"] = {k: _entry(0.15, 0.05, n=64) for k in ("MC", "RB", "RB+CV", "k3")}
    docs[0]["estimates"]["RB"] = _entry(0.15, 0.05, n=64, prefix_weight_mean=1.0)
    docs[1]["estimates"] = {k: _entry(0.15, 0.02, n=1000) for k in ("IS", "SNIS", "RB-IS", "RB-IS+CV", "k3-IS")}
    out = verdicts.judge(docs)
    assert "has no" not in out["recommended"]["reason"]
