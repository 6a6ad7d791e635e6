r"""Which arithmetic a corpus run measures: the scoring backends and llama.cpp's own base file.

    transformers  the weights: a GGUF dequantized by transformers and run in float32 (or the model's dtype) by torch
                  — what the quant does to the model, whatever runs it;
    llama.cpp     llama.cpp's runtime through llama-cpp-python (``pip install 'kl-estimation[llamacpp]'``): the GGUF
                  as users deploy it, llama.cpp's kernels (activations quantized to 8 bits for quantized matmuls,
                  f16 KV cache, its attention) — what llama-perplexity --kl-divergence measures.

Both give the same thing to the statistics: a window's logits at the scored positions, ``(B, keep − 1, vocab)``,
which run.score_windows feeds to stats.token_stats (log-softmax in float32 or wider on our side). The llama.cpp
backend scores the windows as llama-perplexity does (logits only from the first scored position on, BOS over each
window's first token, its context parameters; windows_per_decode says how many share a decode), so the logits are its
bits, and tokenizes with llama.cpp's own tokenizer (LlamaCppTokenizer).

``LlamaBaseFile`` reads llama.cpp's ``--kl-divergence-base`` file as P: its token ids are the windows, its 16-bit
log-probs P's distributions (scored with llama.cpp's own arithmetic, stats ``base_storage="llama-file"``).

The library is found through ``KL_ESTIMATION_LLAMA_CPP`` (the prefix bench/build_llama_cpp.sh installs:
lib/libllama.so, bin/llama-quantize, bin/llama-perplexity) when the binding carries no library of its own.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import torch

BACKENDS = ("transformers", "llama.cpp")
ENV_PREFIX = "KL_ESTIMATION_LLAMA_CPP"
KLD_MAGIC = b"_logits_"
PERPLEXITY_N_BATCH = 2048  # llama-perplexity's default -b: n_batch / n_ctx windows share a decode
PERPLEXITY_N_UBATCH = 512


def windows_per_decode(n_ctx: int) -> int:
    """The windows the llama.cpp backend decodes at once: llama-perplexity's n_parallel (n_batch / n_ctx), so that the
    logits are its bits — except on a CPU build at n_ctx ≥ 512 (n_ubatch), one. There each window fills whole
    ubatches either way and the logits of a run are the same bit for bit (checked at 512 and 1024: Q4_1 against Q4_0
    and Q8_0), with a logits buffer and compute graph a quarter of the size at n_ctx 512. Below 512 several windows
    share a ubatch, and one window per decode moved a Q8_0's mean KL at n_ctx 128 by 6 % (0.00661 → 0.00703)."""
    lib = import_llama_cpp()
    grouped = max(1, PERPLEXITY_N_BATCH // n_ctx)
    return 1 if n_ctx >= PERPLEXITY_N_UBATCH and not lib.llama_supports_gpu_offload() else grouped


def llama_cpp_prefix(prefix=None) -> Path | None:
    """The llama.cpp build prefix: `prefix`, else $KL_ESTIMATION_LLAMA_CPP; None when neither is set."""
    p = prefix or os.environ.get(ENV_PREFIX)
    return Path(p) if p else None


def llama_cpp_tool(name: str, prefix=None) -> Path:
    """bin/`name` (llama-quantize, llama-perplexity) of the llama.cpp prefix; ValueError when it is not built."""
    pre = llama_cpp_prefix(prefix)
    path = pre / "bin" / name if pre else None
    if path is None or not path.is_file():
        raise ValueError(f"llama_cpp: no {name} ({'set ' + ENV_PREFIX if pre is None else f'not in {pre}/bin'}); "
                         f"build it with bench/build_llama_cpp.sh PREFIX and set {ENV_PREFIX}=PREFIX")
    return path


def import_llama_cpp(flag: str = "backend"):
    """llama-cpp-python's low-level module, its library taken from the prefix when the binding has none."""
    pre = llama_cpp_prefix()
    if pre is not None and "LLAMA_CPP_LIB_PATH" not in os.environ and (pre / "lib").is_dir():
        try:
            import importlib.util

            spec = importlib.util.find_spec("llama_cpp")
            own = spec is not None and any(any((Path(d) / "lib").glob("libllama*"))
                                           for d in (spec.submodule_search_locations or []))
        except (ImportError, ValueError):
            own = False
        if not own:
            os.environ["LLAMA_CPP_LIB_PATH"] = str(pre / "lib")
    try:
        import llama_cpp.llama_cpp as lib
    except (ImportError, RuntimeError, OSError) as err:
        raise ValueError(f"{flag}: llama.cpp needs the llama-cpp-python package and its library (pip install "
                         f"'kl-estimation[llamacpp]', or bench/build_llama_cpp.sh with {ENV_PREFIX} set): "
                         f"{type(err).__name__}: {' '.join(str(err).split())[:160]}") from None
    return lib


_BACKEND_READY = False


def _quiet_backend(lib) -> None:
    """llama.cpp's backend initialized once, its log (hundreds of lines per load) down to errors."""
    global _BACKEND_READY
    if _BACKEND_READY:
        return
    from llama_cpp._logger import set_verbose

    set_verbose(False)
    lib.llama_backend_init()
    _BACKEND_READY = True


class _LlamaFile:
    """A GGUF file loaded by llama.cpp (its weights, or with `vocab_only` its vocabulary alone), freed by close(), at
    the end of a ``with`` block or when garbage-collected."""

    def __init__(self, path, flag: str, vocab_only: bool = False):
        self.lib = lib = import_llama_cpp(flag)
        _quiet_backend(lib)
        self.path = str(path)
        mp = lib.llama_model_default_params()
        mp.vocab_only = vocab_only
        self.model = lib.llama_model_load_from_file(self.path.encode(), mp)
        if not self.model:
            what = "read the vocabulary of" if vocab_only else "load"
            raise ValueError(f"{flag}: llama.cpp cannot {what} {self.path}")

    def close(self) -> None:
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except (TypeError, AttributeError):  # interpreter shutdown: the library's functions are gone already
            pass


class LlamaCppModel(_LlamaFile):
    """A GGUF file in llama.cpp's runtime, scoring windows as llama-perplexity does. ``window_logits(ids, keep,
    vocab)``: the float32 logits (B, keep − 1, vocab) of positions n_ctx − keep … n_ctx − 2 of full windows `ids` —
    when B fits one decode (B ≤ n_seq), a view of llama.cpp's own buffer, valid until this model decodes again."""

    backend = "llama.cpp"

    def __init__(self, path, n_ctx: int, threads: int | None = None, flag: str = "q_model"):
        super().__init__(path, flag)
        lib, self.n_ctx = self.lib, int(n_ctx)
        vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.bos = int(lib.llama_vocab_bos(vocab)) if lib.llama_vocab_get_add_bos(vocab) else None
        self.n_seq = windows_per_decode(self.n_ctx)
        cp = lib.llama_context_default_params()
        cp.n_ctx = self.n_seq * self.n_ctx
        cp.n_batch = min(PERPLEXITY_N_BATCH, cp.n_ctx)
        cp.n_ubatch = min(PERPLEXITY_N_UBATCH, cp.n_batch)
        cp.n_seq_max = self.n_seq
        cp.kv_unified = False
        cp.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO
        if threads:
            cp.n_threads = cp.n_threads_batch = int(threads)
        self.threads = int(cp.n_threads_batch)
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            self.close()  # the model freed once: the finalizer must not free it again
            raise ValueError(f"{flag}: llama.cpp cannot make a context of {cp.n_ctx} tokens for {self.path}")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        super().close()

    def window_logits(self, ids: torch.Tensor, keep: int, vocab: int, hidden: bool = False):
        """With `hidden`: (logits, final hidden states (B, keep, n_embd) of positions n_ctx − keep … n_ctx − 1, the
        input of the output head after the final norm). llama.cpp hands hidden states out only with embeddings on,
        which outputs every position (its head then runs on all n_ctx rows: the logits of the scored rows are the
        same bits, tests/test_llama_cpp.py)."""
        lib = self.lib
        ids = np.ascontiguousarray(ids.cpu().numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int32)
        B, n_ctx = ids.shape
        if n_ctx != self.n_ctx:
            raise ValueError(f"context: the llama.cpp context holds windows of {self.n_ctx}, got {n_ctx}")
        lib.llama_set_embeddings(self.ctx, hidden)
        out = np.empty((B, keep - 1, vocab), dtype=np.float32) if B > self.n_seq or hidden else None
        h_out = np.empty((B, keep, int(lib.llama_model_n_embd(self.model))), dtype=np.float32) if hidden else None
        first = n_ctx - keep
        for b0 in range(0, B, self.n_seq):
            nb = min(self.n_seq, B - b0)
            N = nb * n_ctx
            # the batch in arrays of our own (llama_batch_init's per-token seq_id arrays would need a loop)
            tok = ids[b0:b0 + nb].reshape(-1).copy()
            pos = np.tile(np.arange(n_ctx, dtype=np.int32), nb)
            seq = np.repeat(np.arange(nb, dtype=np.int32), n_ctx)
            seq_ptr = (seq.ctypes.data + 4 * np.arange(N, dtype=np.uintp)).astype(np.uintp)
            n_seq_id = np.ones(N, dtype=np.int32)
            want = (pos >= (0 if hidden else first)).astype(np.int8)  # embeddings on: every position is output
            P = ctypes.POINTER
            batch = lib.llama_batch(
                n_tokens=N, token=tok.ctypes.data_as(P(lib.llama_token)), embd=None,
                pos=pos.ctypes.data_as(P(lib.llama_pos)), n_seq_id=n_seq_id.ctypes.data_as(P(ctypes.c_int32)),
                seq_id=ctypes.cast(seq_ptr.ctypes.data, P(P(lib.llama_seq_id))),
                logits=want.ctypes.data_as(P(ctypes.c_int8)))
            lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
            rc = lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama.cpp: llama_decode failed ({rc}) on {self.path}")
            rows_out = n_ctx if hidden else keep  # with embeddings on, every position is an output
            rows = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(nb * rows_out * self.n_vocab,))
            rows = rows.reshape(nb, rows_out, self.n_vocab)[:, rows_out - keep:]
            if hidden:
                emb = np.ctypeslib.as_array(lib.llama_get_embeddings(self.ctx), shape=(nb * n_ctx * h_out.shape[2],))
                h_out[b0:b0 + nb] = emb.reshape(nb, n_ctx, -1)[:, first:]
            if out is None:  # one decode: its logits where llama.cpp keeps them, not a copy of 200 MB per 4 windows
                return torch.from_numpy(rows)[:, :-1, :vocab]
            out[b0:b0 + nb] = rows[:, :-1, :vocab]
        return (torch.from_numpy(out), torch.from_numpy(h_out)) if hidden else torch.from_numpy(out)

    def output_head(self) -> GgmlHead:
        """This file's output head in ggml, as this runtime applies it (GgmlHead)."""
        return GgmlHead(self.path, self.threads, "p_model")

class _Ggml:
    """The ggml calls GgmlHead makes, from the libraries beside the libllama llama-cpp-python loaded."""

    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    # ggml.h's struct ggml_tensor (llama-cpp-python 0.3.36): where `data`, `name` and `extra` sit, checked at use
    DATA, NAME, EXTRA = 248, 256, 320
    _loaded = None

    @classmethod
    def get(cls, flag: str):
        if cls._loaded is None:
            lib = import_llama_cpp(flag)
            where = Path(lib._lib._name).parent
            g = {n: ctypes.CDLL(str(next(where.glob(f"lib{n}.so*")))) for n in ("ggml-base", "ggml-cpu", "ggml")}
            vp, i64, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t
            fns = {}
            for lib_name, fn, args, res in (
                    ("ggml-base", "ggml_init", [cls.InitParams], vp), ("ggml-base", "ggml_free", [vp], None),
                    ("ggml-base", "ggml_new_tensor_2d", [vp, ctypes.c_int, i64, i64], vp),
                    ("ggml-base", "ggml_set_name", [vp, ctypes.c_char_p], vp),
                    ("ggml-base", "ggml_mul_mat", [vp, vp, vp], vp), ("ggml-base", "ggml_new_graph", [vp], vp),
                    ("ggml-base", "ggml_build_forward_expand", [vp, vp], None),
                    ("ggml-base", "ggml_get_data", [vp], vp), ("ggml-base", "ggml_nbytes", [vp], sz),
                    ("ggml-base", "ggml_tensor_overhead", [], sz), ("ggml-base", "ggml_graph_overhead", [], sz),
                    ("ggml-base", "ggml_backend_alloc_ctx_tensors_from_buft", [vp, vp], vp),
                    ("ggml-base", "ggml_backend_tensor_set", [vp, vp, sz, sz], None),
                    ("ggml-base", "ggml_backend_tensor_get", [vp, vp, sz, sz], None),
                    ("ggml-base", "ggml_backend_graph_compute", [vp, vp], ctypes.c_int),
                    ("ggml-base", "ggml_backend_buffer_free", [vp], None),
                    ("ggml-base", "ggml_backend_free", [vp], None),
                    ("ggml-base", "ggml_backend_cpu_buffer_type", [], vp),
                    ("ggml-base", "ggml_backend_buft_name", [vp], ctypes.c_char_p),
                    ("ggml-base", "ggml_backend_dev_backend_reg", [vp], vp),
                    ("ggml-base", "ggml_backend_reg_get_proc_address", [vp, ctypes.c_char_p], vp),
                    ("ggml", "ggml_backend_dev_by_type", [ctypes.c_int], vp),
                    ("ggml-cpu", "ggml_backend_cpu_init", [], vp),
                    ("ggml-cpu", "ggml_backend_cpu_set_n_threads", [vp, ctypes.c_int], None)):
                f = getattr(g[lib_name], fn)
                f.argtypes, f.restype = args, res
                fns[fn.removeprefix("ggml_")] = f
            cls._loaded = type("GgmlCalls", (), {k: staticmethod(v) for k, v in fns.items()})
        return cls._loaded

    @classmethod
    def repack_buft(cls, g):
        """The CPU backend's CPU_REPACK buffer type (weights laid out for this CPU's kernels), or None."""
        dev = g.backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        fn = g.backend_reg_get_proc_address(g.backend_dev_backend_reg(dev), b"ggml_backend_dev_get_extra_bufts")
        if not fn:
            return None
        bufts = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn)(dev)
        i = 0
        while bufts and bufts[i]:
            if g.backend_buft_name(bufts[i]) == b"CPU_REPACK":
                return bufts[i]
            i += 1
        return None


class GgmlHead:
    """A GGUF's output head as llama.cpp's runtime applies it: the head tensor (``output.weight``, or
    ``token_embd.weight`` when the embedding is tied) in the file's own quantization, multiplied by final hidden states
    (after the final norm, float32) in ggml's own mul_mat on its CPU backend — the operation llama.cpp's graph ends
    with, so head(hidden) is llama.cpp's logits bit for bit. `layout`: "plain", or "repack" — the weight in the CPU
    backend's CPU_REPACK buffer, as llama.cpp lays out a head its CPU kernels repack (Q4_0, Q4_K, IQ4_NL on AVX2);
    which one llama.cpp used is found by checking P's first batch (``repacked()``: the other layout, None when this
    CPU repacks no weight of this type and shape). Called on (…, hidden size) float32, returns (…, vocabulary)
    float32; ``sha256`` is the head's bytes'."""

    def __init__(self, path, threads: int | None = None, flag: str = "base", layout: str = "plain"):
        import hashlib

        from gguf import GGUFReader

        from kl_estimation.llm.loading import gguf_speedups

        self.g = _Ggml.get(flag)
        self.path, self.threads, self.layout, self.flag = str(path), int(threads or os.cpu_count() or 1), layout, flag
        with gguf_speedups():
            tensors = {t.name: t for t in GGUFReader(self.path).tensors}
        t = tensors.get("output.weight") or tensors.get("token_embd.weight")
        if t is None:
            raise ValueError(f"{flag}: {self.path} has neither output.weight nor token_embd.weight")
        raw = np.ascontiguousarray(np.asarray(t.data)).view(np.uint8).reshape(-1)
        self.tensor, self.type_name, self.type = t.name, t.tensor_type.name, int(t.tensor_type)
        self.n_embd, self.n_vocab = (int(n) for n in t.shape[:2])
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._place(raw)

    def _place(self, raw: np.ndarray) -> None:
        """The head's bytes into a ggml buffer of this head's layout, and a CPU backend to compute with."""
        g = self.g
        self.backend = self.buf = None
        self.ctx = g.init(_Ggml.InitParams(4 * g.tensor_overhead(), None, True))
        self.w = g.new_tensor_2d(self.ctx, self.type, self.n_embd, self.n_vocab)
        if g.nbytes(self.w) != raw.nbytes:
            raise ValueError(f"{self.flag}: {self.path}'s {self.tensor} holds {raw.nbytes} bytes, ggml expects "
                             f"{g.nbytes(self.w)} for {self.type_name} {self.n_embd} × {self.n_vocab}")
        g.set_name(self.w, b"head")
        buft = g.backend_cpu_buffer_type() if self.layout == "plain" else _Ggml.repack_buft(g)
        self.buf = g.backend_alloc_ctx_tensors_from_buft(self.ctx, buft) if buft else None
        if self.buf is None:
            raise ValueError(f"{self.flag}: ggml has no {self.layout} buffer for {self.tensor}")
        if self.layout == "repack" and not self._repack_traits():
            raise ValueError(f"{self.flag}: this CPU's ggml repacks no {self.type_name} weight of {self.n_vocab} "
                             f"rows")
        g.backend_tensor_set(self.w, raw.ctypes.data, 0, raw.nbytes)
        self.backend = g.backend_cpu_init()
        g.backend_cpu_set_n_threads(self.backend, self.threads)

    def _repack_traits(self) -> bool:
        """Whether the repack buffer found kernels for the weight (its tensor's `extra`; the struct offsets are
        checked against ggml_get_data and the name set)."""
        at = ctypes.c_void_p.from_address
        if at(self.w + _Ggml.DATA).value != self.g.get_data(self.w) or \
                ctypes.string_at(self.w + _Ggml.NAME, 4) != b"head":
            return False  # another ggml_tensor layout: not guessed at
        return bool(at(self.w + _Ggml.EXTRA).value)

    def repacked(self) -> GgmlHead | None:
        """The same head in the repack layout, its bytes taken from this plain one (the file is not read again)."""
        if self.layout != "plain":
            return None
        raw = np.empty(self.g.nbytes(self.w), dtype=np.uint8)
        self.g.backend_tensor_get(self.w, raw.ctypes.data, 0, raw.nbytes)
        other = object.__new__(GgmlHead)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("ctx", "w", "buf", "backend")},
                              layout="repack")
        try:
            other._place(raw)
        except ValueError:
            other.close()
            return None
        return other

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        g = self.g
        x = np.ascontiguousarray(hidden.detach().cpu().float().numpy())
        lead, n = x.shape[:-1], int(np.prod(x.shape[:-1]))
        if x.shape[-1] != self.n_embd:
            raise ValueError(f"base: hidden states of size {x.shape[-1]}, {self.tensor} takes {self.n_embd}")
        ctx = g.init(_Ggml.InitParams(8 * g.tensor_overhead() + g.graph_overhead(), None, True))
        buf = None
        try:
            xt = g.new_tensor_2d(ctx, 0, self.n_embd, n)  # GGML_TYPE_F32
            y = g.mul_mat(ctx, self.w, xt)
            graph = g.new_graph(ctx)
            g.build_forward_expand(graph, y)
            buf = g.backend_alloc_ctx_tensors_from_buft(ctx, g.backend_cpu_buffer_type())
            g.backend_tensor_set(xt, x.ctypes.data, 0, x.nbytes)
            if g.backend_graph_compute(self.backend, graph) != 0:
                raise RuntimeError("ggml: the output head's matmul failed")  # pragma: no cover
            out = np.empty((n, self.n_vocab), dtype=np.float32)
            g.backend_tensor_get(y, out.ctypes.data, 0, out.nbytes)
        finally:
            if buf:
                g.backend_buffer_free(buf)
            g.free(ctx)
        return torch.from_numpy(out).reshape(*lead, self.n_vocab)

    def close(self) -> None:
        g = getattr(self, "g", None)
        if g is None:
            return
        for attr, free in (("backend", g.backend_free), ("buf", g.backend_buffer_free), ("ctx", g.free)):
            if getattr(self, attr, None):
                free(getattr(self, attr))
                setattr(self, attr, None)

    def __del__(self):
        try:
            self.close()
        except (TypeError, AttributeError):  # interpreter shutdown
            pass


def load_llama_cpp(flag: str, name: str, n_ctx: int, threads: int | None = None) -> LlamaCppModel:
    """A .gguf file in llama.cpp's runtime; anything else is refused in one line naming `flag`."""
    from kl_estimation.llm.loading import is_gguf

    if not (is_gguf(name) and Path(name).is_file()):
        raise ValueError(f"{flag}: the llama.cpp backend runs local .gguf files (got {name!r})")
    return LlamaCppModel(name, n_ctx, threads, flag)


class LlamaCppTokenizer(_LlamaFile):
    """A GGUF's tokenizer in llama.cpp (its vocabulary alone, no weights): what a llama.cpp-backend run tokenizes,
    decodes and checks its candidates with, in place of transformers' tokenizer of the GGUF — whose conversion took
    7.6 s and 440 MB on SmolLM2, and which splits some texts differently from llama.cpp. The part of a transformers
    tokenizer a corpus run uses: ``len``, ``tokenizer(text, add_special_tokens=…)["input_ids"]``, ``decode``,
    ``convert_ids_to_tokens``, ``get_vocab``, the BOS / EOS ids."""

    is_fast = False  # no offsets: documents are tokenized one by one (tokenize_documents)

    def __init__(self, path, flag: str = "p_model"):
        super().__init__(path, flag, vocab_only=True)
        lib = self.lib
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_tokens = int(lib.llama_vocab_n_tokens(self.vocab))
        self.bos_token_id = self._id(lib.llama_vocab_bos(self.vocab))
        self.eos_token_id = self._id(lib.llama_vocab_eos(self.vocab))
        self.bos_token = None if self.bos_token_id is None else self.convert_ids_to_tokens([self.bos_token_id])[0]
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))

    @staticmethod
    def _id(token) -> int | None:
        return None if int(token) < 0 else int(token)

    def __len__(self) -> int:
        return self.n_tokens

    def bos(self) -> int | None:
        """The BOS id llama-perplexity writes over each window's first token (None: the vocabulary adds no BOS)."""
        return self.bos_token_id if self.add_bos else None

    def encode(self, text: str, add_special: bool) -> np.ndarray:
        raw = text.encode()
        cap = len(raw) + 16
        for _ in range(2):
            buf = (self.lib.llama_token * cap)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, False)
            if n >= 0:
                return np.ctypeslib.as_array(buf)[:n].astype(np.int64)
            cap = -n  # too small a buffer: llama.cpp says how many it needs
        raise RuntimeError("llama.cpp: llama_tokenize failed")  # pragma: no cover

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens).tolist()}

    def convert_ids_to_tokens(self, ids) -> list[str]:
        return [self.lib.llama_vocab_get_text(self.vocab, int(i)).decode("utf-8", "replace") for i in ids]

    def get_vocab(self) -> dict:
        """{token's bytes: id} (bytes: byte-fallback pieces are not UTF-8)."""
        return {self.lib.llama_vocab_get_text(self.vocab, i): i for i in range(self.n_tokens)}

    def decode(self, ids) -> str:
        toks = (self.lib.llama_token * len(ids))(*(int(i) for i in ids))
        cap = 8 * len(ids) + 16
        for _ in range(2):
            buf = ctypes.create_string_buffer(cap)
            n = self.lib.llama_detokenize(self.vocab, toks, len(ids), buf, cap, False, True)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            cap = -n
        raise RuntimeError("llama.cpp: llama_detokenize failed")  # pragma: no cover

    def tokenize_documents(self, documents: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
        """(token ids, document per token, record) as llama-perplexity tokenizes a text: its special tokens added in
        front (BOS where the vocabulary adds one), special-token text not parsed. One document is llama-perplexity's
        exact ids; several are tokenized one by one, text.SEPARATOR after each."""
        from kl_estimation.llm.corpus.text import SEPARATOR

        sep = self.encode(SEPARATOR, False)
        parts = [np.concatenate([self.encode(d, i == 0), sep if i < len(documents) - 1 else sep[:0]])
                 for i, d in enumerate(documents)]
        ids = np.concatenate(parts)
        doc = np.repeat(np.arange(len(parts), dtype=np.int32), [len(p) for p in parts])
        return ids, doc, {"tokenizer": f"llama.cpp's of {Path(self.path).name}"}


def llama_vocab_bos(path) -> int | None:
    """The BOS id llama-perplexity writes over each window's first token (None: the vocabulary adds no BOS)."""
    with LlamaCppTokenizer(path) as tok:
        return tok.bos()


# ----------------------------------------------------------------------------------------- llama.cpp's base file

def is_llama_base_file(path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(KLD_MAGIC)) == KLD_MAGIC
    except OSError:
        return False


class LlamaBaseFile:
    """llama.cpp's ``--kl-divergence-base`` file as P: b"_logits_", uint32 n_ctx, int32 n_vocab, int32 n_chunk, the
    n_chunk · n_ctx token ids, then per chunk n_ctx − 1 − n_ctx/2 rows of nv = 2⌈n_vocab/2⌉ + 4 uint16: the row's
    float32 scale and minimum, then the log-probs as uint16 codes (log p = scale · code + min). Read by memory map:
    ``logits(w0, w1)`` dequantizes only those windows (float32 log-probs, (w1 − w0, keep − 1, n_vocab))."""

    exact_from_hidden = False
    nbytes = 0
    description = "llama.cpp's base file: its 16-bit log-probs of P"

    def __init__(self, path, n_windows: int | None = None):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            if fh.read(len(KLD_MAGIC)) != KLD_MAGIC:
                raise ValueError(f"base: {path} is not a llama.cpp --kl-divergence-base file")
            n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(fh.read(12), dtype="<i4"))
        if min(n_ctx, n_vocab, n_chunk) < 1:
            raise ValueError(f"base: {path} has a corrupt llama.cpp header")
        self.n_ctx, self.vocab = n_ctx, n_vocab
        self.rows = n_ctx - 1 - n_ctx // 2
        self.nv = 2 * ((n_vocab + 1) // 2) + 4
        head = len(KLD_MAGIC) + 12
        tok_bytes = 4 * n_ctx * n_chunk
        size = self.path.stat().st_size
        full = (size - head - tok_bytes) // (2 * self.rows * self.nv)
        if size < head + tok_bytes or full < 1:
            raise ValueError(f"base: {path} is cut short (no complete window of log-probs)")
        # llama.cpp writes the token ids of every chunk it was asked for, log-probs of those it finished
        W = min(n_chunk, full, n_windows or n_chunk)
        ids = np.memmap(self.path, dtype="<i4", mode="r", offset=head, shape=(n_chunk * n_ctx,))
        self.tokens = np.asarray(ids[: W * n_ctx], dtype=np.int64)
        self.codes = np.memmap(self.path, dtype="<u2", mode="r", offset=head + tok_bytes,
                               shape=(W, self.rows, self.nv))
        self.keep = self.rows + 1
        self.windows = self.mask = None  # set by the run once its BOS rule is known

    def device(self) -> torch.device:
        return torch.device("cpu")

    def logits(self, w0: int, w1: int) -> torch.Tensor:
        c = np.asarray(self.codes[w0:w1])
        sm = np.ascontiguousarray(c[..., :4]).view("<f4")  # (B, rows, 2): scale, min
        lp = sm[..., :1] * c[..., 4:4 + self.vocab].astype(np.float32) + sm[..., 1:2]
        return torch.from_numpy(lp)

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size


# ------------------------------------------------------------------------------------------ GGUF types gguf lacks

# ggml.h's types past what gguf 0.19.0 (PyPI's newest today) knows: named for the one-line error
GGML_TYPE_NAMES = {41: "Q1_0", 42: "Q2_0"}


def unknown_gguf_type_error(flag: str, name: str, text: str) -> ValueError | None:
    """gguf-py's "np.uint32(42) is not a valid GGMLQuantizationType" as one line naming the type and what reads it."""
    import re

    m = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", text)
    if not m:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        have = version("gguf")
    except PackageNotFoundError:  # pragma: no cover - gguf raised the error
        have = "?"
    num = int(m[1])
    kind = f"{GGML_TYPE_NAMES[num]} tensors (ggml type {num})" if num in GGML_TYPE_NAMES else \
        f"tensors of ggml type {num}"
    return ValueError(f"{flag}: {name} holds {kind}, which the installed gguf {have} "
                      f"cannot read (no gguf release reads them yet: llama.cpp's own gguf-py does, pip install "
                      f"'gguf @ git+https://github.com/ggml-org/llama.cpp#subdirectory=gguf-py'), or use a type it "
                      f"reads")


# ------------------------------------------------------------------------------------- llama.cpp's own tools

def llama_tool_env(tool: Path) -> dict:
    """The environment a built tool runs in: its prefix's lib/ on the library path."""
    lib = tool.parent.parent / "lib"
    return dict(os.environ, LD_LIBRARY_PATH=f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}")


def llama_quantize(src, dst, qtype: str, prefix=None, threads: int | None = None, options=()) -> Path:
    """`src` requantized by llama.cpp's llama-quantize to `qtype` (Q8_0, Q6_K, Q5_K_M, Q4_K_M, IQ4_XS, …):
    --allow-requantize, since the wheel's GGUF is itself quantized (Q4_1), and its `options` (e.g.
    ``("--output-tensor-type", "q4_0")``). Written to a temporary name, then renamed."""
    import subprocess

    tool = llama_cpp_tool("llama-quantize", prefix)
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    cmd = [str(tool), "--allow-requantize", *options, str(src), str(tmp), qtype] + ([str(threads)] if threads else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=llama_tool_env(tool))
    if r.returncode or not tmp.is_file():
        raise RuntimeError(f"llama-quantize {qtype} failed: {(r.stdout + r.stderr)[-400:]}")
    os.replace(tmp, dst)
    return dst


def llama_perplexity(model, kld_base, *, corpus=None, context: int = 512, threads: int | None = None,
                     chunks: int | None = None, prefix=None) -> str:
    """Run llama-perplexity on `model`: with `corpus`, write `kld_base` (--kl-divergence-base: P's log-probs);
    without, score `model` against it (--kl-divergence). Returns its console text (stdout + stderr)."""
    import subprocess

    tool = llama_cpp_tool("llama-perplexity", prefix)
    cmd = [str(tool), "-m", str(model), "-c", str(context), "--kl-divergence-base", str(kld_base)]
    cmd += ["-f", str(corpus)] if corpus is not None else ["--kl-divergence"]
    cmd += (["-t", str(threads)] if threads else []) + (["--chunks", str(chunks)] if chunks else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=llama_tool_env(tool))
    if r.returncode:
        raise RuntimeError(f"llama-perplexity failed: {(r.stdout + r.stderr)[-600:]}")
    return r.stdout + r.stderr


def llama_mean_kld(text: str) -> tuple[float, float]:
    """llama-perplexity --kl-divergence's "Mean    KLD:   x ± y"."""
    import re

    m = re.search(r"^Mean\s+KLD:\s+([-\d.e]+)\s+±\s+([-\d.e]+)", text, flags=re.MULTILINE)
    if not m:
        raise ValueError("llama-perplexity printed no Mean KLD")
    return float(m[1]), float(m[2])
