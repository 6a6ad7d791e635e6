"""Draw sources with dependent rows (stratified codes, scrambled Sobol, array-RQMC) against ground truth: every
estimator stays unbiased, each sequence is an exact draw, and the standard error from independent randomizations
matches the spread it claims to measure."""
import math

import numpy as np
import pytest
import torch

from kl_estimation.cli import llm_main, synthetic_main
from kl_estimation.core.draws import DRAWS, make_source
from kl_estimation.core.estimators import randomization_estimates, sequence_estimates
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.toy import markov as sq
from tiny_lms import save_pair

NEW = [s for s in DRAWS if s != "iid"]
IS_PROPOSAL = "Fixed mixture (λ=0.5)"  # covers P: every IS estimator unbiased


def toy(T=5, V=6, order=1, tau=0.7, seed=3):
    tb = sq.markov_pair("zipf", "medium", V, order, T, np.random.default_rng(seed))
    return sq.temper(tb, tau)


def draw_units(pair, prop, sampler, n, units, T, seed=0, label="u"):
    streams = [(engine.unit_generator(seed, f"{label}/{prop.name}", r, "cpu"), n) for r in range(units)]
    b = engine.sample_batch(pair, prop, n * units, T, streams, sampler=sampler)
    return b, np.repeat(np.arange(units), n)


def estimates(b, groups, prop):
    return randomization_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, prop.base is None, groups)


def test_registry_names_match_the_cli_list():
    assert tuple(DRAWS) == sq.SAMPLERS
    with pytest.raises(ValueError, match="sampler: unknown sampler 'nope'"):
        make_source("nope", [], 3, "cpu")


@pytest.mark.parametrize("sampler", NEW)
@pytest.mark.parametrize("order", [1, 2])
def test_markov_every_estimator_within_4_se_of_exact_kl(sampler, order):
    tb = toy(order=order)
    pair = sq.MarkovPair(tb)
    kl = sq.exact_values(tb).kl
    for name in ("P", IS_PROPOSAL):
        prop = engine.sequence_proposal(name)
        b, groups = draw_units(pair, prop, sampler, 32, 150, tb.shape[0], label=f"{sampler}{order}")
        est = estimates(b, groups, prop)
        for key, e in est.items():
            assert e["n_randomizations"] == 150 and "randomizations" in e["std_error_method"]
            if key.startswith("k3"):  # Q/P of rare sequences: terms up to ~1e4 at probability ~1e-7, for iid too,
                continue  # so an SE from 150 units is not a 4σ bound there (the others' terms are bounded)
            assert abs(e["estimate"] - kl) < 4 * e["std_error"], (sampler, name, key, e["estimate"], kl)


@pytest.mark.parametrize("sampler", NEW)
def test_reported_se_matches_spread_over_replications(sampler):
    """E[SE²] = Var(estimate) for the randomization SE; the naive SE from the n terms is far off for RB."""
    tb = toy()
    pair, prop = sq.MarkovPair(tb), engine.sequence_proposal("P")
    M, units, n = 200, 8, 32
    b, groups = draw_units(pair, prop, sampler, n, M * units, tb.shape[0], label="se")
    rb, se2, naive2 = [], [], []
    for m in range(M):
        rows = slice(m * units * n, (m + 1) * units * n)
        e = randomization_estimates(b.log_p[rows], b.log_q[rows], b.log_r[rows], b.kl_step[rows], b.mask[rows], True,
                                    groups[rows])["RB"]
        rb.append(e["estimate"])
        se2.append(e["std_error"] ** 2)
        naive2.append(sequence_estimates(b.log_p[rows], b.log_q[rows], b.log_r[rows], b.kl_step[rows],
                                         b.mask[rows], True)["RB"]["std_error"] ** 2)
    var = np.var(rb, ddof=1)
    # Var of the sample variance over M replications ≈ 2σ⁴/(M−1); of the mean SE² ≈ Var(s²_units)/M: 4σ together
    assert abs(np.mean(se2) / var - 1) < 4 * math.sqrt(2 / (M - 1) + 2 / ((units - 1) * M)), (np.mean(se2), var)
    assert np.mean(naive2) > 1.3 * var  # the spread of the n terms overstates it: why the SE must come from units
    # the interval uses Student t on units − 1 = 7 degrees of freedom (z = 1.96 covers about 0.91 here, 0.70 at 2)
    assert e["ci_high"] - e["estimate"] == pytest.approx(2.364624 * e["std_error"], rel=1e-6)


@pytest.mark.parametrize("sampler", NEW)
def test_each_row_is_an_exact_draw(sampler):
    """The first two tokens of one fixed row (first and last of a unit) over many units follow P exactly."""
    tb = toy(T=2, V=4)
    pair, prop = sq.MarkovPair(tb), engine.sequence_proposal("P")
    n, units = 6, 3000
    b, _ = draw_units(pair, prop, sampler, n, units, 2, label="exact")
    p1 = np.exp(tb.log_p[0, tb.start_state])
    p2 = np.exp(tb.log_p[1, tb.next_state(tb.start_state, np.arange(4))])  # (first token, second token)
    joint = p1[:, None] * p2
    joint[0] = 0.0  # EOS first: the second step is masked out
    joint[0, 0] = p1[0]
    for row in (0, n - 1):
        toks = b.token_ids[row::n]
        second = np.where(b.mask[row::n, 1], toks[:, 1], 0)
        counts = np.zeros((4, 4))
        np.add.at(counts, (toks[:, 0], second), 1)
        expected = units * joint
        keep = expected > 0
        chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
        df = int(keep.sum()) - 1
        assert counts[~keep].sum() == 0
        assert chi2 < df + 4 * math.sqrt(2 * df), (sampler, row, chi2, df)


@pytest.mark.parametrize("sampler", NEW)
def test_records_of_a_unit_do_not_depend_on_packing(sampler):
    tb = toy()
    pair, prop = sq.MarkovPair(tb), engine.sequence_proposal("P")

    def gen(i):
        return engine.unit_generator(5, "P", i, "cpu")

    alone = engine.sample_batch(pair, prop, 16, 5, [(gen(1), 16)], sampler=sampler)
    packed = engine.sample_batch(pair, prop, 29, 5, [(gen(0), 13), (gen(1), 16)], sampler=sampler)
    assert np.array_equal(alone.token_ids, packed.token_ids[13:])


def test_stratified_refreshes_spent_codes_and_stays_exact():
    """T = 40 over V = 20 near-flat rows: the code's 40 bits run out after ~10 steps, the row takes fresh uniforms."""
    tb = toy(T=40, V=20, tau=2.0)
    pair, prop = sq.MarkovPair(tb), engine.sequence_proposal("P")
    streams = [(engine.unit_generator(0, "long", r, "cpu"), 32) for r in range(60)]
    src = make_source("stratified", streams, 40, "cpu")
    b, groups = draw_units(pair, prop, "stratified", 32, 60, 40, label="long")
    kl = sq.exact_values(tb).kl
    e = estimates(b, groups, prop)
    for key in ("MC", "RB"):
        assert abs(e[key]["estimate"] - kl) < 4 * e[key]["std_error"]
    # the source itself: flat rows shrink the interval by ~1/20 per step; after 12 steps every row has refreshed
    flat = torch.full((src.u.numel(), 20), -math.log(20.0), dtype=torch.float64)
    for t in range(12):
        src(t, flat)
    assert (src.log_width > -40 * math.log(2)).all() and (src.log_width < 0).any()
    assert ((src.u >= 0) & (src.u < 1)).all()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny_samplers"))


@pytest.mark.parametrize("sampler", NEW)
def test_tiny_transformer_every_estimator_within_4_se_of_enumerated_kl(tiny, sampler):
    pair = load_transformers_pair(*tiny, prompts="a b", temperature=0.8)
    T = 3
    for name in ("P", "Geometric (β=0.5)"):
        prop = engine.sequence_proposal(name)
        kl = enumeration.enumerate_sequences(pair, prop, T)["kl"]
        b, groups = draw_units(pair, prop, sampler, 32, 60, T, label="tiny")
        for key, e in estimates(b, groups, prop).items():
            if key.startswith("k3"):
                continue  # heavy-tailed Q/P: see the Markov test
            assert abs(e["estimate"] - kl) < 4 * e["std_error"], (sampler, name, key, e["estimate"], kl)


def test_llm_cli_sampler_says_how_the_se_was_computed(tmp_path, tiny, capsys):
    argv = ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "48", "--max-new-tokens", "3",
            "--temperature", "0.8", "--batch-size", "8", "--proposals", "P", "--sampler", "stratified",
            "--output-dir", str(tmp_path / "o")]
    assert llm_main(argv) == 0
    out = capsys.readouterr().out
    assert "standard errors from the spread of the estimates over 6 independent randomizations" in out
    import json

    doc = json.loads((tmp_path / "o" / "p.json").read_text())
    assert doc["run_key"]["sampler"] == "stratified" and doc["config"]["sampler"] == "stratified"
    assert "6 independent randomizations" in doc["estimates"]["RB"]["std_error_method"]
    code = llm_main(argv[:-1] + [str(tmp_path / "p"), "--sampler", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "--sampler: unknown sampler 'nope'" in err and len(err.strip().splitlines()) == 1
    code = llm_main(argv[:-1] + [str(tmp_path / "p"), "--batch-size", "48"])
    err = capsys.readouterr().err
    assert code == 2 and "--batch-size: with --sampler stratified" in err and not (tmp_path / "p").exists()


def test_sequence_cli_adds_sampler_rows(tmp_path, capsys):
    code = synthetic_main(["--sequence", "--vocab-size", "11", "--max-new-tokens", "5", "--families", "zipf",
                           "--n-samples", "32", "--n-repeats", "6", "--alpha-values", "0.5", "--no-plots",
                           "--sampler", "iid", "array", "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0 and "RB [array]" in out and "exact variance of i.i.d. RB: MC [array]" in out
    for argv, needle in ((["--sampler", "nope"], "--sampler: unknown sampler 'nope'"),
                         (["--sampler", "array", "--n-repeats", "1"], "--n-repeats")):
        code = synthetic_main(["--sequence", "--output-dir", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_study_fast_path_equals_the_engine():
    tb = toy(T=6, V=8, order=2)
    for sampler in DRAWS:
        a, b = sq.sampler_repeats(tb, sampler, 16, 4, seed=2), sq.sampler_rb_repeats(tb, sampler, 16, 4, seed=2)
        for k in ("MC", "RB"):
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [5, 2, 1])
def test_array_kl_inverts_a_top_k_then_id_ordered_cdf_exactly(k):
    """u on a fine grid lands on each token with frequency r (to 1/M): first the k most likely in order of
    decreasing r, then the rest in id order; never on r = 0, not even at u → 1."""
    from kl_estimation.core.draws.array_kl import invert_topk_cdf

    r = torch.tensor([0.1, 0.0, 0.45, 0.05, 0.4], dtype=torch.float64)
    M = 20000
    u = (torch.arange(M, dtype=torch.float64) + 0.5) / M
    x = invert_topk_cdf(r.log().expand(M, -1), u, k)
    freq = torch.bincount(x, minlength=5).double() / M
    assert torch.allclose(freq, r, atol=1.5 / M) and freq[1] == 0
    order = list(dict.fromkeys(x.tolist()))  # tokens in the order u meets them
    assert order == {5: [2, 4, 0, 3], 2: [2, 4, 0, 3], 1: [2, 0, 3, 4]}[k]
    top = torch.tensor([1.0 - 2.0 ** -53], dtype=torch.float64)
    assert int(invert_topk_cdf(r.log()[None], top, k)) == order[-1]
    assert int(invert_topk_cdf(torch.tensor([[0.0, -math.inf]]), top, k)) == 0


def test_array_kl_ranks_rows_by_the_running_rb_sum():
    """Rows of each unit take their points in the order of Σ_{s≤t} KL_s (the key the engine hands over, 0 after
    EOS); units stay apart."""
    src = make_source("array-kl", [(torch.Generator().manual_seed(1), 4), (torch.Generator().manual_seed(2), 4)], 3,
                      "cpu")
    flat = torch.full((8, 3), -math.log(3.0), dtype=torch.float64)
    kl0 = torch.tensor([0.3, 0.1, 0.4, 0.2, 0.9, 0.8, 0.7, 0.6], dtype=torch.float64)
    src(0, flat, kl0)
    assert src.order.tolist() == [1, 3, 0, 2, 7, 6, 5, 4]
    src(1, flat, torch.tensor([0.0, 0.35, 0.0, 0.0, 0.0, 0.0, 0.0, 0.35], dtype=torch.float64))
    assert src.order.tolist() == [3, 0, 2, 1, 6, 5, 4, 7]
