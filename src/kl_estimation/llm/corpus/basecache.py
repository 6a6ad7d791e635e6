"""P's side of a corpus run on disk (``save_base`` / ``base``): score candidates later without P's body in memory.

    DIR/base.safetensors   hidden (W, keep, hidden size) in P's dtype — the input of P's output head at every
                           position whose logits are scored —, head.weight (and head.bias), windows, mask, document
    DIR/base.json          what P was, the corpus record, the settings that made the windows, versions
    DIR/tokenizer/         P's tokenizer (candidates are checked against it; the worst tokens are decoded with it)

P's logits are recomputed as head(hidden) with the same weights, dtype and shapes as P's own forward, so a candidate
scored against the cache gets the numbers of a one-pass run bit for bit (tests/test_corpus_compare.py) — unless
``save_base_dtype`` stores both rounded to bfloat16 / float16 (half the size of float32; P's logits are then
recomputed in P's dtype from the rounded values: the precision is measured in docs/corpus.md). Size per
scored token: hidden size × bytes of P's dtype (576 × 4 for SmolLM2-135M in float32), against llama.cpp's
vocabulary × 2 bytes (+ 8) in its --kl-divergence-base file; the head is stored once.
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


def save_base(folder, base, cfg, corpus: dict, document: np.ndarray, tokenizer, p_record: dict) -> Path:
    """Write the cache of `base` (run.BaseCache) into `folder`; refused for a P whose logits are not a linear head
    of its final hidden states."""
    from safetensors.torch import save_file

    if not base.exact_from_hidden or not isinstance(base.head, torch.nn.Linear):
        raise ValueError("save_base: P's logits are not a linear output head applied to its final hidden states "
                         "(soft-capping or scaling after the head); a base cache would not reproduce them — score "
                         "the candidates in one run instead")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dt = getattr(torch, cfg.save_base_dtype) if cfg.save_base_dtype else base.hidden.dtype
    tensors = {"hidden": base.hidden.to(dt).contiguous(),
               "head.weight": base.head.weight.detach().cpu().to(dt).contiguous(),
               "windows": torch.from_numpy(np.ascontiguousarray(base.windows)),
               "mask": torch.from_numpy(np.ascontiguousarray(base.mask)),
               "document": torch.from_numpy(np.ascontiguousarray(document))}
    if base.head.bias is not None:
        tensors["head.bias"] = base.head.bias.detach().cpu().to(dt).contiguous()
    tmp = folder / f".{TENSORS}.tmp"
    save_file(tensors, os.fspath(tmp))
    os.replace(tmp, folder / TENSORS)
    tokenizer.save_pretrained(folder / "tokenizer")
    runio.write_json(folder / RECORD, {
        "kind": "corpus-base", "p": p_record, "settings": {k: getattr(cfg, k) for k in WINDOW_SETTINGS},
        "corpus": corpus, "keep": base.keep, "vocab": base.vocab, "dtype": str(dt).replace("torch.", ""),
        "p_dtype": str(base.hidden.dtype).replace("torch.", ""), "exact": dt == base.hidden.dtype,
        "bytes": {"hidden": tensors["hidden"].nbytes, "head": tensors["head.weight"].nbytes,
                  "file": (folder / TENSORS).stat().st_size},
        "versions": runio.versions("torch", "transformers", "safetensors")})
    return folder


def read_record(folder) -> dict:
    path = Path(folder) / RECORD
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"base: {folder} is not a base cache written by `save_base` ({type(err).__name__})") from None
    if rec.get("kind") != "corpus-base" or not (Path(folder) / TENSORS).is_file():
        raise ValueError(f"base: {folder} is not a base cache written by `save_base`")
    return rec


def load_base(folder, device):
    """(BaseCache on `device`, P's tokenizer, the cache's record, document (W, n_ctx))."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from kl_estimation.llm.corpus.run import BaseCache

    rec = read_record(folder)
    t = load_file(os.fspath(Path(folder) / TENSORS))
    w = t["head.weight"]
    dt = getattr(torch, rec.get("p_dtype", rec["dtype"]))  # a rounded cache is computed on in P's dtype
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias="head.bias" in t, dtype=dt, device="meta")
    head.load_state_dict({k.removeprefix("head."): v.to(dt) for k, v in t.items() if k.startswith("head.")},
                         assign=True)
    head = head.to(device).eval()
    base = BaseCache(t["hidden"], head, None, t["windows"].numpy(), t["mask"].numpy(), rec["keep"], rec["vocab"])
    tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
    return base, tokenizer, rec, t["document"].numpy()
