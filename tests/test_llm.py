"""The LLM half against ground truth: tiny random transformers whose every continuation can be enumerated."""
import json
import math

import numpy as np
import pytest
import torch

from kl_estimation import verdicts
from kl_estimation.cli import llm_main
from kl_estimation.core.estimators import k3_terms, sequence_estimates
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.pair import tempered_log_softmax
from kl_estimation.llm.run import units
from tiny_lms import save_pair

T = 3
PROPOSALS = ["P", "Geometric (β=0.5)", "Fixed mixture (λ=0.5)", "Exponential family (β=1)",
             "Adaptive [prefix-aware]", "Alpha-mixture (α=0.5) [prefix-aware]"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def pair(tiny):
    return load_transformers_pair(*tiny, prompts="a b", temperature=0.8)


def exact_moments(leaves, g):
    r = np.exp(leaves["log_r"])
    mean = float(np.sum(r * g))
    c = g - mean
    return mean, float(np.sum(r * c ** 2)), float(np.sum(r * c ** 4))


def estimator_terms(leaves):
    lw = leaves["log_p"] - leaves["log_r"]
    f = leaves["log_p"] - leaves["log_q"]
    return {"IS": np.exp(lw) * f, "RB-IS": leaves["rb"], "k3-IS": np.exp(lw) * k3_terms(f)}


def test_enumeration_is_a_distribution_and_kl_agrees_two_ways(pair):
    for name in PROPOSALS:
        leaves = enumeration.enumerate_sequences(pair, engine.sequence_proposal(name), T)
        assert np.exp(leaves["log_r"]).sum() == pytest.approx(1.0, abs=1e-9)
        assert np.exp(leaves["log_p"]).sum() == pytest.approx(1.0, abs=1e-9)
        p = np.exp(leaves["log_p"])
        assert np.sum(p * (leaves["log_p"] - leaves["log_q"])) == pytest.approx(leaves["kl"], rel=1e-9)
    lengths_vary = enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), T)["log_p"].size < 4 ** T
    assert lengths_vary  # EOS ends some sequences early: the truncated process, not all V^T strings


@pytest.mark.parametrize("name", PROPOSALS)
def test_every_estimator_exactly_unbiased_and_sampler_within_4_se(pair, name):
    prop = engine.sequence_proposal(name)
    leaves = enumeration.enumerate_sequences(pair, prop, T)
    kl = leaves["kl"]
    N = 6000
    b = engine.sample_batch(pair, prop, N, T, engine.unit_generator(1, name, 0, "cpu"))
    est = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, prop.base is None)
    names = {"IS": "MC", "RB-IS": "RB", "k3-IS": "k3"} if prop.base is None else {k: k for k in ("IS", "RB-IS",
                                                                                                  "k3-IS")}
    for key, g in estimator_terms(leaves).items():
        mean, var, mu4 = exact_moments(leaves, g)
        assert mean == pytest.approx(kl, rel=1e-9), key  # exact unbiasedness
        e = est[names[key]]
        assert abs(e["estimate"] - kl) < 4 * math.sqrt(var / N), (key, e["estimate"], kl)
        assert abs(e["variance"] - var) < 4 * math.sqrt((mu4 - var ** 2) / N), (key, e["variance"], var)
    # SNIS is consistent; at N = 6000 its O(1/N) bias is far inside the band
    assert abs(est["SNIS"]["estimate"] - kl) < 4 * est["SNIS"]["std_error"] + 1e-3
    cv = est["RB+CV" if prop.base is None else "RB-IS+CV"]  # cross-fitted: unbiased; no closed-form variance here
    assert abs(cv["estimate"] - kl) < 4 * cv["std_error"]


class _TwoStepPair:
    """The issue's counterexample: P_1 = (½, ½) over {a, b}, Q_1 = (½e^{-c}, ½e^{c'}) with e^{-c} + e^{c'} = 2; after
    a both models are sure of token y (KL 0); after b P is sure of y and Q(y) = e^{-(c+c')}. Tokens: a, b, y."""

    eos_token_id = None
    vocab_size = 3
    device = torch.device("cpu")

    def __init__(self, c: float):
        self.c, self.c2 = c, math.log(2 - math.exp(-c))
        lq_y = -(self.c + self.c2)
        f64 = dict(dtype=torch.float64)
        self.first = (torch.log(torch.tensor([0.5, 0.5, 0.0], **f64)),
                      torch.log(torch.tensor([0.5 * math.exp(-c), 0.5 * math.exp(self.c2), 0.0], **f64)))
        self.after_a = (torch.log(torch.tensor([0.0, 0.0, 1.0], **f64)),) * 2
        self.after_b = (self.after_a[0], torch.tensor([math.log(-math.expm1(lq_y)), -math.inf, lq_y], **f64))

    def start(self, prompt_rows):
        n = len(prompt_rows)
        return self.first[0].expand(n, -1), self.first[1].expand(n, -1), None

    def step(self, state, tokens):
        b = (tokens == 1)[:, None]
        return (torch.where(b, self.after_b[0], self.after_a[0]), torch.where(b, self.after_b[1], self.after_a[1]),
                None)


def test_sequence_rb_can_have_more_variance_than_mc_two_step_counterexample():
    """MC ≡ c = KL exactly (zero variance) while Var(RB) = (c + c')²/4 ≈ 0.75: each K_t is conditioned on a different
    prefix and covaries with the earlier log-ratios, so sequence-level RB is not a Rao-Blackwellisation of MC."""
    c = 1.2
    pair = _TwoStepPair(c)
    leaves = enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), 2)
    t = estimator_terms(leaves)
    assert leaves["kl"] == pytest.approx(c, rel=1e-12)
    mc_mean, var_mc, _ = exact_moments(leaves, t["IS"])
    rb_mean, var_rb, _ = exact_moments(leaves, t["RB-IS"])
    assert mc_mean == pytest.approx(c) and rb_mean == pytest.approx(c)
    assert var_mc == pytest.approx(0.0, abs=1e-12)
    assert var_rb == pytest.approx((c + pair.c2) ** 2 / 4, rel=1e-9) and var_rb > 0.74
    b = engine.sample_batch(pair, engine.sequence_proposal("P"), 400, 2, engine.unit_generator(0, "P", 0, "cpu"))
    est = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, True)
    assert est["MC"]["variance"] == pytest.approx(0.0, abs=1e-9)
    assert abs(est["RB"]["variance"] - var_rb) < 0.1  # a two-point law: per-sample variance within ~4 SE
    # RB+CV's cross-fitted β is exactly 1 here (MC − RB = −(RB − c)): it recovers MC's zero variance
    assert est["RB+CV"]["variance"] == pytest.approx(0.0, abs=1e-9)
    assert est["RB+CV"]["estimate"] == pytest.approx(c)


def test_sequence_rb_above_mc_on_a_tiny_transformer_and_rb_cv_at_least_as_good(tmp_path):
    """A tiny random GPT-2 pair with EOS (save_pair seed 0, noise 0.8) at temperature 0.4, T = 4: exact Var(RB) =
    40.7 > Var(MC) = 25.0 by enumeration. The oracle RB+CV variance is below both, and the cross-fitted RB+CV's
    sample variance over 4000 sequences is no worse than the better of the two within 4 SE."""
    from kl_estimation.core.estimators import rb_control_variate_terms

    pair = load_transformers_pair(*save_pair(tmp_path / "pair", seed=0, noise=0.8), prompts="a b", temperature=0.4)
    T = 4
    leaves = enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), T)
    t = estimator_terms(leaves)
    _, var_mc, _ = exact_moments(leaves, t["IS"])
    _, var_rb, _ = exact_moments(leaves, t["RB-IS"])
    assert var_rb > 1.5 * var_mc  # 40.7 against 25.0
    p, kl = np.exp(leaves["log_p"]), leaves["kl"]
    a, d = t["RB-IS"] - kl, t["IS"] - t["RB-IS"]
    var_cv_oracle = var_rb - np.sum(p * a * d) ** 2 / np.sum(p * d * d)
    assert var_cv_oracle <= min(var_mc, var_rb)
    N = 4000
    b = engine.sample_batch(pair, engine.sequence_proposal("P"), N, T, engine.unit_generator(5, "P", 0, "cpu"))
    f_step = np.where(b.mask, b.log_p - b.log_q, 0.0)
    cv = rb_control_variate_terms(b.kl_step, f_step, np.zeros_like(f_step), b.mask)
    assert abs(cv.mean() - kl) < 4 * cv.std(ddof=1) / math.sqrt(N)  # unbiased
    c = cv - cv.mean()
    se_var = math.sqrt((np.mean(c ** 4) - np.mean(c ** 2) ** 2) / N)
    assert cv.var(ddof=1) < min(var_mc, var_rb) + 4 * se_var


def test_ignore_eos_enumerates_all_strings(tiny):
    pair = load_transformers_pair(*tiny, prompts="a b", temperature=0.8, ignore_eos=True)
    leaves = enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), T)
    assert leaves["log_p"].size == 4 ** T
    b = engine.sample_batch(pair, engine.sequence_proposal("P"), 64, T, engine.unit_generator(0, "P", 0, "cpu"))
    assert b.mask.all()


def test_proposal_p_has_unit_weights(pair):
    b = engine.sample_batch(pair, engine.sequence_proposal("P"), 50, T, engine.unit_generator(3, "P", 0, "cpu"))
    assert np.array_equal(b.log_p, b.log_r)


def run_cli(tmp_path, tiny, *extra, folder="out"):
    out = tmp_path / folder
    argv = ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "40", "--max-new-tokens", "4",
            "--temperature", "0.8", "--batch-size", "16", "--output-dir", str(out),
            "--proposals", "P", "Geometric (β=0.5)", "Adaptive [prefix-aware]", *extra]
    try:
        code = llm_main(argv)
    except SystemExit as e:
        code = e.code
    return code, out


def test_json_per_step_numbers_match_a_fresh_forward_pass(tmp_path, tiny, capsys):
    code, out = run_cli(tmp_path, tiny)
    assert code == 0
    stdout = capsys.readouterr().out
    assert "RB" in stdout and "output folder" in stdout and "low-variance reference" not in stdout
    last = next(ln for ln in reversed(stdout.strip().splitlines()) if ln.startswith("Recommended"))
    assert last.startswith("Recommended: ") and " nats/sequence (SE " in last, last  # what to report, in its unit
    from transformers import AutoModelForCausalLM

    p = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    q = AutoModelForCausalLM.from_pretrained(tiny[1]).eval()
    doc = json.loads((out / "geometric_beta-0.5.json").read_text())
    assert doc["config"]["seed"] == 0 and doc["versions"]["torch"] and doc["models"]["p"] == tiny[0]
    assert set(doc["estimates"]) == {"IS", "SNIS", "RB-IS", "RB-IS+CV", "k3-IS"}
    prompt = [1, 2]  # "a b"
    for rec in doc["sequences"][:10]:
        ids = torch.tensor([prompt + rec["token_ids"]])
        with torch.no_grad():
            lp = tempered_log_softmax(p(ids).logits[0, len(prompt) - 1:-1], 0.8, 4)
            lq = tempered_log_softmax(q(ids).logits[0, len(prompt) - 1:-1], 0.8, 4)
        tok = torch.tensor(rec["token_ids"])
        np.testing.assert_allclose(rec["log_p"], lp[range(len(tok)), tok], atol=1e-5)
        np.testing.assert_allclose(rec["log_q"], lq[range(len(tok)), tok], atol=1e-5)
        np.testing.assert_allclose(rec["kl_step"], (lp.exp() * (lp - lq)).sum(-1), atol=1e-5)
        assert rec["log_ratio"] == pytest.approx(sum(rec["log_p"]) - sum(rec["log_q"]))
        assert rec["log_weight"] == pytest.approx(sum(rec["log_p"]) - sum(rec["log_r"]))
        assert all(t != 0 for t in rec["token_ids"][:-1])  # EOS only ever last
    p_doc = json.loads((out / "p.json").read_text())
    assert all(r["log_weight"] == 0.0 for r in p_doc["sequences"])
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 14 and (out / "summary.csv").exists()  # 3 proposals × 5 estimators, no SNIS for P
    rec = summary["recommended"]
    assert rec is not None and f"{rec['proposal']} · {rec['estimator']} = " in last
    assert [(r["proposal"], r["estimator"]) for r in summary["rows"] if r["recommended"]] == \
        [(rec["proposal"], rec["estimator"])]
    flags = [bool(r["flag"]) for r in summary["rows"]]
    assert flags == sorted(flags)  # flagged rows rank after every trusted row
    import csv

    with open(out / "summary.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [bool(r["flag"]) for r in csv_rows] == flags
    assert [r["recommended"] == "True" for r in csv_rows] == [r["recommended"] for r in summary["rows"]]


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_resume_after_interruption_gives_the_same_records(tmp_path, tiny, monkeypatch, capsys):
    assert run_cli(tmp_path, tiny, folder="straight")[0] == 0
    real = units.sample_batch
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # P done (3 batches), Geometric killed after 2 of its 3 batches
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(units, "sample_batch", dying)
    capsys.readouterr()
    assert run_cli(tmp_path, tiny, folder="killed")[0] == 130  # Ctrl-C: one line, exit 130, no traceback
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("LLM_experiments.py: interrupted: kept in ") and err.endswith(" --resume"), err
    assert ": 1 of 3 proposals complete, 32 sequences (2 batches) of Geometric (β=0.5); continue with: " in err, err
    killed = tmp_path / "killed"
    assert (killed / "p.json").exists() and (killed / "geometric_beta-0.5.partial.jsonl").exists()
    assert not (killed / "geometric_beta-0.5.json").exists()
    code, _ = run_cli(tmp_path, tiny, folder="killed")
    assert code == 2 and "--resume" in capsys.readouterr().err  # refuses to clobber without --resume
    monkeypatch.setattr(units, "sample_batch", real)
    calls["n"] = 0
    assert run_cli(tmp_path, tiny, "--resume", folder="killed")[0] == 0
    for f in ("p.json", "geometric_beta-0.5.json", "adaptive_prefix-aware.json"):
        a = json.loads((tmp_path / "straight" / f).read_text())
        b = json.loads((killed / f).read_text())
        assert a["sequences"] == b["sequences"] and a["estimates"] == b["estimates"], f
    assert not list(killed.glob("*.partial.jsonl"))


@pytest.mark.parametrize("args,needle", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--n-samples", "0"], "--n-samples"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--prompt", " "], "--prompt"),
    (["--proposals", "Nope"], "--proposals: unknown proposal 'Nope'"),
    (["--proposals", "Geometric (β=0.5) [prefix-aware]"], "no prefix-aware variant"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "cuda:7"], "--device"),
    (["--p-model", "/nonexistent/model"], "--p-model: cannot load '/nonexistent/model'"),
    (["--p-model", "no-such-org/no-such-model"], "--p-model: cannot load 'no-such-org/no-such-model'"),
])
def test_bad_input(args, needle, tmp_path, tiny, capsys):
    base = ["--p-model", tiny[0], "--q-model", tiny[1], "--output-dir", str(tmp_path / "o"), "--n-samples", "4"]
    try:
        code = llm_main(base + args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_output_folder_checked_before_models_load(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code = llm_main(["--p-model", "/nonexistent/p", "--q-model", "/nonexistent/q", "--output-dir",
                     str(blocker / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "--output-dir" in err and "nonexistent" not in err


def test_different_tokenizers_named_with_both_sizes(tmp_path, tiny, capsys):
    other = save_pair(tmp_path / "other", words=("<eos>", "a", "b", "c", "d"))
    code = llm_main(["--p-model", tiny[0], "--q-model", other[1], "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "tokenizer differs" in err and "5 and 4" in err


def test_logit_rows_beyond_the_tokenizer_are_dropped(pair):
    log_p, log_q, _ = pair.start(torch.zeros(2, dtype=torch.long))
    assert log_p.shape == (2, 4) and torch.allclose(log_p.exp().sum(-1), torch.ones(2))


def test_bf16_models_keep_float32_log_softmax(tiny):
    pair = load_transformers_pair(*tiny, prompts="a b", temperature=0.8, dtype="bfloat16")
    log_p, log_q, _ = pair.start(torch.zeros(3, dtype=torch.long))
    assert log_p.dtype == torch.float32 and log_q.dtype == torch.float32


def test_proposal_missing_p_support_is_flagged_biased(tmp_path, capsys):
    """Q = P on a token gives |log P/Q| = 0 there: the token-level Optimal proposal never draws it (r = 0 < P).
    With P = Q exactly every row falls back to P (no gap); a pair sharing some logit rows exactly shows the gap."""
    from tiny_lms import save_pair

    same = save_pair(tmp_path / "same", noise=0.0)
    pair = load_transformers_pair(*same, prompts="a b", temperature=1.0)
    b = engine.sample_batch(pair, engine.sequence_proposal("Optimal"), 8, 3, engine.unit_generator(0, "x", 0, "cpu"))
    assert np.all(b.uncovered == 0) and np.all(b.log_r == b.log_p)
    docs = [dict(proposal="Optimal", max_uncovered_mass=0.2,
                 estimates={"IS": dict(estimate=1.0, std_error=0.1, khat=0.1)})]
    row = verdicts.judge(docs)["rows"][0]
    assert row["flag"] == "UNCOVERED_MASS" and row["flags"][0].message.startswith("biased: the proposal gives r = 0")
    log_p = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    log_q = torch.log(torch.tensor([[0.5, 0.2, 0.3]]))  # token 0: P = Q, so Optimal's r = 0 there
    gap = _OneStepPair(log_p, log_q)
    b = engine.sample_batch(gap, engine.sequence_proposal("Optimal"), 4, 1, engine.unit_generator(0, "y", 0, "cpu"))
    assert np.allclose(b.uncovered, 0.5) and not np.any(b.token_ids == 0)


class _OneStepPair:
    eos_token_id = None
    vocab_size = 3
    device = torch.device("cpu")

    def __init__(self, log_p, log_q):
        self.log_p, self.log_q = log_p, log_q

    def start(self, prompt_rows):
        return self.log_p.expand(len(prompt_rows), -1), self.log_q.expand(len(prompt_rows), -1), None


def test_runs_without_an_output_dir_never_collide_and_old_flag_names_still_work(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--p-model", tiny[0], "--q-model", tiny[1], "--proposals", "P", "--no-plots"]
    assert llm_main(base + ["--n-samples", "8", "--max-new-tokens", "2"]) == 0
    assert llm_main(base + ["--n-reps", "8", "--t-length", "2"]) == 0  # the seed's spellings are aliases
    runs = sorted((tmp_path / "tests2").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)
    a, b = (json.loads((r / "summary.json").read_text())["rows"] for r in runs)
    assert a == b
    out = capsys.readouterr().out
    assert f"output folder: {runs[0].relative_to(tmp_path)}" in out or str(runs[0]) in out
