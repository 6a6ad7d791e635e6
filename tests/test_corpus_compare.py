"""Several candidates against one base in corpus mode (a quant ladder on tiny GPT-2 models): every candidate's numbers
are its one-candidate run's, bit for bit; the comparison table, the paired differences and the percentile CIs of the
cluster bootstrap against direct computations; groups; P's cache on disk (exact and rounded); a P whose logits are
not its head's output; the command line's --q-model A B C, --save-base, --base; bad input."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import kl_estimation as kle
from kl_estimation.cli import llm_main
from kl_estimation.llm.corpus import stats
from kl_estimation.llm.corpus.stats import STAT_KEYS
from tiny_lms import save_pair

WORDS = ("<eos>", "<s>", "a", "b", "c", "d", "e")
NOISE = (0.2, 0.8, 0.4)  # candidates given out of order: ranks 1, 3, 2


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    """P and three candidates P + noise·Z (the same Z, three scales: save_pair draws P, then Z, from one seed)."""
    root = tmp_path_factory.mktemp("ladder")
    qs = [save_pair(root / f"n{s}", words=WORDS, n_layer=2, noise=s)[1] for s in NOISE]
    return str(root / f"n{NOISE[0]}" / "p"), qs


def text(n=260, seed=0):
    return " ".join(np.random.default_rng(seed).choice(list("abcde"), n))


def test_each_candidate_is_its_one_candidate_run_bit_for_bit(ladder):
    p, qs = ladder
    res = kle.corpus_kl(p, qs, [text()], context=16, batch_size=3, n_bootstrap=200, progress=False)
    assert isinstance(res, kle.CorpusComparison) and len(res.results) == 3
    for q, r in zip(qs, res.results):
        one = kle.corpus_kl(p, q, [text()], context=16, batch_size=3, n_bootstrap=200, progress=False)
        for k in (*STAT_KEYS, "windows", "mask"):
            assert np.array_equal(r.tokens[k], one.tokens[k], equal_nan=k not in ("top1_agree", "windows", "mask")), k
        assert r.summary["llama"] == one.summary["llama"]
        assert r.summary["kld_quantile_cis"] == one.summary["kld_quantile_cis"]
        assert r.models["base"].startswith("P's final hidden states")
        assert r.config["q_model"] == q
    assert [row["rank"] for row in res.table] == [1, 3, 2]
    # llama.cpp's blocks once per candidate, then the table
    assert res.text.count("Mean    KLD:") == 3 and res.text.count("====== Perplexity statistics ======") == 3
    assert "candidates against one base" in res.text


def test_table_and_paired_differences_against_direct_sums(ladder):
    p, qs = ladder
    res = kle.corpus_kl(p, qs, [text(seed=1)], context=16, n_bootstrap=200, progress=False)
    m = res.results[0].tokens["mask"]
    kl = [r.tokens["kl_forward"][m] for r in res.results]
    win = np.broadcast_to(np.arange(m.shape[0])[:, None], m.shape)[m]
    d = kl[1] - kl[0]
    # paired SE by hand: the ratio-estimator sandwich of the per-token differences, clustered by window
    S, n = np.bincount(win, weights=d), np.bincount(win)
    G = S.size
    se = math.sqrt(G / (G - 1) * np.sum((S - d.mean() * n) ** 2)) / d.size
    got = res.paired(1, 0)
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12) and got["se_cluster"] == pytest.approx(se, rel=1e-10)
    assert res.paired(0, 1)["mean"] == pytest.approx(-got["mean"])
    best = next(r for r in res.table if r["rank"] == 1)
    assert "vs_best" not in best
    worst = next(r for r in res.table if r["rank"] == 3)
    assert worst["vs_best"]["mean"] == pytest.approx(d.mean()) and not worst["vs_best"]["indistinguishable"]
    row = res.table[1]
    assert row["mean_kld"] == pytest.approx(kl[1].mean())
    assert row["kld_99_9"] == res.results[1].summary["llama"]["kld_percentiles"]["99.9"]
    lo, hi = row["kld_99_ci"]
    assert lo <= row["kld_99"] <= hi
    assert row["bits_per_weight"] is None  # not a GGUF file
    # a candidate against itself is indistinguishable
    same = stats.paired_difference(kl[1], kl[1] + 1e-12 * np.sin(np.arange(kl[1].size)), win)
    assert same["indistinguishable"]


def test_labels_are_short_and_unique():
    from kl_estimation.llm.corpus.compare import labels

    assert labels(["d/SmolLM2.Q4_1.123.Q8_0.gguf", "d/SmolLM2.Q4_1.123.Q4_0.gguf"]) == ["Q8_0", "Q4_0"]
    assert labels(["org/ckpt-100", "org/ckpt-200"]) == ["100", "200"]
    assert labels(["a/q", "b/q"]) == ["q#1", "q#2"]
    assert labels(["x/model.gguf"]) == ["model"]


def test_pairing_removes_what_the_tokens_share():
    """Two candidates whose per-token KL share a token and a cluster effect: the paired SE is a fraction of the
    unpaired one, and it is the SE of the difference (checked over 400 corpora: its spread)."""
    rng = np.random.default_rng(5)
    G, n = 30, 40
    cl = np.repeat(np.arange(G), n)
    diffs, ses, unpaired = [], [], []
    for _ in range(400):
        hard = np.exp(rng.normal(0, 1, G)[:, None] + rng.normal(0, 1, (G, n))).ravel()
        a, b = 0.010 * hard, 0.012 * hard * np.exp(rng.normal(0, 0.2, G * n))
        d = stats.paired_difference(b, a, cl)
        diffs.append(d["mean"])
        ses.append(d["se_cluster"])
        unpaired.append(math.hypot(stats.cluster_mean(a, cl)["se_cluster"], stats.cluster_mean(b, cl)["se_cluster"]))
    assert np.median(ses) < 0.5 * np.median(unpaired)
    # the SE estimates the spread of the difference over corpora (clustered SE with 30 clusters: within 15 %)
    assert np.sqrt(np.mean(np.square(ses))) == pytest.approx(np.std(diffs), rel=0.15)


def test_weighted_quantiles_are_llama_cpps_percentiles_of_the_resampled_tokens():
    rng = np.random.default_rng(3)
    x, cl = rng.lognormal(size=601), rng.integers(0, 17, 601)
    order = np.argsort(x, kind="stable")
    counts = rng.integers(0, 3, (5, 17))
    counts[:, 0] = 1
    fr = np.array(list(stats.QUANTILE_LEVELS.values()))
    got = stats._weighted_llama_quantiles(x[order], cl[order], counts, fr)
    for r in range(5):
        rep = np.repeat(x, counts[r][cl])
        # llama.cpp's rule (position f·(n − 1), linear between neighbours) is numpy's "linear", in float64 here
        np.testing.assert_allclose(got[:, r], np.quantile(rep, fr), rtol=1e-12)
        ref = stats._llama_percentiles(rep)  # llama.cpp's own float32 arithmetic
        np.testing.assert_allclose(got[:, r], [ref[k] for k in stats.QUANTILE_LEVELS], rtol=2e-5)


def test_quantile_cis_are_seeded_and_wider_with_correlated_clusters():
    rng = np.random.default_rng(0)
    G, n = 40, 60
    shared = rng.normal(0, 1.0, G)[:, None]                  # a cluster effect on every token of the cluster
    x = np.exp(shared + rng.normal(0, 0.5, (G, n))).ravel()
    cl = np.repeat(np.arange(G), n)
    a = stats.quantile_cis(x, cl, np.random.default_rng(7), n_resamples=300)
    b = stats.quantile_cis(x, cl, np.random.default_rng(7), n_resamples=300)
    assert a == b
    iid = stats.quantile_cis(x, np.arange(x.size), np.random.default_rng(7), n_resamples=300)
    for k in ("median", "90.0"):
        assert a[k]["ci"][0] < a[k]["value"] < a[k]["ci"][1]
        assert a[k]["ci"][1] - a[k]["ci"][0] > 2 * (iid[k]["ci"][1] - iid[k]["ci"][0])
    with pytest.raises(ValueError, match="^rng:"):
        stats.quantile_cis(x, cl, 0)


@pytest.mark.slow
def test_percentile_cis_cover_the_true_quantiles():
    """Log-normal tokens with a cluster effect: log x = a_g + e, a ~ N(0, 0.6²), e ~ N(0, 0.8²), so the true
    quantiles are exp(z_q · 1.0) exactly. 200 corpora of 40 clusters × 64 tokens: the median's and the 90 %'s 95 %
    intervals must cover at a rate within 4 binomial SDs of 0.95 (measured: docs/corpus.md)."""
    from scipy.stats import norm

    rng = np.random.default_rng(11)
    G, n, reps = 40, 64, 200
    levels = {"90.0": 0.9, "median": 0.5}
    hit = {k: 0 for k in levels}
    cl = np.repeat(np.arange(G), n)
    for _ in range(reps):
        x = np.exp(rng.normal(0, 0.6, G)[:, None] + rng.normal(0, 0.8, (G, n))).ravel()
        res = stats.quantile_cis(x, cl, rng, levels=levels, n_resamples=400)
        for k, f in levels.items():
            hit[k] += res[k]["ci"][0] <= math.exp(norm.ppf(f)) <= res[k]["ci"][1]
    sd = math.sqrt(0.95 * 0.05 / reps)
    for k in levels:
        assert abs(hit[k] / reps - 0.95) < 4 * sd + 0.02, (k, hit[k] / reps)


def test_cli_several_candidates_write_one_comparison(ladder, tmp_path, capsys):
    p, qs = ladder
    corpus = tmp_path / "c.txt"
    corpus.write_text(text(200))
    out = tmp_path / "run"
    rc = llm_main(["--corpus", str(corpus), "--p-model", p, "--q-model", *qs[:2], "--context", "16",
                   "--n-bootstrap", "100", "--output-dir", str(out), "--no-plots"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("Mean    KLD:") == 2 and "paired differences" in printed
    comp = json.loads((out / "comparison.json").read_text())
    assert comp["kind"] == "corpus-comparison" and [r["rank"] for r in comp["table"]] == [1, 2]
    for i in (1, 2):
        folder = next((out / "candidates").glob(f"0{i}-*"))
        assert json.loads((folder / "summary.json").read_text())["config"]["q_model"] == qs[i - 1]
    assert (out / "comparison.csv").read_text().count("\n") == 3
    # one candidate on the command line is a one-candidate run, as before
    rc = llm_main(["--corpus", str(corpus), "--p-model", p, "--q-model", qs[0], "--context", "16",
                   "--output-dir", str(tmp_path / "one"), "--no-plots"])
    assert rc == 0 and (tmp_path / "one" / "summary.json").is_file()
    capsys.readouterr()
    rc = llm_main(["--corpus", str(corpus), "--p-model", p, "--q-model", qs[0], qs[0], "--context", "16",
                   "--output-dir", str(tmp_path / "dup")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "q_model" in err[0] or "--q-model" in err[0]
    assert not (tmp_path / "dup").exists()


def test_groups_of_a_jsonl_corpus_get_their_own_rows(ladder, tmp_path):
    p, qs = ladder
    f = tmp_path / "c.jsonl"
    docs = [(text(30 + 5 * i, seed=20 + i), "code" if i % 3 == 0 else "chat") for i in range(9)]
    f.write_text("\n".join(json.dumps({"text": t, "kind": g}) for t, g in docs))
    res = kle.corpus_kl(p, qs[:2], f, context=16, group_field="kind", cluster_by="document", n_bootstrap=50,
                        progress=False)
    r = res.results[1]
    assert r.corpus["groups"] == ["code", "chat"]
    t = r.tokens
    group = np.asarray(r.corpus["document_group"])[t["document"]]
    for g, name in enumerate(r.corpus["groups"]):
        sel = t["mask"] & (group == g)
        got = r.summary["groups"][name]["kl_forward"]
        assert got["mean"] == pytest.approx(t["kl_forward"][sel].mean(), rel=1e-12)
        assert got["n_clusters"] == len(np.unique(t["document"][sel]))
    assert "group code" in res.text and "group chat" in res.text
    with pytest.raises(ValueError, match="^group_field:"):
        kle.corpus_kl(p, qs[0], [text()], context=16, group_field="kind", progress=False)


def test_a_saved_base_gives_the_one_pass_numbers_bit_for_bit(ladder, tmp_path):
    p, qs = ladder
    cache = tmp_path / "base"
    made = kle.corpus_kl(p, None, [text()], context=16, batch_size=3, save_base=str(cache), progress=False)
    assert made == cache and (cache / "base.safetensors").is_file()
    rec = json.loads((cache / "base.json").read_text())
    W, keep = 260 // 16, 16 - 16 // 2
    assert rec["bytes"]["hidden"] == W * keep * 8 * 4  # windows × scored positions + 1 × hidden size × float32
    later = kle.corpus_kl(None, qs[:2], base=str(cache), batch_size=3, n_bootstrap=100, progress=False)
    once = kle.corpus_kl(p, qs[:2], [text()], context=16, batch_size=3, n_bootstrap=100, progress=False)
    for a, b in zip(later.results, once.results):
        for k in STAT_KEYS:
            assert np.array_equal(a.tokens[k], b.tokens[k], equal_nan=k != "top1_agree"), k
        assert a.summary["llama"] == b.summary["llama"]
        assert a.models["p"] == p and a.config["context"] == 16
    with pytest.raises(ValueError, match="^texts: the base cache .* leave out `texts`"):
        kle.corpus_kl(None, qs[0], [text()], base=str(cache), progress=False)
    with pytest.raises(ValueError, match="^base: .* is not a base cache"):
        kle.corpus_kl(None, qs[0], base=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="^save_base: .* already holds a base cache"):
        kle.corpus_kl(p, None, [text()], context=16, save_base=str(cache), progress=False)


def test_a_base_cache_reads_the_head_from_ps_file_and_refuses_when_it_changed(ladder, tmp_path):
    """The cache holds no head (P's file is recorded with the sha256 of its head): the same numbers as a one-pass
    run; a touched file (same head) is fine; a changed head or a missing file is one line naming `base`."""
    import os
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    p_src, qs = ladder
    p = tmp_path / "p"
    shutil.copytree(p_src, p)
    cache = tmp_path / "base"
    kle.corpus_kl(str(p), None, [text()], context=16, save_base=str(cache), progress=False)
    assert not any(k.startswith("head") for k in load_file(cache / "base.safetensors"))
    rec = json.loads((cache / "base.json").read_text())
    assert rec["bytes"]["head"] == 0 and rec["p_source"]["files"] and len(rec["p_source"]["head_sha256"]) == 64
    W, keep = 260 // 16, 16 - 16 // 2
    assert rec["bytes"]["llama_cpp_base"] == 20 + 4 * W * 16 + W * (keep - 1) * 2 * (2 * 4 + 4)
    weights = next(p.glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))  # a copy with another mtime: the head is the same
    got = kle.corpus_kl(None, qs[0], base=str(cache), n_bootstrap=10, progress=False)
    ref = kle.corpus_kl(str(p), qs[0], [text()], context=16, n_bootstrap=10, progress=False)
    assert np.array_equal(got.tokens["kl_forward"], ref.tokens["kl_forward"], equal_nan=True)
    m = AutoModelForCausalLM.from_pretrained(p)
    with __import__("torch").no_grad():
        m.get_output_embeddings().weight[0, 0] += 1.0
    m.save_pretrained(p)
    with pytest.raises(ValueError, match="^base: P .* changed since the cache was written: .*sha256"):
        kle.corpus_kl(None, qs[0], base=str(cache), progress=False)
    weights.unlink()
    with pytest.raises(ValueError, match="^base: P's file .* is missing"):
        kle.corpus_kl(None, qs[0], base=str(cache), progress=False)


@pytest.mark.parametrize("dtype,bound", [("bfloat16", 0.02), ("float16", 0.002)])
def test_a_rounded_base_cache_is_close_and_says_so(ladder, tmp_path, dtype, bound):
    """Hidden states rounded to 16 bits (half of float32; the head is P's own): per-token KL within `bound` of the
    exact value relative to the mean KL (measured on this pair: bfloat16 5.6e-3, float16 8.5e-4), never equal to it."""
    p, qs = ladder
    cache = tmp_path / dtype
    kle.corpus_kl(p, None, [text()], context=16, save_base=str(cache), save_base_dtype=dtype, progress=False)
    rec = json.loads((cache / "base.json").read_text())
    assert rec["dtype"] == dtype and rec["p_dtype"] == "float32" and rec["exact"] is False
    assert rec["bytes"]["hidden"] == (260 // 16) * 8 * 8 * 2
    got = kle.corpus_kl(None, qs[0], base=str(cache), n_bootstrap=10, progress=False)
    ref = kle.corpus_kl(p, qs[0], [text()], context=16, n_bootstrap=10, progress=False)
    m = ref.tokens["mask"]
    err = np.abs(got.tokens["kl_forward"][m] - ref.tokens["kl_forward"][m]).max() / ref.mean()["mean"]
    assert 0 < err < bound


def test_cli_save_base_then_score_against_it_with_the_figure(ladder, tmp_path, capsys):
    p, qs = ladder
    corpus = tmp_path / "c.txt"
    corpus.write_text(text(200))
    cache = tmp_path / "cache"
    assert llm_main(["--corpus", str(corpus), "--p-model", p, "--context", "16", "--save-base", str(cache)]) == 0
    assert f"base cache: {cache}" in capsys.readouterr().out
    out = tmp_path / "run"
    assert llm_main(["--base", str(cache), "--q-model", *qs, "--n-bootstrap", "50", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("Mean    KLD:") == 3 and "figures:" in printed
    assert (out / "plots" / "corpus_ladder.png").stat().st_size > 10_000
    assert llm_main(["--base", str(cache), "--q-model", qs[0], "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--corpus" in err[0] and "base cache" in err[0]


def test_a_base_whose_logits_are_not_its_head_output_goes_to_disk(ladder):
    """Soft-capping after the head (as Gemma-2 does): head(hidden) would not give P's logits, so P's logits are kept
    whole in a temporary file (P released before the candidates) — the numbers are those of both models' own logits,
    and the file is gone when the run ends."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    from kl_estimation.llm.corpus.stats import token_stats

    class Capped(GPT2LMHeadModel):
        def forward(self, *args, **kw):
            out = super().forward(*args, **kw)
            out.logits = 2.0 * torch.tanh(out.logits / 2.0)
            return out

    p_dir, qs = ladder
    p = Capped.from_pretrained(p_dir).eval()
    q = AutoModelForCausalLM.from_pretrained(qs[0]).eval()
    tok = AutoTokenizer.from_pretrained(p_dir)
    before = set(Path(tempfile.gettempdir()).glob(".p-logits-*"))
    res = kle.corpus_kl(p, [q, q], [text()], context=16, tokenizer=tok, n_bootstrap=10, progress=False)
    r = res.results[0]
    assert r.models["base"].startswith("P's logits, computed once and kept in a temporary file")
    assert set(Path(tempfile.gettempdir()).glob(".p-logits-*")) == before
    win, mask = torch.from_numpy(r.tokens["windows"]), torch.from_numpy(r.tokens["mask"])
    V = len(WORDS)
    with torch.no_grad():
        st = token_stats(p(input_ids=win).logits[:, :-1, :V], q(input_ids=win).logits[:, :-1, :V], win[:, 1:],
                         mask[:, 1:])
    np.testing.assert_allclose(r.tokens["kl_forward"][:, 1:], st["kl_forward"].numpy(), rtol=1e-5, atol=1e-7)
    assert np.array_equal(res.results[1].tokens["kl_forward"], r.tokens["kl_forward"], equal_nan=True)
