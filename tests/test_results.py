"""Typed results (core/results.py): flags are data rendered in a direction's names, rows round-trip through
summary.json (old {code, message} records included), one pooling of prompt estimates, and advice from the actual
reason (issue 22: 8 draws, all distinct, were told "draw ≥ 2251 … P's draws are almost all one sequence")."""
import json
import math

import numpy as np
import pytest

from kl_estimation import runio, verdicts
from kl_estimation.core.estimators import Z95, t95
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.proposals import sequence_proposal
from kl_estimation.core.results import Advice, Code, Flag, Row, pool_prompts, render

P, GEO = sequence_proposal("P"), sequence_proposal("Geometric (β=0.5)")
AGAINST = {"proposal_key": "p", "estimator": "RB+CV", "estimate": 0.1, "std_error": 0.01}


def test_a_flag_is_said_in_each_directions_names():
    cases = [
        (Flag(Code.INCONSISTENT, {"test": "disagrees", "against": AGAINST, "z": 5.0}),
         "disagrees with P · RB+CV (0.1, SE 0.01) by 5.0 combined SEs",
         "disagrees with Q · RB+CV (0.1, SE 0.01) by 5.0 combined SEs"),
        (Flag(Code.K3_IDENTITY, {"mean": 0.5, "z": -4.0, "is_p": True}),
         "the sample mean of Q/P is 0.5", "the sample mean of P/Q is 0.5"),
        (Flag(Code.UNCOVERED_MASS, {"mass": 0.2}), "tokens with P > 0 (up to 0.2 of P's mass",
         "tokens with Q > 0 (up to 0.2 of Q's mass"),
        (Flag(Code.UNCONFIRMED, {"resolution": 0.067, "std_error": 0.012, "ratio": 0.5, "needed_n": 544}),
         "P's draws are not informative here and resolve only SE 0.067", "draw ≥ 544 sequences from Q to check it"),
    ]
    for flag, forward, reverse in cases:
        assert forward in render(flag) and forward in flag.message
        assert reverse in render(flag, "reverse")
    k3 = Row(P, Estimator.K3, 0.1, 0.01, direction="reverse", flags=(cases[1][0],))
    assert k3.proposal == "Q" and "P/Q" in k3.messages[0] and "P/Q" in k3.to_dict()["flags"][0]["message"]
    at = Flag(Code.SELF_NORMALIZED, {"prompts": [0, 2], "n_prompts": 3})
    assert render(at) == "prompts 0, 2 of 3: self-normalised: biased at O(1/n)"


def test_rows_round_trip_through_summary_json_and_old_records_still_load(tmp_path):
    flag = Flag(Code.INCONSISTENT, {"test": "more_precise", "against": AGAINST, "z": 4.5})
    row = Row.from_entry(GEO, "RB-IS", {"estimate": 0.2, "std_error": 0.05, "ci_low": 0.1, "ci_high": 0.3, "n": 64,
                                         "variance": 0.16, "ess": 30.0, "khat": 0.4}, flags=(flag,),
                         direction="reverse")
    runio.write_json(tmp_path / "s.json", {"rows": [row]})
    saved = json.loads((tmp_path / "s.json").read_text())["rows"][0]
    assert saved["flags"][0]["code"] == "INCONSISTENT" and "Q · RB+CV" in saved["flags"][0]["message"]
    back = Row.from_dict(saved)
    assert back == row and back.flags[0].data["z"] == 4.5 and back.khat == 0.4
    old = dict(saved, flags=[{"code": "KHAT", "message": "k̂ 0.90 > 0.7: weights too heavy-tailed to trust"}])
    old.pop("direction")
    back = Row.from_dict(old)
    assert back.flag == "KHAT" and back.messages == ["KHAT: k̂ 0.90 > 0.7: weights too heavy-tailed to trust"]
    assert back.direction == "forward" and back.proposal == "Geometric (β=0.5)"
    assert Row.from_dict(dict(saved, proposal="Q", proposal_key="p")).is_p  # an old reverse P row, named Q
    # NaN and ±inf are saved as None (strict JSON): the words still render (a mean read back as NaN)
    inf = [Flag(Code.INCONSISTENT, {"test": "disagrees", "against": AGAINST, "z": math.inf}),
           Flag(Code.WEIGHT_IDENTITY, {"mean": math.nan, "z": -math.inf}),
           Flag(Code.SAMPLE_VAR_COLLAPSE, {"ratio": math.inf}),
           Flag(Code.K3_IDENTITY, {"mean": math.nan, "z": math.inf})]
    runio.write_json(tmp_path / "f.json", inf)
    back = [Flag.from_dict(f) for f in json.loads((tmp_path / "f.json").read_text())]
    assert [render(f) for f in back] == [render(f) for f in inf]


def test_pool_prompts_is_the_mean_with_its_two_standard_errors():
    e, se = np.array([1.0, 2.0, 4.0]), np.array([0.1, 0.2, 0.2])
    p = pool_prompts(e, se)
    assert p["estimate"] == pytest.approx(7 / 3) and p["std_error"] == pytest.approx(0.3 / 3)
    assert p["std_error_population"] == pytest.approx(np.std(e, ddof=1) / math.sqrt(3))
    assert p["ci_low"] == pytest.approx(7 / 3 - Z95 * 0.1)
    assert p["ci_population_high"] == pytest.approx(7 / 3 + t95(2) * p["std_error_population"])
    assert math.isnan(pool_prompts([1.0], [0.1])["std_error_population"])


def _entry(est, se, n, n_distinct, modal):
    informative = n_distinct >= 10 and (1 - modal) * n >= 10
    return {"estimate": est, "std_error": se, "variance": se * se * n, "ess": 0.9 * n, "max_weight": 2.0,
            "khat": math.nan, "ci_low": est - 1.96 * se, "ci_high": est + 1.96 * se, "n": n, "prefix_weight_mean": 1.0,
            "prefix_weight_z": 0.0, "q_over_r_mean": 1.0, "q_over_r_z": 0.0, "n_distinct": n_distinct,
            "modal_share": modal, "top_weight_share": 0.2, "se_informative": informative}


def _docs(n, n_distinct, modal):
    p = {"proposal": "P", "estimates": {k: _entry(0.8, 0.3, n, n_distinct, modal) for k in ("MC", "RB", "RB+CV", "k3")}}
    # an IS row with a tiny SE: the UNCONFIRMED rule asks for thousands of sequences to confirm it
    q = {"proposal": "Adaptive",
         "estimates": {k: _entry(0.6, 0.006, n, n, 1 / n) for k in ("IS", "SNIS", "RB-IS", "RB-IS+CV", "k3-IS")}}
    return [p, q]


def test_advice_comes_from_the_actual_reason():
    out = verdicts.judge(_docs(8, 8, 1 / 8))  # 8 sequences, all distinct: too few, not one sequence
    advice = out["advice"]
    assert out["recommended"] is None and isinstance(advice, Advice) and advice.data["why"] == "too_few"
    text = str(advice)
    assert "almost all one sequence" not in text and "P's 8 draws are too few to show their spread" in text
    assert 10 <= advice.data["needed_n"] <= 30, text  # enough for ≥ 10 draws off the modal one, not 2251
    unconfirmed = [f for r in out["rows"] for f in r.flags if f.code is Code.UNCONFIRMED]
    assert unconfirmed and max(f.data["needed_n"] for f in unconfirmed) > 1000  # what confirming the IS row takes
    assert str(Advice(advice.kind, advice.data, "reverse")).startswith(f"draw ≥ {advice.data['needed_n']} "
                                                                      f"sequences from Q (Q's 8 draws")
    cold = verdicts.judge(_docs(64, 3, 0.97))  # P's draws almost all one sequence
    assert cold["advice"].data["why"] == "one_sequence" and "almost all one sequence" in str(cold["advice"])
    assert cold["advice"].data["needed_n"] >= 500


def test_an_old_summary_still_renders_for_figures():
    from types import SimpleNamespace

    from kl_estimation.figures.llm import recommendation_text

    old_rec = {"proposal": "P", "proposal_key": "p", "estimator": "RB+CV", "estimate": 0.7, "std_error": 0.05,
               "ci_low": 0.6, "ci_high": 0.8, "n": 400, "reason": "RB+CV (cross-fitted β) is the default",
               "recommended": True, "unit": "nats/sequence", "max_new_tokens": 20, "eos": True}
    old_row = dict(old_rec, flags=[{"code": "SELF_NORMALIZED", "message": "self-normalised: biased at O(1/n)"}],
                   flag="SELF_NORMALIZED", recommended=False)
    text = recommendation_text(SimpleNamespace(summary={"rows": [old_row], "recommended": old_rec, "per_prompt": []}))
    assert text.startswith("Recommended: P · RB+CV = 0.70 nats/sequence (SE 0.05") and "is the default" in text
    assert verdicts.from_records([old_row])[0].messages == ["SELF_NORMALIZED: self-normalised: biased at O(1/n)"]
