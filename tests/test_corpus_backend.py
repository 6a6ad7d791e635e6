"""Corpus mode's backends without llama.cpp built: llama.cpp's --kl-divergence-base file read as P (a file written
here in its layout), the arithmetic on its stored log-probs, the settings, the unknown-GGUF-type line."""
import numpy as np
import pytest
import torch

from kl_estimation.llm.corpus.backend import KLD_MAGIC, LlamaBaseFile, is_llama_base_file, unknown_gguf_type_error
from kl_estimation.llm.corpus.config import CorpusConfig
from kl_estimation.llm.corpus.stats import token_stats


def llama_codes(x: torch.Tensor) -> np.ndarray:
    """perplexity.cpp's log_softmax (l. 79-105) writing one row: float32 scale, min, then uint16 codes."""
    x = x.float()
    mx, mn = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    mn = torch.maximum(mn, mx - 16)
    lse = torch.log(torch.exp(x - mx).double().sum(-1, keepdim=True)).float()
    scale = (mx - mn) / 65535.0
    code = torch.where(x > mn, torch.round((1 / scale) * (x - mn)), torch.zeros(())).to(torch.int32) & 0xFFFF
    V = x.shape[-1]
    nv = 2 * ((V + 1) // 2) + 4
    out = np.zeros(x.shape[:-1] + (nv,), dtype="<u2")
    head = np.concatenate([scale.numpy(), ((mn - mx) - lse).numpy()], -1).astype("<f4")
    out[..., :4] = head.view("<u2")
    out[..., 4:4 + V] = code.numpy().astype("<u2")
    return out


def write_kld(path, tokens: np.ndarray, logits: torch.Tensor, n_ctx: int) -> None:
    """A --kl-divergence-base file: header, every chunk's token ids, then each chunk's scored rows."""
    W, rows, V = logits.shape
    with open(path, "wb") as fh:
        fh.write(KLD_MAGIC)
        fh.write(np.array([n_ctx, V, W], dtype="<i4").tobytes())
        fh.write(tokens.astype("<i4").tobytes())
        fh.write(llama_codes(logits).tobytes())


@pytest.fixture
def kld_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_ctx, V, W = 16, 37, 3  # an odd vocabulary: rows are padded to an even count
    rows = n_ctx - 1 - n_ctx // 2
    logits = 3 * torch.randn(W, rows, V, generator=g)
    tokens = torch.randint(0, V, (W * n_ctx,), generator=g).numpy()
    path = tmp_path / "base.kld"
    write_kld(path, tokens, logits, n_ctx)
    return path, logits, tokens, n_ctx


def test_base_file_is_read_back(kld_file):
    path, logits, tokens, n_ctx = kld_file
    assert is_llama_base_file(path) and not is_llama_base_file(path.with_name("none"))
    f = LlamaBaseFile(path)
    assert (f.n_ctx, f.vocab, f.keep, f.codes.shape[0]) == (n_ctx, logits.shape[-1], n_ctx - n_ctx // 2, 3)
    np.testing.assert_array_equal(f.tokens, tokens)
    lp = f.logits(1, 3)
    exact = torch.log_softmax(logits[1:3], -1)
    near = exact > exact.amax(-1, keepdim=True) - 16  # below max − 16 llama.cpp keeps the floor only
    step = 16 / 65535
    assert lp.shape == exact.shape and float((lp - exact)[near].abs().max()) <= step
    assert LlamaBaseFile(path, n_windows=2).codes.shape[0] == 2


def test_stored_base_arithmetic_is_llamas(kld_file):
    """Scoring Q against the file's log-probs gives what llama-uint16 storage of the exact logits gives: the same
    dequantized base, the same float32 KL pass (so a base file written by llama.cpp is read as llama.cpp reads it)."""
    path, logits, tokens, n_ctx = kld_file
    f = LlamaBaseFile(path)
    g = torch.Generator().manual_seed(1)
    lq = logits + 0.3 * torch.randn(logits.shape, generator=g)
    tg = torch.from_numpy(tokens.reshape(3, n_ctx)[:, n_ctx // 2 + 1:])
    ref = token_stats(logits, lq, tg, base_storage="llama-uint16")
    got = token_stats(f.logits(0, 3), lq, tg, base_storage="llama-file")
    for k in ("kl_forward", "logp_p", "logp_q", "top1_agree", "delta_p"):
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0, msg=k)


def test_cut_short_or_foreign_files_are_refused(kld_file, tmp_path):
    path, *_ = kld_file
    short = tmp_path / "short.kld"
    short.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="base: .* cut short"):
        LlamaBaseFile(short)
    other = tmp_path / "other.kld"
    other.write_bytes(b"not a llama file")
    with pytest.raises(ValueError, match="not a llama.cpp --kl-divergence-base file"):
        LlamaBaseFile(other)


def test_backend_settings_are_checked():
    with pytest.raises(ValueError, match="^backend: one of transformers, llama.cpp"):
        CorpusConfig(p_model="a", q_model="b", texts=("x",), backend="ggml").validate()
    with pytest.raises(ValueError, match="^runtime_floor: only with `backend` llama.cpp"):
        CorpusConfig(p_model="a", q_model="b", texts=("x",), runtime_floor=True).validate()
    with pytest.raises(ValueError, match="^p_model: the llama.cpp backend runs local .gguf files"):
        CorpusConfig(p_model="HuggingFaceTB/SmolLM2-135M", q_model="b.gguf", texts=("x",),
                     backend="llama.cpp").validate()


def test_unknown_gguf_type_is_one_line():
    err = unknown_gguf_type_error("q_model", "x.gguf", "np.uint32(42) is not a valid GGMLQuantizationType")
    assert "\n" not in str(err) and str(err).startswith("q_model: x.gguf holds Q2_0 tensors (ggml type 42)")
    assert "installed gguf" in str(err) and "llama.cpp" in str(err)
    assert unknown_gguf_type_error("q_model", "x.gguf", "something else") is None
    from kl_estimation.llm.loading import _gguf_error

    assert str(_gguf_error("p_model", "y.gguf", ValueError("np.uint32(99) is not a valid GGMLQuantizationType"))) \
        .startswith("p_model: y.gguf holds tensors of ggml type 99,")
