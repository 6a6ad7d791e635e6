r"""A corpus run: teacher-forced KL(P‖Q) over a text, both models on the same windows, in one pass.

    text → token ids (tokenizer, or llama.cpp's own ids from its base file) → llama.cpp's windows (stats.llama_windows)
    → per batch of windows: P's and Q's logits of the scored positions only (``logits_to_keep``), then
    stats.token_stats: per scored token KL(P‖Q), KL(Q‖P) over the full vocabulary, log P(x), log Q(x), top-1 agreement,
    Δp — chunked over positions, float32 or wider, no (B, T, V) float32 copy beyond the logits themselves
    → stats.summarize: llama.cpp's statistics, clustered and token-i.i.d. standard errors.

Memory: the models, one batch of logits (``batch_size`` × scored positions × vocabulary, per model) and per-token
arrays (windows × n_ctx floats): nothing proportional to corpus × vocabulary. Files (``output_dir``): tokens.npz
(per-token arrays), windows.csv (one row per window), summary.json (config, models, versions, every statistic, the
worst tokens in context), llama.txt (the console text); the figures (figures/corpus.py) are drawn from them.

Everything that can be refused is refused before the weights load and before anything is written: the settings,
the output folder, the tokenizers (one shared vocabulary: check_tokenizers), the text (empty, shorter than llama.cpp
accepts), ``context`` beyond the models' positions, a GGUF architecture transformers cannot load.
"""
from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kl_estimation import runio
from kl_estimation.core.estimators import t95
from kl_estimation.core.resources import check_memory, set_threads
from kl_estimation.llm.corpus.config import CORPUS_FILES, CorpusConfig, check_corpus_folder
from kl_estimation.llm.corpus.stats import STAT_KEYS, format_llama, llama_windows, summarize, token_stats
from kl_estimation.llm.corpus.text import read_documents, read_token_ids, tokenize_documents

TOP = 3          # top tokens of P and Q kept for each worst token
CONTEXT_SHOWN = 40  # tokens of context kept before each worst token
CHUNK_TABLE_MAX = 64  # the console shows llama.cpp's running per-window table up to this many windows


@dataclass
class CorpusResult:
    """The outcome of a corpus run: ``summary`` (stats.summarize: ``llama`` — llama.cpp's numbers —, ``means`` with
    clustered and i.i.d. SEs and CIs, ``percentiles``, ``chunks``), per-token arrays ``tokens`` ((W, n_ctx) each:
    ``windows`` input ids, ``mask`` scored targets, ``document``, and the STAT_KEYS, NaN where unscored), one row per
    window (``windows``), the settings, what was loaded (``models``), the text (``corpus``), the ``worst`` tokens in
    context, ``timing``, and the run ``folder`` (None: nothing written)."""

    summary: dict
    tokens: dict = field(repr=False)
    windows: list[dict] = field(repr=False)
    config: dict = field(repr=False)
    models: dict = field(repr=False)
    corpus: dict = field(repr=False)
    worst: list[dict] = field(repr=False)
    timing: dict = field(repr=False)
    folder: Path | None = None

    def mean(self, key: str = "kl_forward") -> dict:
        """One quantity's mean with its SEs and CIs: kl_forward (KL(P‖Q), llama.cpp's KLD), kl_reverse, jeffreys,
        delta_p, same_top, ln_ppl_ratio, nll_q, nll_base; ppl_q, ppl_base, ppl_ratio, rms_dp (as 'value')."""
        return self.summary["means"][key]

    @property
    def text(self) -> str:
        return console_text(self.summary, self.corpus, self.models, self.config)

    def to_dict(self) -> dict:
        return {"kind": "corpus", "config": self.config, "models": self.models, "corpus": self.corpus,
                "summary": self.summary, "worst_tokens": self.worst, "timing": self.timing}

    def __str__(self) -> str:
        return self.text

    def save(self, folder, overwrite: bool = False) -> Path:
        """The run folder: tokens.npz, windows.csv, summary.json, llama.txt, each written atomically; with `overwrite`
        an earlier corpus run's files (and figures) are removed first. Sets and returns ``folder``."""
        folder = Path(folder)
        if overwrite:
            runio.remove(folder / name for name in CORPUS_FILES)
        folder.mkdir(parents=True, exist_ok=True)
        runio.write_npz(folder / "tokens.npz", {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
                                                for k, v in self.tokens.items()})
        runio.write_csv(folder / "windows.csv", self.windows)
        runio.write_json(folder / "summary.json", dict(self.to_dict(), versions=runio.versions(
            "torch", "transformers", "tokenizers", "gguf")))
        runio.write_text(folder / "llama.txt", self.text)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder) -> CorpusResult:
        """A corpus run folder read back (what save wrote; windows.csv's cells as floats, NaN where empty)."""
        import csv

        folder = Path(folder)
        try:
            doc = json.loads((folder / "summary.json").read_text())
            if doc.get("kind") != "corpus":
                raise KeyError("kind")
            llama = doc["summary"]["llama"]  # its (value, error) pairs are tuples in memory, printf's arguments
            doc["summary"]["llama"] = {k: tuple(v) if isinstance(v, list) else v for k, v in llama.items()}
            with np.load(folder / "tokens.npz") as z:
                tokens = {k: z[k] for k in z.files}
            with open(folder / "windows.csv", encoding="utf-8") as fh:
                windows = [{k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
                           for r in csv.DictReader(fh)]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{folder} is not a readable corpus run folder (summary.json, tokens.npz, windows.csv): "
                             f"{type(err).__name__}: {err}") from None
        return cls(doc["summary"], tokens, windows, doc.get("config", {}), doc.get("models", {}),
                   doc.get("corpus", {}), doc.get("worst_tokens", []), doc.get("timing", {}), folder)


# ------------------------------------------------------------------------------------------------------ forward

@torch.inference_mode()
def window_logits(model, ids: torch.Tensor, keep: int, vocab: int) -> torch.Tensor:
    """(B, keep − 1, vocab) logits of positions n_ctx − keep … n_ctx − 2 of full windows `ids` (B, n_ctx): the
    model computes only the last `keep` rows of logits where it can (``logits_to_keep``); padded logit rows beyond
    the tokenizer are cut off (a view)."""
    from kl_estimation.llm.pair import _inner

    inner = _inner(model)
    kw = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(type(inner).forward).parameters else {}
    logits = model(input_ids=ids, use_cache=False, **kw).logits
    if logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits[:, :-1, :vocab]


def _device_of(model) -> torch.device:
    from kl_estimation.llm.loading import main_device

    return main_device(model)


def _top(logits_row: torch.Tensor, k: int):
    lp = torch.log_softmax(logits_row.float(), -1)
    v, i = lp.topk(min(k, lp.numel()))
    return [(int(a), float(b)) for a, b in zip(i.tolist(), v.exp().tolist())]


def score_windows(p, q, windows: np.ndarray, mask: np.ndarray, vocab: int, *, batch_size: int,
                  base_storage: str = "exact", n_worst: int = 0, bar=None) -> tuple[dict, list]:
    """Both models over every window (batches of `batch_size`), token_stats on the scored positions. Returns the
    per-token arrays ((W, n_ctx), NaN / False where unscored) and the `n_worst` tokens of largest KL(P‖Q) as
    (kl, window, position, P's top, Q's top)."""
    W, n_ctx = windows.shape
    cols = np.flatnonzero(mask.any(0))
    s0 = int(cols[0])                      # first scored target; logits from position s0 − 1 on
    keep = n_ctx - s0 + 1
    out = {k: np.full((W, n_ctx), np.nan) for k in STAT_KEYS if k != "top1_agree"}
    out["top1_agree"] = np.zeros((W, n_ctx), dtype=bool)
    dev_p, dev_q = _device_of(p), _device_of(q)
    worst: list = []
    for w0 in range(0, W, batch_size):
        w1 = min(W, w0 + batch_size)
        ids = torch.from_numpy(windows[w0:w1])
        lp = window_logits(p, ids.to(dev_p), keep, vocab)
        lq = window_logits(q, ids.to(dev_q), keep, vocab).to(lp.device)
        tg = ids[:, s0:].to(lp.device)
        m = torch.from_numpy(mask[w0:w1, s0:]).to(lp.device)
        st = token_stats(lp, lq, tg, m, base_storage=base_storage)
        for k in STAT_KEYS:
            out[k][w0:w1, s0:] = st[k].cpu().numpy()
        if n_worst:
            kf = torch.nan_to_num(st["kl_forward"], nan=-math.inf)
            flat = kf.flatten()
            top = flat.topk(min(n_worst, flat.numel()))
            floor = worst[-1][0] if len(worst) >= n_worst else -math.inf
            for val, idx in zip(top.values.tolist(), top.indices.tolist()):
                if val <= floor or not math.isfinite(val):
                    break
                b, t = divmod(idx, kf.shape[1])
                worst.append((val, w0 + b, s0 + t, _top(lp[b, t], TOP), _top(lq[b, t], TOP)))
            worst = sorted(worst, key=lambda r: -r[0])[:n_worst]
        del lp, lq, st
        if bar is not None:
            bar.update(w1 - w0)
    return out, worst


# ------------------------------------------------------------------------------------------------------ the run

def _model_record(cfg: CorpusConfig) -> dict:
    from kl_estimation.llm.loading import is_gguf

    rec = {"p": cfg.p_model, "q": cfg.q_model}
    for side in ("p", "q"):
        name = getattr(cfg, f"{side}_model")
        if getattr(cfg, f"{side}_revision"):
            rec[f"{side}_revision"] = getattr(cfg, f"{side}_revision")
        if getattr(cfg, f"{side}_adapter"):
            rec[f"{side}_adapter"] = getattr(cfg, f"{side}_adapter")
        if is_gguf(name) and Path(name).is_file():
            rec[f"{side}_gguf"] = {"path": str(Path(name).resolve()), "bytes": Path(name).stat().st_size,
                                   "loaded_as": "dequantized to float32 by transformers (gguf_file=)"}
    return rec


def _context_limit(cfg: CorpusConfig) -> tuple[int | None, str]:
    """The positions both models take, from their configs (GGUF: its header) — read before any weights."""
    from kl_estimation.llm.loading import gguf_facts, is_gguf, load_config

    limits = []
    for side in ("p", "q"):
        name = getattr(cfg, f"{side}_model")
        if is_gguf(name) and Path(name).is_file():
            n = gguf_facts(f"{side}_model", name)["context_length"]
        else:
            c = load_config(f"{side}_model", name, getattr(cfg, f"{side}_revision"), cfg.trust_remote_code)
            n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if isinstance(n, int) and n > 0:
            limits.append((n, side))
    return min(limits) if limits else (None, "")


def check_context(context: int, limit: int | None, side: str = "") -> None:
    if limit is not None and context > limit:
        raise ValueError(f"context: {context} tokens per window, but {'the models take' if not side else side.upper() + ' takes'} "
                         f"{limit} positions; use `context` ≤ {limit}")


def corpus_tokens(cfg: CorpusConfig, tokenizer) -> tuple[np.ndarray, np.ndarray, dict]:
    """(token ids, document per token, record) of cfg's text."""
    if cfg.token_ids is not None:
        ids, rec = read_token_ids(cfg.token_ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(tokenizer)):
            raise ValueError(f"token_ids: ids outside the tokenizer's vocabulary [0, {len(tokenizer)}) in "
                             f"{cfg.token_ids}")
        from kl_estimation.llm.loading import text_start

        rec["text_start"] = text_start(tokenizer)
        rec["n_documents"] = 1
        return ids, np.zeros(ids.size, dtype=np.int32), rec
    docs = read_documents(cfg.corpus, cfg.texts, cfg.dataset, cfg.split, cfg.text_field, cfg.n_documents)
    ids, doc, rec = tokenize_documents(tokenizer, docs)
    rec["source"] = (f"file {cfg.corpus}" if cfg.corpus else f"dataset {cfg.dataset} ({cfg.split})" if cfg.dataset
                     else "texts") + ", tokenized by the tokenizer"
    return ids, doc, rec


def bos_of(tokenizer) -> int | None:
    """The BOS id llama.cpp's rule writes over each window's first token: only when the tokenizer puts BOS in front
    of a text by itself (its add_bos); None otherwise."""
    from kl_estimation.llm.loading import special_tokens

    before = special_tokens(tokenizer)[0]
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and before[:1] == [bos] else None


def _batch_bytes(p, q, batch: int, keep: int, vocab_rows: int) -> int:
    """Peak memory of one batch: both models' logits rows (their dtype), their float32 blocks in token_stats, and
    activations of a forward (≈ 30 hidden-size rows per token and layer's worth, taken as 12 MB per window)."""
    size = 0
    for m in (p, q):
        try:
            el = next(m.parameters()).element_size()
        except (StopIteration, AttributeError, TypeError):
            el = 4
        size += batch * keep * vocab_rows * el
    return size + 10 * (1 << 22) * 4 + batch * 12 * (1 << 20)


def run_corpus(cfg: CorpusConfig, *, models=None, tokenizer=None, progress: bool = False) -> CorpusResult:
    """Validate cfg, load (or take) the models, score every window, summarize; write the run folder when
    cfg.output_dir is set. `models`: (P, Q) already loaded, with their shared `tokenizer`."""
    t_start = time.perf_counter()
    cfg = cfg.validate()
    if cfg.output_dir is None:
        return _run_corpus(cfg, models, tokenizer, progress, t_start)
    with runio.RunFolder(cfg.output_dir):  # one run at a time on a folder; checked again now that it is ours
        check_corpus_folder(cfg.output_dir, cfg.overwrite)
        return _run_corpus(cfg, models, tokenizer, progress, t_start)


def _run_corpus(cfg: CorpusConfig, models, tokenizer, progress: bool, t_start: float) -> CorpusResult:
    cfg = replace(cfg, threads=set_threads(cfg.threads))  # the number used, recorded in the run
    from kl_estimation.llm.loading import check_logit_rows, gguf_speedups

    with gguf_speedups():  # each GGUF file parsed once for its tokenizer, config and weights
        p, q, tokenizer, record, prepared = _load(cfg, models, tokenizer)
    _, _, corpus, windows, mask, document, _ = prepared
    W = windows.shape[0]
    vocab = len(tokenizer)
    check_logit_rows(p, q, vocab)
    record["text_start"] = corpus["text_start"]
    record["classes"] = [type(m).__name__ for m in (p, q)]
    keep = cfg.context - int(np.flatnonzero(mask.any(0))[0]) + 1
    rows = max(vocab, _logit_rows(p), _logit_rows(q))
    check_memory(_batch_bytes(p, q, cfg.batch_size, keep, rows), "batch_size",
                 f"a forward batch of {cfg.batch_size} windows of {cfg.context} tokens (vocabulary {vocab})",
                 torch.cuda.mem_get_info(_device_of(p))[0] if _device_of(p).type == "cuda" else None)
    t_loaded = time.perf_counter()
    bar = None
    if progress:
        from kl_estimation import progress as progress_bars

        bar = progress_bars.bar(total=W, desc="corpus windows", unit="window")
    try:
        arrays, worst = score_windows(p, q, windows, mask, vocab, batch_size=cfg.batch_size,
                                      base_storage=cfg.base_storage, n_worst=cfg.n_worst, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    t_scored = time.perf_counter()
    arrays["mask"] = mask
    summary = summarize(arrays, document_index=document if cfg.cluster_by == "document" else None)
    tokens = {"windows": windows, "mask": mask, "document": document, **{k: arrays[k] for k in STAT_KEYS}}
    n_scored = int(mask.sum())
    timing = {"load_s": t_loaded - t_start, "score_s": t_scored - t_loaded, "total_s": time.perf_counter() - t_start,
              "scored_tokens_per_s": n_scored / max(t_scored - t_loaded, 1e-9),
              "window_tokens_per_s": W * cfg.context / max(t_scored - t_loaded, 1e-9), "threads": cfg.threads,
              "device": str(_device_of(p))}
    result = CorpusResult(summary, tokens, window_rows(tokens, summary), cfg.to_dict(), record, corpus,
                          worst_records(worst, windows, document, arrays, tokenizer), timing)
    if cfg.output_dir is not None:
        result.save(cfg.output_dir, cfg.overwrite)
    return result


def _load(cfg: CorpusConfig, models, tokenizer):
    """Tokenizers, the text and its windows, then the weights — in that order, so that everything that can be refused
    is refused before seconds of loading weights."""
    from kl_estimation.llm.loading import load_model_pair, load_tokenizers
    from kl_estimation.llm.run.config import resolve_device, resolve_dtype

    device = resolve_device(cfg.device)
    if models is None:
        tokenizer, _ = load_tokenizers(cfg.p_model, cfg.q_model, p_revision=cfg.p_revision, q_revision=cfg.q_revision,
                                       trust_remote_code=cfg.trust_remote_code, ignore_eos=True)
        check_context(cfg.context, _context_limit(cfg)[0])
    elif tokenizer is None:
        raise ValueError("tokenizer: needed when the models are passed loaded")
    ids, doc, corpus = corpus_tokens(cfg, tokenizer)
    bos = bos_of(tokenizer)
    windows, mask = llama_windows(ids, cfg.context, bos, score=cfg.score, n_chunks=cfg.n_windows)
    W = windows.shape[0]
    document = doc[: W * cfg.context].reshape(W, cfg.context)
    corpus.update(n_tokens=int(ids.size), n_windows=W, tokens_used=int(W * cfg.context),
                  tokens_dropped=int(ids.size - W * cfg.context), bos_replaces_first_token=bos)
    if models is None:
        record = _model_record(cfg)
        dt = resolve_dtype(cfg.dtype, device)
        p, q = load_model_pair(cfg.p_model, cfg.q_model, device=device, dtype=dt,
                               p_dtype=cfg.p_dtype and resolve_dtype(cfg.p_dtype, device),
                               q_dtype=cfg.q_dtype and resolve_dtype(cfg.q_dtype, device), p_adapter=cfg.p_adapter,
                               q_adapter=cfg.q_adapter, device_map=cfg.device_map, offload=cfg.offload,
                               p_revision=cfg.p_revision, q_revision=cfg.q_revision,
                               trust_remote_code=cfg.trust_remote_code)
        record["dtype"] = dt
    else:
        p, q = models
        record = {"p": type(p).__name__ + " (loaded)", "q": type(q).__name__ + " (loaded)"}
        limits = [getattr(m.config, "max_position_embeddings", None) for m in (p, q) if hasattr(m, "config")]
        limits = [n for n in limits if isinstance(n, int) and n > 0]
        check_context(cfg.context, min(limits) if limits else None)
    return p, q, tokenizer, record, (ids, doc, corpus, windows, mask, document, bos)


def _logit_rows(model) -> int:
    from kl_estimation.llm.pair import _inner

    try:
        return int(_inner(model).get_output_embeddings().weight.shape[0])
    except AttributeError:
        return 0


# ------------------------------------------------------------------------------------------------------ records

def window_rows(tokens: dict, summary: dict) -> list[dict]:
    """One row per window: its scored tokens' means (KL both ways, Jeffreys, Δp, top-1 agreement, NLLs, PPLs) and
    KL(P‖Q)'s mean with a token-i.i.d. 95 % interval within the window (tokens of a window share their context: that
    interval is too narrow; the clustered SE of the overall mean accounts for it)."""
    mask = tokens["mask"]
    rows = []
    for w in range(mask.shape[0]):
        m = mask[w]
        n = int(m.sum())
        kf, kr = tokens["kl_forward"][w, m], tokens["kl_reverse"][w, m]
        dp = tokens["delta_p"][w, m]
        nq, nb = -tokens["logp_q"][w, m], -tokens["logp_p"][w, m]
        se = float(kf.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
        t = t95(n - 1)
        docs = tokens["document"][w, m]
        rows.append({"window": w, "first_token": w * mask.shape[1], "first_document": int(docs.min()),
                     "last_document": int(docs.max()), "n_scored": n, "kl_forward": float(kf.mean()),
                     "kl_forward_se_iid": se, "kl_forward_ci_low": float(kf.mean()) - t * se,
                     "kl_forward_ci_high": float(kf.mean()) + t * se, "kl_reverse": float(kr.mean()),
                     "jeffreys": float((kf + kr).mean()), "kl_forward_max": float(kf.max()),
                     "delta_p": float(dp.mean()), "rms_delta_p": float(np.sqrt(np.mean(dp * dp))),
                     "same_top": float(tokens["top1_agree"][w, m].mean()), "nll_q": float(nq.mean()),
                     "nll_base": float(nb.mean()), "ppl_q": float(np.exp(nq.mean())),
                     "ppl_base": float(np.exp(nb.mean()))})
    return rows


def worst_records(worst, windows, document, arrays, tokenizer) -> list[dict]:
    """The tokens of largest KL(P‖Q) with their context as text, both models' probabilities of the actual token and
    their top tokens."""
    def piece(i):
        return tokenizer.decode([int(i)])

    out = []
    for kl, w, t, top_p, top_q in worst:
        tok = int(windows[w, t])
        out.append({"window": int(w), "position": int(t), "document": int(document[w, t]), "token_id": tok,
                    "token": piece(tok), "context": tokenizer.decode([int(i) for i in windows[w, max(0, t - CONTEXT_SHOWN):t]]),
                    "kl_forward": float(kl), "kl_reverse": float(arrays["kl_reverse"][w, t]),
                    "p": float(np.exp(arrays["logp_p"][w, t])), "q": float(np.exp(arrays["logp_q"][w, t])),
                    "top_p": [(piece(i), pr) for i, pr in top_p], "top_q": [(piece(i), pr) for i, pr in top_q]})
    return out


def console_text(summary: dict, corpus: dict, models: dict, config: dict) -> str:
    W = summary["n_windows"]
    head = (f"corpus KL: P = {models.get('p')}, Q = {models.get('q')}\n"
            f"{corpus.get('source')}: {corpus.get('n_tokens')} tokens → {W} windows of {config.get('context')} "
            f"({corpus.get('tokens_dropped')} dropped at the end), {summary['n_tokens']} scored "
            f"({config.get('score')}{', P stored as llama.cpp stores it' if config.get('base_storage') != 'exact' else ''}); "
            f"text starts with {corpus.get('text_start', {}).get('prepended') or 'nothing added'}"
            + (f", BOS id {corpus['bos_replaces_first_token']} replaces each window's first token"
               if corpus.get("bos_replaces_first_token") is not None else "") + "\n")
    body = format_llama(summary, chunks=W <= CHUNK_TABLE_MAX)
    if W > CHUNK_TABLE_MAX:
        body = f"(llama.cpp's running per-window table: {W} windows, see windows.csv)\n\n" + body
    return head + "\n" + body
