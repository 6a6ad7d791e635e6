"""The corpus run end to end on tiny random GPT-2 pairs: per-token KL both ways, Δp, log-probs, PPL and top-1 against a
float64 brute force over the same windows; llama.cpp's window rule with and without BOS; token ids from a llama.cpp
base file; documents; the run folder and figures; and bad input (one line, exit 2, nothing written)."""
import csv
import json
import math

import numpy as np
import pytest
import torch

import kl_estimation as kle
from kl_estimation.cli import llm_main, visualize_main
from kl_estimation.llm.corpus.stats import STAT_KEYS
from tiny_lms import save_pair

WORDS = ("<eos>", "<s>", "a", "b", "c", "d", "e")
LETTERS = list("abcde")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("pair"), words=WORDS, n_layer=2, noise=0.5)


@pytest.fixture(scope="module")
def bos_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("bos"), words=WORDS, bos="<s>", adds_bos=True, seed=1)


def words(n, seed=0):
    return " ".join(np.random.default_rng(seed).choice(LETTERS, n))


def ids_of(text, bos=None):
    return ([bos] if bos is not None else []) + [WORDS.index(w) for w in text.split()]


def brute(p_dir, q_dir, ids, n_ctx, bos=None, score="second-half"):
    """float64 throughout: llama.cpp's windows by hand, both models in float64, every quantity position by position."""
    from transformers import AutoModelForCausalLM

    V = len(WORDS)
    p = AutoModelForCausalLM.from_pretrained(p_dir).double().eval()
    q = AutoModelForCausalLM.from_pretrained(q_dir).double().eval()
    W = len(ids) // n_ctx
    win = np.array(ids[: W * n_ctx]).reshape(W, n_ctx)
    if bos is not None:
        win[:, 0] = bos
    first = n_ctx // 2 + 1 if score == "second-half" else 1
    out = {k: np.full((W, n_ctx), np.nan) for k in STAT_KEYS}
    with torch.no_grad():
        lp_all = p(torch.from_numpy(win)).logits[..., :V].numpy()
        lq_all = q(torch.from_numpy(win)).logits[..., :V].numpy()
    for w in range(W):
        for t in range(first, n_ctx):
            a, b = lp_all[w, t - 1], lq_all[w, t - 1]
            la = a - np.log(np.sum(np.exp(a - a.max()))) - a.max()
            lb = b - np.log(np.sum(np.exp(b - b.max()))) - b.max()
            x = win[w, t]
            out["kl_forward"][w, t] = np.sum(np.exp(la) * (la - lb))
            out["kl_reverse"][w, t] = np.sum(np.exp(lb) * (lb - la))
            out["logp_p"][w, t], out["logp_q"][w, t] = la[x], lb[x]
            out["delta_p"][w, t] = np.exp(lb[x]) - np.exp(la[x])
            out["top1_agree"][w, t] = float(np.argmax(a) == np.argmax(b))
    return win, out


def check_against_brute(res, win, ref, atol=2e-6):
    mask = np.isfinite(ref["kl_forward"])
    assert np.array_equal(res.tokens["windows"], win) and np.array_equal(res.tokens["mask"], mask)
    for k in STAT_KEYS:
        got = np.asarray(res.tokens[k], dtype=np.float64)
        if k == "top1_agree":
            assert np.array_equal(got[mask], ref[k][mask].astype(bool))
        else:
            np.testing.assert_allclose(got[mask], ref[k][mask], rtol=2e-5, atol=atol, err_msg=k)
            assert np.isnan(got[~mask]).all()
    L = res.summary["llama"]
    nll_q, nll_p = -ref["logp_q"][mask], -ref["logp_p"][mask]
    assert L["ppl_q"][0] == pytest.approx(math.exp(nll_q.mean()), rel=1e-5)
    assert L["ppl_base"][0] == pytest.approx(math.exp(nll_p.mean()), rel=1e-5)
    assert L["kld"][0] == pytest.approx(ref["kl_forward"][mask].mean(), rel=1e-5)
    assert L["dp"][0] == pytest.approx(ref["delta_p"][mask].mean(), abs=1e-6)
    assert L["same_top"][0] == pytest.approx(ref["top1_agree"][mask].mean())
    assert res.mean("kl_reverse")["mean"] == pytest.approx(ref["kl_reverse"][mask].mean(), rel=1e-5)
    assert res.mean("jeffreys")["mean"] == pytest.approx((ref["kl_forward"] + ref["kl_reverse"])[mask].mean(),
                                                         rel=1e-5)


@pytest.mark.parametrize("score", ["second-half", "all"])
def test_corpus_run_matches_a_float64_brute_force(pair, score):
    text = words(203)
    n_ctx = 16
    res = kle.corpus_kl(*pair, [text], context=n_ctx, score=score, batch_size=3, progress=False)
    win, ref = brute(*pair, ids_of(text), n_ctx, score=score)
    assert res.tokens["windows"].shape == (203 // n_ctx, n_ctx)
    check_against_brute(res, win, ref)
    per = (n_ctx - 1 - n_ctx // 2) if score == "second-half" else n_ctx - 1
    assert res.summary["n_tokens"] == per * (203 // n_ctx)
    # clustered SE by window from the per-token values (ratio-estimator sandwich, G/(G-1))
    kl = np.where(np.isfinite(ref["kl_forward"]), ref["kl_forward"], 0.0)
    n = np.isfinite(ref["kl_forward"]).sum(1)
    G, N, mean = kl.shape[0], n.sum(), kl.sum() / n.sum()
    se = math.sqrt(G / (G - 1) * np.sum((kl.sum(1) - mean * n) ** 2)) / N
    assert res.mean()["se_cluster"] == pytest.approx(se, rel=1e-4)
    assert res.summary["cluster_by"] == "window" and res.summary["n_clusters"] == G


def test_a_tokenizer_that_adds_bos_gets_llama_cpps_rule(bos_pair):
    """The text starts with BOS (what the tokenizer puts in front), and every window's first token is replaced by
    BOS for the forward pass, never scored — llama.cpp's rule."""
    text = words(150, seed=2)
    res = kle.corpus_kl(*bos_pair, [text], context=12, score="all", progress=False)
    win, ref = brute(*bos_pair, ids_of(text, bos=1), 12, bos=1, score="all")
    assert (res.tokens["windows"][:, 0] == 1).all()
    check_against_brute(res, win, ref)
    assert res.corpus["text_start"]["prepended"] == ["<s>"] and res.corpus["bos_replaces_first_token"] == 1


def test_bf16_models_and_chunked_stats_stay_close(pair):
    text = words(120, seed=3)
    exact = kle.corpus_kl(*pair, [text], context=20, progress=False)
    half = kle.corpus_kl(*pair, [text], context=20, dtype="bfloat16", progress=False)
    assert half.mean()["mean"] == pytest.approx(exact.mean()["mean"], rel=0.05)
    # bfloat16's own arithmetic is a KL floor the size of a Q8_0's KL: its console says so, float32's does not
    assert "whose arithmetic alone reads a KL" in half.console(None)
    assert "arithmetic alone" not in exact.console(None)


def test_llama_uint16_storage_is_close_to_exact(pair):
    text = words(200, seed=4)
    exact = kle.corpus_kl(*pair, [text], context=16, progress=False)
    stored = kle.corpus_kl(*pair, [text], context=16, base_storage="llama-uint16", progress=False)
    a, b = exact.tokens["kl_forward"], stored.tokens["kl_forward"]
    m = exact.tokens["mask"]
    assert np.abs(a[m] - b[m]).max() < 2e-3  # 16-bit log-probs: a step ≤ 16/65535 nats
    np.testing.assert_allclose(exact.tokens["kl_reverse"][m], stored.tokens["kl_reverse"][m], rtol=1e-6)


def test_loaded_models_and_documents_as_clusters(pair, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    docs = [words(40 + 7 * i, seed=10 + i) for i in range(6)]
    p = AutoModelForCausalLM.from_pretrained(pair[0]).eval()
    q = AutoModelForCausalLM.from_pretrained(pair[1]).eval()
    tok = AutoTokenizer.from_pretrained(pair[0])
    res = kle.corpus_kl(p, q, docs, context=16, tokenizer=tok, cluster_by="document", progress=False)
    by_id = kle.corpus_kl(*pair, docs, context=16, cluster_by="document", progress=False)
    np.testing.assert_allclose(res.tokens["kl_forward"], by_id.tokens["kl_forward"], equal_nan=True)
    assert res.summary["cluster_by"] == "document"
    doc = res.tokens["document"]
    # documents joined by a blank line, each token in the document its first character lies in
    lengths = [len(d.split()) for d in docs]
    expect = np.repeat(np.arange(len(docs)), lengths)[: doc.size]
    assert np.array_equal(doc.ravel(), expect)
    assert res.summary["n_clusters"] == len(np.unique(doc[res.tokens["mask"]]))


def write_kld(path, ids, n_ctx, n_vocab):
    """The header of llama.cpp's --kl-divergence-base file (the logits rows that follow are not read here)."""
    n_chunk = len(ids) // n_ctx
    with open(path, "wb") as fh:
        fh.write(b"_logits_")
        fh.write(np.array([n_ctx, n_vocab, n_chunk], dtype="<i4").tobytes())
        fh.write(np.asarray(ids[: n_chunk * n_ctx], dtype="<i4").tobytes())
        fh.write(b"\0" * 64)


def test_token_ids_from_a_llama_cpp_base_file(pair, tmp_path):
    text = words(100, seed=5)
    f = tmp_path / "base.kld"
    write_kld(f, ids_of(text), 16, len(WORDS))
    a = kle.corpus_kl(*pair, token_ids=str(f), context=16, progress=False)
    b = kle.corpus_kl(*pair, [text], context=16, progress=False)
    np.testing.assert_array_equal(a.tokens["windows"], b.tokens["windows"])
    np.testing.assert_allclose(a.tokens["kl_forward"], b.tokens["kl_forward"], equal_nan=True)
    assert a.corpus["llama_n_ctx"] == 16 and "llama.cpp base file" in a.corpus["source"]
    npy = tmp_path / "ids.npy"
    np.save(npy, np.array(ids_of(text)))
    c = kle.corpus_kl(*pair, token_ids=str(npy), context=16, progress=False)
    np.testing.assert_allclose(c.tokens["kl_forward"], b.tokens["kl_forward"], equal_nan=True)


def test_cli_writes_the_run_folder_and_figures(pair, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": words(60, seed=i)}) for i in range(4)) + "\n")
    out = tmp_path / "run"
    code = llm_main(["--p-model", pair[0], "--q-model", pair[1], "--corpus", str(corpus), "--text-field", "body",
                     "--context", "16", "--output-dir", str(out), "--cluster-by", "document", "--n-worst", "4"])
    printed = capsys.readouterr().out
    assert code == 0
    for label in ("====== Perplexity statistics ======", "Mean PPL(Q)                   :", "Mean    KLD:",
                  "Same top p:", "====== kl_estimation: both directions", "KL(Q||base)", "Jeffreys",
                  "clusters 4 documents", "chunk             PPL"):
        assert label in printed, label
    assert sorted(p.name for p in out.iterdir()) == ["llama.txt", "plots", "summary.json", "tokens.npz", "windows.csv"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "corpus" and summary["config"]["context"] == 16 and summary["versions"]["torch"]
    assert summary["config"]["cluster_by"] == "document" and len(summary["worst_tokens"]) == 4
    assert summary["models"]["text_start"]["prepended"] == []
    with np.load(out / "tokens.npz") as z:
        W = z["windows"].shape[0]
        assert set(STAT_KEYS) <= set(z.files) and z["mask"].sum() == summary["summary"]["n_tokens"]
    with open(out / "windows.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == W and float(rows[0]["kl_forward"]) > 0
    assert (out / "llama.txt").read_text() in printed
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert len(pngs) == 5 and (out / "plots" / "index.html").is_file()
    (out / "plots" / pngs[0]).unlink()
    assert visualize_main([str(out)]) == 0 and (out / "plots" / pngs[0]).is_file()
    # an earlier run is kept unless --overwrite
    args = ["--p-model", pair[0], "--q-model", pair[1], "--corpus", str(corpus), "--text-field", "body", "--context",
            "16", "--output-dir", str(out), "--no-plots"]
    assert llm_main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert llm_main(args + ["--overwrite"]) == 0 and not (out / "plots").exists()


def test_dataset_corpus(pair, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [words(50, seed=i) for i in range(3)]}).save_to_disk(str(tmp_path / "ds"))
    res = kle.corpus_kl(*pair, dataset=str(tmp_path / "ds"), context=16, progress=False)
    assert res.corpus["n_documents"] == 3 and res.summary["n_tokens"] > 0


def run_cli(args, capsys):
    try:
        code = llm_main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def unknown_arch_gguf(path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), arch="nosucharch")
    w.add_context_length(64)
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("case", ["empty", "too short", "context beyond", "tokenizers differ", "unknown gguf arch",
                                  "sampling flag", "two sources", "no models", "bad token file", "bad score"])
def test_bad_input_is_one_line_and_writes_nothing(case, pair, tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text(words(200))
    out = tmp_path / "out"
    base = ["--p-model", pair[0], "--q-model", pair[1], "--output-dir", str(out)]
    args, needle = base + ["--corpus", str(corpus), "--context", "16"], None
    if case == "empty":
        corpus.write_text(" \n\n")
        needle = "--corpus: " + str(corpus) + " holds no text"
    elif case == "too short":
        corpus.write_text(words(20))
        needle = "--corpus: too short: 20 tokens"
    elif case == "context beyond":
        args, needle = base + ["--corpus", str(corpus), "--context", "100"], "--context: 100 tokens per window, but"
    elif case == "tokenizers differ":
        other = save_pair(tmp_path / "other", words=("<eos>", "a", "b", "c", "d", "e", "f", "g"))
        args = ["--p-model", pair[0], "--q-model", other[1], "--output-dir", str(out), "--corpus", str(corpus)]
        needle = "--q-model: its tokenizer differs"
    elif case == "unknown gguf arch":
        unknown_arch_gguf(tmp_path / "odd.gguf")
        args = ["--p-model", str(tmp_path / "odd.gguf"), "--q-model", pair[1], "--output-dir", str(out), "--corpus",
                str(corpus)]
        needle = "transformers cannot load GGUF files of architecture 'nosucharch'"
    elif case == "sampling flag":
        args = args + ["--n-samples", "10"]
        needle = "--n-samples: a setting of sampled runs; --corpus makes this a corpus run"
    elif case == "two sources":
        args, needle = args + ["--token-ids", str(corpus)], "--token-ids: give one source of text"
    elif case == "no models":
        args, needle = ["--corpus", str(corpus), "--output-dir", str(out)], "--q-model: a corpus run needs"
    elif case == "bad token file":
        bad = tmp_path / "ids.bin"
        bad.write_bytes(b"not a kld file")
        args, needle = base + ["--token-ids", str(bad), "--context", "16"], "--token-ids: " + str(bad) + " is neither"
    elif case == "bad score":
        args, needle = args + ["--score", "half"], "--score: one of second-half, all"
    code, err = run_cli(args, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err
    assert not out.exists()


def test_api_errors_name_parameters(pair):
    with pytest.raises(ValueError, match="^n_samples: a setting of sampled runs"):
        kle.corpus_kl(*pair, [words(100)], n_samples=3)
    with pytest.raises(ValueError, match="^context: must be an integer ≥ 3"):
        kle.corpus_kl(*pair, [words(100)], context=2)
    with pytest.raises(ValueError, match="^corpus: a file path or a list of texts"):
        kle.corpus_kl(*pair, 42)


def test_a_corpus_run_folder_loads_back_into_the_same_result(pair, tmp_path):
    from kl_estimation.llm.corpus.run import CorpusResult
    from kl_estimation.runio import jsonable

    res = kle.corpus_kl(*pair, [words(80)], context=16, progress=False, output_dir=str(tmp_path / "run"))
    back = CorpusResult.load(tmp_path / "run")
    assert back.folder == res.folder == tmp_path / "run" and back.text == res.text
    assert jsonable(back.to_dict()) == jsonable(res.to_dict())
    assert back.tokens.keys() == res.tokens.keys()
    for k, v in res.tokens.items():
        np.testing.assert_array_equal(back.tokens[k], v)
    assert jsonable(back.windows) == jsonable(res.windows)
    with pytest.raises(ValueError, match="is not a readable corpus run folder"):
        CorpusResult.load(tmp_path)
