"""The text of a corpus run: documents from a file or a dataset, their token ids (and the document of every token),
or the token ids llama.cpp stored in a ``--kl-divergence-base`` file.

Documents are joined with ``SEPARATOR`` into one text and tokenized once, as llama.cpp tokenizes one file; each
token belongs to the document its first character lies in (the separator's tokens to the document before it). In
front goes what the tokenizer puts in front of a text by itself (BOS for Llama-style tokenizers, nothing for GPT-2 or
SmolLM2) — llama.cpp's ``common_tokenize(text, add_special=true)`` — and nothing is appended.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SEPARATOR = "\n\n"
KLD_MAGIC = b"_logits_"


def read_documents(corpus=None, texts=None, dataset=None, split: str = "train", text_field: str = "text",
                   n_documents: int | None = None, group_field: str | None = None):
    """The corpus' documents: a .txt file is one document, a .jsonl file one per line (under `text_field`), a
    dataset one per row; the first `n_documents`. Empty documents are dropped; an empty corpus is an error. With
    `group_field` (.jsonl only): (documents, the group of each), a line without that field is an error."""
    groups = []
    if texts is not None:
        docs = list(texts)
        where = "texts"
        for i, t in enumerate(docs):
            if not isinstance(t, str):
                raise ValueError(f"texts: document {i} is a {type(t).__name__}, not text")  # noqa: TRY004 - bad input
    elif dataset is not None:
        from kl_estimation.llm.prompts import read_dataset

        try:
            docs = read_dataset(dataset, split, text_field)
        except ValueError as err:  # its messages name prompt_field: here the field is text_field
            raise ValueError(str(err).replace("prompt_field", "text_field")) from None
        where = f"dataset {dataset!r}"
    else:
        path = Path(corpus)
        where = str(path)
        try:
            raw = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"corpus: cannot read {path}: {type(err).__name__}: {err}") from None
        if path.suffix == ".jsonl":
            docs = []
            for i, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"corpus: {path} line {i} is not JSON ({err.msg})") from None
                if not isinstance(row, dict) or text_field not in row or not isinstance(row[text_field], str):
                    raise ValueError(f"text_field: {path} line {i} has no text under {text_field!r}")
                if group_field is not None and not isinstance(row.get(group_field), (str, int)):
                    raise ValueError(f"group_field: {path} line {i} has no group (a text or a number) under "
                                     f"{group_field!r}")
                docs.append(row[text_field])
                groups.append(str(row.get(group_field)))
        else:
            docs = [raw]
    if group_field is not None and (corpus is None or Path(corpus).suffix != ".jsonl"):
        raise ValueError("group_field: groups are read from a .jsonl corpus (one document per line)")
    if n_documents is not None:
        docs, groups = docs[:n_documents], groups[:n_documents]
    keep = [i for i, d in enumerate(docs) if d.strip()]
    if not keep:
        raise ValueError(f"corpus: {where} holds no text (empty)")
    if group_field is None:
        return [docs[i] for i in keep]
    return [docs[i] for i in keep], [groups[i] for i in keep]


def tokenize_documents(tokenizer, documents: list[str]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(token ids, document index per token, record): the documents joined by SEPARATOR, tokenized once, with what
    the tokenizer puts in front of a text (loading.special_tokens)."""
    from kl_estimation.llm.loading import special_tokens, text_start

    before, _ = special_tokens(tokenizer)
    text = SEPARATOR.join(documents)
    starts = np.cumsum([0] + [len(d) + len(SEPARATOR) for d in documents[:-1]])
    if hasattr(tokenizer, "tokenize_documents"):  # llama.cpp's tokenizer (backend.LlamaCppTokenizer): its own rule
        ids, doc, _ = tokenizer.tokenize_documents(documents)
        before = []  # in front of the first document already
    elif getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        first_char = np.asarray([o[0] for o in enc["offset_mapping"]], dtype=np.int64)
        doc = np.searchsorted(starts, first_char, side="right") - 1
    else:  # no offsets: each document on its own, the separator's tokens after it
        sep = list(tokenizer(SEPARATOR, add_special_tokens=False, verbose=False)["input_ids"])
        parts = [list(tokenizer(d, add_special_tokens=False, verbose=False)["input_ids"])
                 + (sep if i < len(documents) - 1 else []) for i, d in enumerate(documents)]
        ids = np.asarray([t for p in parts for t in p], dtype=np.int64)
        doc = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    ids = np.concatenate([np.asarray(before, dtype=np.int64), ids])
    doc = np.concatenate([np.zeros(len(before), dtype=np.int64), doc]).astype(np.int32)
    record = {"source": "tokenizer", "n_documents": len(documents), "n_characters": len(text),
              "sha256": hashlib.sha256(text.encode()).hexdigest(), "document_separator": SEPARATOR,
              "text_start": text_start(tokenizer)}
    return ids, doc, record


def read_token_ids(path) -> tuple[np.ndarray, dict]:
    """Token ids from llama.cpp's --kl-divergence-base file (b"_logits_", int32 n_ctx, n_vocab, n_chunk, then
    n_chunk·n_ctx int32 token ids: what llama.cpp scored) or a 1-D integer .npy array."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(len(KLD_MAGIC))
        if head == KLD_MAGIC:
            n_ctx, n_vocab, n_chunk = (int(x) for x in np.frombuffer(fh.read(12), dtype="<i4"))
            if min(n_ctx, n_vocab, n_chunk) < 1:
                raise ValueError(f"token_ids: {path} has a corrupt llama.cpp header")
            ids = np.frombuffer(fh.read(4 * n_ctx * n_chunk), dtype="<i4").astype(np.int64)
            if ids.size != n_ctx * n_chunk:
                raise ValueError(f"token_ids: {path} is cut short ({ids.size} of {n_ctx * n_chunk} token ids)")
            return ids, {"source": f"llama.cpp base file {path}", "llama_n_ctx": n_ctx, "llama_n_vocab": n_vocab,
                         "llama_n_chunk": n_chunk}
    try:
        ids = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
        raise ValueError(f"token_ids: {path} is neither a llama.cpp --kl-divergence-base file nor a .npy array "
                         f"({type(err).__name__})") from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids: {path} must hold a 1-D integer array (got {ids.dtype} of shape {ids.shape})")
    return ids.astype(np.int64), {"source": f"token id array {path}"}
