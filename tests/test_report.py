"""Console output of an LLM run: the table fits the terminal, numbers are shown to the digits their SE supports, ESS
has one unit, the recommended row is marked, and the recommendation says its unit and which interval is which."""
import csv
import json
import math
import re
import warnings
from dataclasses import replace

import numpy as np
import pytest

from kl_estimation import report, verdicts


def _entry(est, se, n=1000, **kw):
    return dict(dict(estimate=est, std_error=se, variance=se * se * n, ess=0.8 * n, max_weight=1.0, khat=math.nan,
                     ci_low=est - 1.96 * se, ci_high=est + 1.96 * se, n=n, prefix_weight_mean=1.0,
                     prefix_weight_z=0.0, q_over_r_mean=1.0, q_over_r_z=0.0, n_distinct=500, modal_share=0.01,
                     top_weight_share=0.001, se_informative=True), **kw)


def _docs(long_names=False):
    names = ["P", "Exponential family (β=0.5) [prefix-aware]" if long_names else "Geometric (β=0.5)",
             "Alpha-mixture (α=0.5) [prefix-aware]", "Chi-square aware (α=0.7)"]
    docs = [dict(proposal="P", estimates={"MC": _entry(10.5, 0.156), "SNIS": _entry(10.5, 0.156),
                                          "RB": _entry(10.697, 0.081), "RB+CV": _entry(10.7038, 0.0803),
                                          "k3": _entry(9.578, 0.154, q_over_r_mean=0.07, q_over_r_z=-27.0)})]
    for i, name in enumerate(names[1:]):  # the first has degenerate weights (and an IS SE far below the others')
        bad = dict(prefix_weight_mean=0.3, prefix_weight_z=-40.0, khat=0.88) if i == 0 else dict(khat=0.2)
        docs.append(dict(proposal=name, estimates={e: _entry(10.6 + 0.01 * i, 8.5e-05 if e == "IS" and i == 0
                                                             else 0.3, **bad)
                                                   for e in ("IS", "SNIS", "RB-IS", "RB-IS+CV", "k3-IS")}))
    return docs


@pytest.mark.parametrize("columns", [80, 120, 200])
def test_the_table_fits_the_terminal(columns):
    out = verdicts.judge(_docs(long_names=True))
    text = report.llm_table(out["rows"], "KL(P‖Q) per sequence, 1000 sequences × 4 proposals, T=20", columns)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= columns, max(lines, key=len)
    head = lines[1]
    assert "estimate" in head and "SE" in head and "flag" in head
    if columns >= 120:
        assert "95% CI" in head and "ESS" in head and "k̂" in head
    if columns == 200:  # room for the full names
        assert "Exponential family (β=0.5) [prefix-aware]" in text.split("! flagged")[0]


def test_the_table_uses_the_terminal_width_when_not_told(monkeypatch):
    import os

    monkeypatch.setattr(report.shutil, "get_terminal_size", lambda fallback=(120, 24): os.terminal_size((90, 30)))
    text = report.llm_table(verdicts.judge(_docs())["rows"], "t")
    assert max(len(ln) for ln in text.splitlines()) <= 90
    monkeypatch.setattr(report.shutil, "get_terminal_size", lambda fallback=(120, 24): os.terminal_size((40, 30)))
    assert max(len(ln) for ln in report.llm_table(verdicts.judge(_docs())["rows"], "t").splitlines()) <= 80


def test_digits_follow_the_se_and_the_se_column_has_one_format():
    assert report.se_decimals(0.08) == 2 and report.se_decimals(0.0803) == 2  # 803: one significant digit
    assert report.se_decimals(0.012) == 3 and report.se_decimals(0.354) == 2  # 120, 354: two significant digits
    assert report.se_decimals(0.096) == 2  # 960 rounds up to 0.10
    assert report.se_decimals(23.0) == 0 and report.se_decimals(0.0) is None and report.se_decimals(math.nan) is None
    assert report.estimate_text(10.7038, 0.0803) == ("10.70", "0.08")
    assert report.estimate_text(9.251, 0.62) == ("9.3", "0.6")
    rows = verdicts.judge(_docs())["rows"]
    text = report.llm_table(rows, "t", 200)
    body = [ln for ln in text.splitlines()[2:] if ln[:4].strip().rstrip("*").isdigit()]
    se_cells = [ln.split()[ln.split().index(r["estimator"]) + 2] for ln, r in zip(body, rows)]
    assert "8.50e-05" not in text and all("e" not in c for c in se_cells), se_cells  # fixed point throughout
    assert "[10.55, 10.86]" in text  # the CI to the estimate's decimals: not ragged


def test_ess_is_a_percentage_of_the_sequences_drawn_everywhere():
    rows = verdicts.judge(_docs())["rows"]
    text = report.llm_table(rows, "t", 200)
    assert " 80%" in text and "ESS: Kish effective sample size, % of the sequences drawn" in text
    assert report.ess_pct(dict(ess=250.0, n=1000)) == 25.0


def test_the_recommended_row_is_marked_and_has_a_column():
    out = verdicts.judge(_docs())
    rec = [r for r in out["rows"] if r["recommended"]]
    assert len(rec) == 1 and (rec[0]["proposal"], rec[0]["estimator"]) == ("P", "RB+CV")
    text = report.llm_table(out["rows"], "t", 120)
    assert text.splitlines()[2].lstrip().startswith("1*") and "* recommended" in text
    table = verdicts.table_rows(out["rows"])
    assert all("flags" not in r and "recommended" in r for r in table)


def test_the_recommendation_line_says_its_unit_and_labels_the_se():
    rec = verdicts.judge(_docs())["recommended"]
    rec = replace(rec, details={**rec.details, "max_new_tokens": 20, "eos": True})
    line = report.recommendation_line(rec)
    assert line.startswith("Recommended: P · RB+CV = 10.70 nats/sequence (SE 0.08, 95% CI [10.55, 10.86]; a "
                           "sequence is up to 20 new tokens, cut at EOS) — RB+CV"), line
    assert " ± " not in line
    low = replace(rec, estimate=0.02, std_error=0.015, ci=(-0.009, 0.049))
    assert f"95% CI [-0.009, 0.049], {report.BELOW_ZERO}" in report.recommendation_line(low)  # as stored


def _prompt_set(m=6, spread=10.0):
    docs = []
    for d in _docs():
        shift = [spread * (i - m / 2) / m for i in range(m)]
        per = [dict(prompt=i, estimates={k: dict(v, estimate=v["estimate"] + s, ci_low=v["ci_low"] + s,
                                                 ci_high=v["ci_high"] + s) for k, v in d["estimates"].items()})
               for i, s in enumerate(shift)]
        overall = {k: dict(v, std_error=v["std_error"] / math.sqrt(m), std_error_population=spread / 2,
                           ci_population_low=v["estimate"] - 12.9, ci_population_high=v["estimate"] + 12.9,
                           n=m * v["n"], ess=m * v["ess"]) for k, v in d["estimates"].items()}
        docs.append(dict(d, estimates=overall, per_prompt=per, config={"max_new_tokens": 24},
                         truncation="KL of the sequence process truncated at 24 tokens or at EOS"))
    return docs


def test_a_prompt_set_gets_one_recommendation_block():
    out = verdicts.judge(_prompt_set())
    for p, text in zip(out["per_prompt"], ["An interesting fact is that"] * 6):
        p["text"] = text
    block = report.recommendation_block(out, columns=120)
    lines = block.splitlines()
    assert lines[0] == "Recommended per prompt (nats/sequence; a sequence is up to 24 new tokens, cut at EOS):"
    per = [ln for ln in lines if ln.startswith("  prompt ")]
    assert len(per) == 6 and all(len(ln) <= 120 for ln in lines)
    assert verdicts.DEFAULT_REASON not in "\n".join(per)  # no repeated justification
    assert block.count(verdicts.DEFAULT_REASON.split(":")[0]) == 1
    overall = " ".join(ln.strip() for ln in lines[7:])
    assert "for these prompts SE" in overall and "for the population the prompts were drawn from SE" in overall
    assert "Report the first for this prompt set, the second to generalise to new prompts" in overall
    assert "95% CI [-2" in overall and report.BELOW_ZERO in overall  # the population CI as stored, said to be < 0


def test_one_draw_per_prompt_runs_without_warnings_and_says_n_a(tmp_path):
    from kl_estimation.llm.loading import load_transformers_pair
    from kl_estimation.llm.run.config import LLMConfig
    from kl_estimation.llm.run.runner import run_experiment
    from tiny_lms import save_pair

    paths = save_pair(tmp_path / "m", seed=0)
    pair = load_transformers_pair(*paths, prompts=["a b", "c"], temperature=1.0)
    for prompts in (("a b",), ("a b", "c")):
        cfg = LLMConfig(p_model="x", q_model="y", prompts=prompts, n_samples=1, max_new_tokens=3, temperature=1.0,
                        proposals=("P", "Geometric (β=0.5)"), batch_size=8)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = run_experiment(pair, cfg, {})
            text = report.llm_table(out["rows"], "t", 100) + report.recommendation_block(out)
        assert out["recommended"] is None and all(r["flag"] for r in out["rows"])
        assert not re.search(r"\binf\b|∞|\bnan\b", text, re.I), text
        assert all(not (r["std_error"] == r["std_error"]) or r["std_error"] > 0 for r in out["rows"])  # NaN, never 0
        assert "Recommended" in text and "none" in text


def test_flags_round_trip_through_summary_json_and_csv(tmp_path):
    from kl_estimation import runio
    from kl_estimation.verdicts import Code, Flag

    out = verdicts.judge(_docs())
    runio.write_json(tmp_path / "summary.json", out)
    runio.write_csv(tmp_path / "summary.csv", verdicts.table_rows(out["rows"]))
    saved = json.loads((tmp_path / "summary.json").read_text())
    back = verdicts.from_records(saved["rows"])
    assert [r["flags"] for r in back] == [r["flags"] for r in out["rows"]]
    assert all(isinstance(f, Flag) and isinstance(f.code, Code) for r in back for f in r["flags"])
    k3 = next(r for r in saved["rows"] if r["estimator"] == "k3")
    assert k3["flags"][0]["code"] == "K3_IDENTITY" and "Q/P" in k3["flags"][0]["message"]
    with open(tmp_path / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["flag"] for r in rows] == [r["flag"] for r in out["rows"]]
    assert max(len(r["flag"]) for r in rows) < 80 and "flags" not in rows[0]  # short cells
    assert [r["recommended"] for r in rows].count("True") == 1


def test_to_pandas_cells_are_short_and_messages_stay_available():
    pd = pytest.importorskip("pandas")
    from kl_estimation.api import KLResult

    out = verdicts.judge(_docs())
    res = KLResult(out["rows"], out["recommended"], [], {})
    df = res.to_pandas()
    assert isinstance(df, pd.DataFrame) and "flags" not in df.columns
    assert df["flag"].map(len).max() < 80 and df["recommended"].sum() == 1
    k3 = next(r for r in res.rows if r.estimator == "k3")
    assert k3.flag.startswith("K3_IDENTITY") and "Q/P" in k3.messages[0]
    assert res.to_dict()["rows"][0]["flags"] == [] or isinstance(res.to_dict()["rows"][0]["flags"][0], dict)
    assert res.recommended.recommended and np.isfinite(res.recommended.std_error)


def test_the_block_reads_an_api_results_view_as_well():
    from kl_estimation.api import result_of

    out = verdicts.judge(_prompt_set())
    for p in out["per_prompt"]:
        p["text"] = "a prompt"
    res = result_of(dict(meta={"config": {}}, docs=[], **out))
    assert report.recommendation_block(res.view(), columns=120) == report.recommendation_block(out, columns=120)
    one = verdicts.judge(_docs())
    block = report.recommendation_block(one, columns=200)
    assert block.replace("\n  ", " ") == report.recommendation_line(one["recommended"])
