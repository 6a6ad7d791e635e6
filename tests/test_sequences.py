"""Toy Markov pairs: exact DP against brute force, the LLM sampler against the exact values, bad sizes."""
import itertools
import json
import math

import numpy as np
import pytest

from kl_estimation.cli import synthetic_main
from kl_estimation.core.estimators import sequence_estimates
from kl_estimation.core.proposals import log_ratio
from kl_estimation.llm import engine, enumeration
from kl_estimation.toy import markov as sq

TINY = [("zipf", "medium", 4, 1, 5), ("zipf", "high", 4, 2, 4), ("zipf", "low", 3, 2, 5)]
PROPS = ["P", "Geometric (β=0.5)", "Optimal", "Exponential family (β=1)", "Fixed mixture (λ=0.3)", "Balanced 2"]


def tables(family, divergence, V, order, T, seed=0):
    return sq.markov_pair(family, divergence, V, order, T, np.random.default_rng(seed))


def brute_force(tb: sq.MarkovTables, log_r, T):
    """All V^T strings, cut at the first EOS and de-duplicated: plain Python, no DP, no shared code but log_ratio."""
    V = tb.vocab_size
    seen, rows = set(), []
    for x in itertools.product(range(V), repeat=T):
        cut = x[: x.index(0) + 1] if 0 in x else x
        if cut in seen:
            continue
        seen.add(cut)
        s, lp, lq, lr, w_prefix, rb = tb.start_state, 0.0, 0.0, 0.0, 1.0, 0.0
        for t, v in enumerate(cut):
            p_row, q_row = tb.log_p[t, s], tb.log_q[t, s]
            K = float(np.sum(np.exp(p_row) * log_ratio(p_row, q_row)))
            r_row = p_row if log_r is None else log_r[t, s]
            rb += w_prefix * K
            lp, lq, lr = lp + p_row[v], lq + q_row[v], lr + r_row[v]
            w_prefix = math.exp(lp - lr) if lr > -math.inf else math.inf
            s = tb.next_state(s, v)
        rows.append((lp, lq, lr, rb))
    return np.array(rows).T


@pytest.mark.parametrize("case", TINY)
@pytest.mark.parametrize("name", PROPS)
def test_dp_equals_brute_force(case, name):
    tb = tables(*case)
    T = case[-1]
    prop = engine.sequence_proposal(name)
    log_r = None if prop.base is None else sq.proposal_table(tb, prop.base)
    ex = sq.exact_values(tb, log_r)
    lp, lq, lr, rb = brute_force(tb, log_r, T)
    p, r = np.exp(lp), np.exp(lr)
    assert p.sum() == pytest.approx(1, abs=1e-12)
    f = lp - lq
    kl = np.sum(p * f)
    assert ex.kl == pytest.approx(kl, rel=1e-10, abs=1e-13)
    ok = r > 0  # sequences the proposal can draw
    w = np.exp(lp[ok] - lr[ok])
    g_is, g_rb = w * f[ok], rb[ok]
    m_is, m_rb = np.sum(r[ok] * g_is), np.sum(r[ok] * g_rb)
    assert ex.coverage == pytest.approx(np.sum(p[ok]), rel=1e-10)
    assert ex.is_mean == pytest.approx(m_is, rel=1e-9, abs=1e-12)
    assert ex.rbis_mean == pytest.approx(m_rb, rel=1e-9, abs=1e-12)
    assert ex.is_variance == pytest.approx(np.sum(r[ok] * (g_is - m_is) ** 2), rel=1e-8)
    assert ex.rbis_variance == pytest.approx(np.sum(r[ok] * (g_rb - m_rb) ** 2), rel=1e-8, abs=1e-12)
    mu = m_is / np.sum(p[ok])
    assert ex.snis_mean == pytest.approx(mu, rel=1e-9, abs=1e-12)
    assert ex.snis_variance == pytest.approx(np.sum(r[ok] * w ** 2 * (f[ok] - mu) ** 2) / np.sum(p[ok]) ** 2,
                                             rel=1e-8, abs=1e-12)
    if prop.base is None:
        assert ex.rb_mc_covariance == pytest.approx(np.sum(p * (rb - kl) * (f - kl)), rel=1e-8, abs=1e-12)
        assert ex.rbis_variance <= ex.is_variance


def test_token_level_optimal_is_biased_for_sequences():
    """Where P_t = Q_t on a token, |log P/Q| = 0 and the token-level optimal proposal never draws it, so every
    sequence through it is lost: the exact DP shows the bias, and the synthetic ranking flags it."""
    tb = tables("zipf", "medium", 20, 1, 8)
    ex = sq.exact_values(tb, sq.proposal_table(tb, engine.sequence_proposal("Optimal").base))
    assert ex.coverage < 0.99 and abs(ex.is_mean - ex.kl) > 0.01


def test_sampler_estimators_match_exact_values():
    """The LLM sampler on a toy pair: pooled means within 4 exact SE of the exact KL, sample variances within 4 SE
    of the exact variances (SE from the exact fourth moment, by enumeration on this small pair)."""
    tb = tables("zipf", "medium", 5, 2, 5, seed=3)
    pair = sq.MarkovPair(tb)
    N = 20_000
    for name in ("P", "Geometric (β=0.5)", "Exponential family (β=0.5)", "Adaptive [prefix-aware]"):
        prop = engine.sequence_proposal(name)
        b = engine.sample_batch(pair, prop, N, 5, engine.unit_generator(7, name, 0, "cpu"))
        est = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, prop.base is None)
        leaves = enumeration.enumerate_sequences(pair, prop, 5)
        r = np.exp(leaves["log_r"])
        ok = r > 0
        w = np.exp(leaves["log_p"][ok] - leaves["log_r"][ok])
        f = (leaves["log_p"] - leaves["log_q"])[ok]
        kl = sq.exact_values(tb).kl
        assert leaves["kl"] == pytest.approx(kl, rel=1e-10)
        for key, g in (("IS", w * f), ("RB-IS", leaves["rb"][ok])):
            key = {"IS": "MC", "RB-IS": "RB"}[key] if prop.base is None else key
            mean = np.sum(r[ok] * g)
            var = np.sum(r[ok] * (g - mean) ** 2)
            mu4 = np.sum(r[ok] * (g - mean) ** 4)
            assert mean == pytest.approx(kl, rel=1e-9)
            assert abs(est[key]["estimate"] - kl) < 4 * math.sqrt(var / N), (name, key)
            assert abs(est[key]["variance"] - var) < 4 * math.sqrt((mu4 - var ** 2) / N), (name, key)
        if prop.base is not None and not prop.prefix_aware:
            ex = sq.exact_values(tb, sq.proposal_table(tb, prop.base))
            assert ex.is_variance == pytest.approx(np.sum(r[ok] * (w * f - kl) ** 2), rel=1e-8)


def test_control_variate_unbiased_and_oracle_never_worse_than_rb():
    tb = tables("zipf", "high", 30, 1, 12, seed=1)
    pair = sq.MarkovPair(tb)
    ex = sq.exact_values(tb)
    b = engine.sample_batch(pair, engine.sequence_proposal("P"), 40_000, 12, engine.unit_generator(0, "P", 0, "cpu"))
    est = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, True)
    cv = est["RB+CV"]
    assert abs(cv["estimate"] - ex.kl) < 4 * math.sqrt(ex.rbis_variance / 40_000)
    var_d = ex.is_variance - 2 * ex.rb_mc_covariance + ex.rbis_variance
    oracle = ex.rbis_variance - (ex.rb_mc_covariance - ex.rbis_variance) ** 2 / var_d
    assert oracle <= ex.rbis_variance
    assert cv["variance"] < 1.1 * oracle  # the cross-fitted β gets close to the oracle


@pytest.mark.parametrize("kwargs,needle", [
    (dict(vocab_size=2, order=1, max_new_tokens=5), "^vocab_size: "),
    (dict(vocab_size=10, order=3, max_new_tokens=5), "^order: "),
    (dict(vocab_size=10, order=1, max_new_tokens=0), "^max_new_tokens: "),
    (dict(vocab_size=300, order=2, max_new_tokens=20), "limited to"),
])
def test_bad_sizes(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        sq.check_size(**kwargs)


def test_cli_bad_size_one_line(capsys, tmp_path):
    try:
        code = synthetic_main(["--sequence", "--order", "2", "--vocab-size", "300",
                               "--output-dir", str(tmp_path / "o")])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--vocab-size" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_sequence_run_folder(capsys, tmp_path):
    out = tmp_path / "seq"
    code = synthetic_main(["--sequence", "--vocab-size", "21", "--order", "2", "--max-new-tokens", "6",
                           "--families", "zipf", "mixture", "--alpha-values", "0.5", "--n-samples", "100",
                           "--n-repeats", "3", "--output-dir", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "exact values by DP" in stdout and "run folder" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["kind"] == "sequence" and res["config"]["order"] == 2
    npz = np.load(out / "distributions.npz")
    for p in res["pairs"]:
        names = [m["name"] for m in p["methods"]]
        assert {"MC", "RB", "RB+CV (cross-fitted β)", "IS · Geometric (β=0.5)", "RB-IS · Optimal",
                "SNIS · Adaptive [prefix-aware]"} <= set(names)
        assert all(len(m["estimates"]) == 3 for m in p["methods"])
        assert set(p["rankings"]) == {"by_accuracy", "by_variance", "by_exact_variance", "by_combined"}
        tb = sq.MarkovTables(npz[f"{p['family']}/medium/log_P"], npz[f"{p['family']}/medium/log_Q"], 2)
        assert sq.exact_values(tb).kl == pytest.approx(p["true_kl"], rel=1e-12)
        rb = next(m for m in p["methods"] if m["name"] == "RB")
        assert rb["exact_variance"] <= p["theoretical_variance"]
        opt = next(m for m in p["methods"] if m["name"] == "IS · Optimal")
        assert any(f["code"] in ("BIASED", "UNCOVERED_MASS") for f in opt["flags"]) \
            or opt["exact_mean"] == pytest.approx(p["true_kl"])
    figs = sorted(f.name for f in (out / "plots").iterdir())
    assert "zipf_medium_6_exact-variance.png" in figs and "cross_family_8_exact-variance.png" in figs
    assert not any("overlay" in f for f in figs)
