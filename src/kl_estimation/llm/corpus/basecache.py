"""P's side of a corpus run on disk (``save_base`` / ``base``): score candidates later without P's body in memory.

    DIR/base.safetensors   hidden (W, keep, hidden size) in P's dtype — the input of P's output head at every
                           position whose logits are scored —, windows, mask, document
    DIR/base.json          what P was and where it came from (its files with size, mtime and the sha256 of its
                           output head), the corpus record, the settings that made the windows, versions
    DIR/tokenizer/         P's tokenizer (candidates are checked against it; the worst tokens are decoded with it);
                           none for llama.cpp's runtime, whose tokenizer is read from P's GGUF again

P's output head is not stored (it is vocabulary × hidden size: 108 MiB of SmolLM2-135M's 135 M parameters in float32):
``base`` reads it from P's own file — loaded as the one-pass run loads P, its head kept and its body released before
any candidate loads — and refuses in one line when that file is missing or its head is not the one the cache was
written with (the sha256 of the head's bytes; a copied file whose mtime changed but whose head is the same is fine).
P's logits are recomputed as head(hidden) with the same weights, dtype and shapes as P's own forward, so a candidate
scored against the cache gets the numbers of a one-pass run bit for bit (tests/test_corpus_compare.py) — unless
``save_base_dtype`` stores the hidden states rounded to bfloat16 / float16 (half the size of float32; P's logits
are then recomputed in P's dtype from the rounded values: the precision is measured in docs/corpus.md). Size per
scored token: hidden size × bytes of the stored dtype (576 × 4 for SmolLM2-135M in float32, 576 × 2 in bfloat16)
against llama.cpp's vocabulary × 2 bytes in its --kl-divergence-base file (49152 × 2 + 8 bytes: 42× and 85×).
Caches written before (with ``head.weight`` inside) still load, their stored head used.

With ``backend="llama.cpp"`` the hidden states are llama.cpp's (its embeddings output, float32) and the head is
P's GGUF tensor applied in ggml's own matmul (backend.GgmlHead): llama.cpp's logits of P bit for bit, checked on
P's first batch when the cache is written, its tensor's sha256 checked when it is read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from kl_estimation import runio

TENSORS = "base.safetensors"
RECORD = "base.json"
# the settings that made the windows: a run against the cache takes them from it
WINDOW_SETTINGS = ("context", "score", "n_windows", "cluster_by", "group_field", "text_field", "n_documents",
                   "corpus", "dataset", "split", "token_ids")


def check_base_folder(folder, overwrite: bool) -> None:
    runio.check_output_dir(folder, "save_base")
    if (Path(folder) / RECORD).exists() and not overwrite:
        raise ValueError(f"save_base: {folder} already holds a base cache; pass `overwrite` to replace it")


def _head_sha256(head: torch.nn.Module) -> str:
    """sha256 of the output head's weight (and bias) bytes, as loaded: what the cache relies on P's file for."""
    import hashlib

    h = hashlib.sha256()
    for t in (head.weight, head.bias):
        if t is not None:
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "config.json")


def _files(name: str | None) -> list[dict]:
    """P's local files (a .gguf file, or a model folder's weights and config) with size and mtime; [] for a hub id
    (its revision names it)."""
    if name is None:
        return []
    path = Path(name)
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = sorted({f for pat in WEIGHT_FILES for f in path.glob(pat)})
    else:
        return []
    return [{"path": str(f.resolve()), "bytes": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in found]


def source_record(cfg, head) -> dict:
    """Where P came from, to read its output head again: the model as given, its revision, adapter, dtype as loaded,
    its local files (size, mtime) and the sha256 of its head."""
    from kl_estimation.llm.corpus.run import resolve_dtype_of
    from kl_estimation.llm.run.config import resolve_device, resolve_dtype

    if not isinstance(head, torch.nn.Module):  # llama.cpp's runtime: the GGUF's head tensor in ggml (GgmlHead)
        return {"backend": "llama.cpp", "model": cfg.p_model, "files": _files(cfg.p_model),
                "head_sha256": head.sha256, "head_tensor": head.tensor, "head_type": head.type_name,
                "head_layout": head.layout, "head_shape": [head.n_vocab, head.n_embd]}
    return {"model": cfg.p_model, "revision": cfg.p_revision, "adapter": cfg.p_adapter,
            "dtype": resolve_dtype(cfg.p_dtype, resolve_device(cfg.device)) if cfg.p_dtype else resolve_dtype_of(cfg),
            "trust_remote_code": cfg.trust_remote_code, "files": _files(cfg.p_model),
            "head_sha256": _head_sha256(head), "head_shape": list(head.weight.shape),
            "head_bias": head.bias is not None}


def save_base(folder, base, cfg, corpus: dict, document: np.ndarray, tokenizer, p_record: dict) -> Path:
    """Write the cache of `base` (run.BaseCache) into `folder`; refused for a P whose logits are not a linear head
    of its final hidden states, or that was given loaded (there is no file to read its head from again)."""
    from safetensors.torch import save_file

    from kl_estimation.llm.corpus.backend import GgmlHead

    if not base.exact_from_hidden or not isinstance(base.head, (torch.nn.Linear, GgmlHead)):
        raise ValueError("save_base: P's logits are not a linear output head applied to its final hidden states "
                         "(soft-capping or scaling after the head); a base cache would not reproduce them — score "
                         "the candidates in one run instead")
    if cfg.p_model is None or cfg.p_model == "(loaded)":
        raise ValueError("save_base: P was given loaded; the cache reads P's output head from P's file, so give "
                         "`p_model` as a path or hub id")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, cfg.save_base_dtype) if cfg.save_base_dtype else base.hidden.dtype
    tensors = {"hidden": base.hidden.to(dt).contiguous(),
               "windows": torch.from_numpy(np.ascontiguousarray(base.windows)),
               "mask": torch.from_numpy(np.ascontiguousarray(base.mask)),
               "document": torch.from_numpy(np.ascontiguousarray(document))}
    tmp = folder / f".{TENSORS}.tmp"
    save_file(tensors, os.fspath(tmp))
    os.replace(tmp, folder / TENSORS)
    if hasattr(tokenizer, "save_pretrained"):  # llama.cpp's is read from P's GGUF again
        tokenizer.save_pretrained(folder / "tokenizer")
    n_scored = int(np.asarray(base.mask).sum())
    file_bytes = (folder / TENSORS).stat().st_size
    runio.write_json(folder / RECORD, {
        "kind": "corpus-base", "p": p_record, "p_source": source_record(cfg, base.head),
        "settings": {k: getattr(cfg, k) for k in WINDOW_SETTINGS},
        "corpus": corpus, "keep": base.keep, "vocab": base.vocab, "dtype": str(dt).replace("torch.", ""),
        "p_dtype": str(base.hidden.dtype).replace("torch.", ""), "exact": dt == base.hidden.dtype,
        "bytes": {"hidden": tensors["hidden"].nbytes, "head": 0, "file": file_bytes,
                  "llama_cpp_base": llama_base_bytes(n_scored, base.vocab, base.windows.shape),
                  "scored_tokens": n_scored},
        "versions": runio.versions("torch", "transformers", "safetensors")})
    return folder


def llama_base_bytes(n_scored: int, vocab: int, windows_shape) -> int:
    """Size of llama.cpp's --kl-divergence-base file for the same windows (perplexity.cpp): the magic and three int32,
    every window's token ids as int32, then per scored token nv = 2·⌈vocab/2⌉ + 4 uint16 (the logits quantized to
    16 bits plus two floats, scale and minimum)."""
    W, n_ctx = windows_shape
    return 8 + 12 + 4 * W * n_ctx + n_scored * 2 * (2 * ((vocab + 1) // 2) + 4)


def size_line(folder) -> str:
    """The cache's size against llama.cpp's base file for the same windows, in words."""
    b = read_record(folder)["bytes"]
    if "llama_cpp_base" not in b:
        return f"{b['file'] / 2**20:.1f} MiB"
    return (f"{b['file'] / 2**20:.2f} MiB for {b['scored_tokens']} scored tokens; llama.cpp's base file for the same "
            f"windows {b['llama_cpp_base'] / 2**20:.1f} MiB, {b['llama_cpp_base'] / b['file']:.0f}× larger")


def read_record(folder) -> dict:
    path = Path(folder) / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"base: {folder} is not a base cache written by `save_base` ({type(err).__name__})") from None
    if rec.get("kind") != "corpus-base" or not (Path(folder) / TENSORS).is_file():
        raise ValueError(f"base: {folder} is not a base cache written by `save_base`")
    return rec


def _check_files(src: dict) -> None:
    for f in src["files"]:
        if not Path(f["path"]).is_file():
            raise ValueError(f"base: P's file {f['path']} is missing; the cache reads P's output head from it — "
                             f"restore the file, or write the cache again with `save_base`")


def _check_sha(src: dict, got: str) -> None:
    if got != src["head_sha256"]:
        changed = [f["path"] for f in src["files"] if not Path(f["path"]).is_file()
                   or (Path(f["path"]).stat().st_size, Path(f["path"]).stat().st_mtime_ns) != (f["bytes"],
                                                                                                f["mtime_ns"])]
        raise ValueError(f"base: P ({src['model']}) changed since the cache was written: its output head's sha256 is "
                         f"{got[:12]}…, the cache's {src['head_sha256'][:12]}…"
                         f"{f' ({len(changed)} file(s) changed: {changed[0]}…)' if changed else ''}; write the cache "
                         f"again with `save_base`")


def read_head(src: dict, device, threads: int | None = None):
    """P's output head read again from P's file as the cache's record names it (loaded as the one-pass run loads P;
    its body released at once; llama.cpp's: the GGUF's head tensor alone, in ggml), checked against the sha256 the
    cache was written with."""
    import gc
    import weakref

    from kl_estimation.llm.loading import _with_adapters, gguf_speedups, load_model
    from kl_estimation.llm.pair import DTYPES, AdapterView, _inner

    _check_files(src)
    if src.get("backend") == "llama.cpp":
        from kl_estimation.llm.corpus.backend import GgmlHead

        head = GgmlHead(src["model"], threads, layout=src.get("head_layout", "plain"))
        _check_sha(src, head.sha256)
        return head
    with gguf_speedups():
        p = load_model("base", src["model"], device, DTYPES[src["dtype"]], None, False, src["revision"],
                       src["trust_remote_code"])
    if src.get("adapter"):
        p = AdapterView(_with_adapters(p, {"p": ("p_adapter", src["adapter"])}, src["model"]), "p")
    h = _inner(p).get_output_embeddings()
    head = torch.nn.Linear(h.weight.shape[1], h.weight.shape[0], bias=h.bias is not None, dtype=h.weight.dtype,
                           device="meta")
    head.load_state_dict({"weight": h.weight.detach().clone(),
                          **({} if h.bias is None else {"bias": h.bias.detach().clone()})}, assign=True)
    body = weakref.ref(next(_inner(p).parameters()))
    del p, h
    if body() is not None:  # a cycle holds P's body (an adapter): collected before any candidate loads
        gc.collect()
    _check_sha(src, _head_sha256(head))
    return head.eval()


def load_base(folder, device, threads: int | None = None):
    """(BaseCache on `device`, P's tokenizer, the cache's record, document (W, n_ctx)). P's output head comes from
    P's file (read_head; llama.cpp's computed with `threads`); a cache of the earlier format holds it."""
    from safetensors.torch import load_file

    from kl_estimation.llm.corpus.run import BaseCache

    rec = read_record(folder)
    t = load_file(os.fspath(Path(folder) / TENSORS))
    if "head.weight" in t:  # written before the head was read from P's file
        w = t["head.weight"]
        dt = getattr(torch, rec.get("p_dtype", rec["dtype"]))  # a rounded cache is computed on in P's dtype
        head = torch.nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in t, dtype=dt, device="meta")
        head.load_state_dict({k.removeprefix("head."): v.to(dt) for k, v in t.items() if k.startswith("head.")},
                             assign=True)
        head = head.to(device).eval()
    else:
        head = read_head(rec["p_source"], device, threads)
    base = BaseCache(t["hidden"], head, None, t["windows"].numpy(), t["mask"].numpy(), rec["keep"], rec["vocab"])
    if rec.get("p_source", {}).get("backend") == "llama.cpp":
        from kl_estimation.llm.corpus.backend import LlamaCppTokenizer

        tokenizer = LlamaCppTokenizer(rec["p_source"]["model"], "base")
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
    return base, tokenizer, rec, t["document"].numpy()
