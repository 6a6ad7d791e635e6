r"""A corpus run: teacher-forced KL(P‖Q) over a text, P and one or several candidates Q on the same windows.

    text → token ids (tokenizer, or llama.cpp's own ids from its base file) → llama.cpp's windows (stats.llama_windows)
    → P over every window once (base_pass): the input of its output head at the scored positions (``logits_to_keep``)
      is kept — or read from a cache written earlier (``base``, basecache.py) — and P's body is released
    → each candidate Q in turn, loaded alone: per batch of windows Q's logits, P's as head(hidden) (the same bits as
      P's own forward, checked on the first batch), then stats.token_stats: per scored token KL(P‖Q), KL(Q‖P) over the
      full vocabulary, log P(x), log Q(x), top-1 agreement, Δp — chunked over positions, float32 or wider
    → stats.summarize: llama.cpp's statistics, clustered and token-i.i.d. standard errors, percentile CIs
    → several candidates: compare.py's table and paired differences.

Memory: the larger of P and one candidate (never both), P's hidden states (windows × scored positions × hidden size
in P's dtype), one batch of logits per model and per-token arrays (windows × n_ctx floats): nothing proportional to
corpus × vocabulary. Where P's logits are not hidden × head (llama.cpp's runtime, soft-capped heads) they go whole to
a temporary file in the run folder instead (SpilledLogits: disk, not memory), removed when the run ends.
Files (``output_dir``): tokens.npz (per-token arrays), windows.csv (one row per window), summary.json (config,
models, versions, every statistic, the worst tokens in context), llama.txt (the console text); several candidates:
each one's folder under candidates/ and comparison.json / .csv; the figures (figures/corpus.py) are drawn from them.

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
from kl_estimation.llm.corpus.backend import is_llama_base_file
from kl_estimation.llm.corpus.config import CORPUS_FILES, CorpusConfig, check_corpus_folder
from kl_estimation.llm.corpus.stats import STAT_KEYS, cluster_mean, format_llama, llama_windows, summarize, token_stats
from kl_estimation.llm.corpus.text import read_documents, read_token_ids, tokenize_documents

TOP = 3          # top tokens of P and Q kept for each worst token
CONTEXT_SHOWN = 40  # tokens of context kept before each worst token
CHUNK_TABLE_MAX = 64  # the console shows llama.cpp's running per-window table up to this many windows
CHUNK_WIDTH = 125  # columns of that table's lines (llama.cpp's printf format)
LOW_PRECISION = ("bfloat16", "float16")  # dtypes whose own arithmetic is a KL floor the console warns of


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
        """The run's text as llama.txt holds it: llama.cpp's blocks (with its per-window table), then ours."""
        return console_text(self.summary, self.corpus, self.models, self.config)

    def console(self, columns: int | None = 0) -> str:
        """The text for a terminal of `columns` (0, the default: report.terminal_columns — the terminal's width, at
        least 80, or None off a terminal without COLUMNS; None: llama.txt's text): every line fits but llama.cpp's
        per-window table, which is left out (and said to be in llama.txt) when it does not."""
        from kl_estimation.report import terminal_columns

        columns = terminal_columns() if columns == 0 else columns
        return console_text(self.summary, self.corpus, self.models, self.config, columns)

    def to_dict(self) -> dict:
        return {"kind": "corpus", "config": self.config, "models": self.models, "corpus": self.corpus,
                "summary": self.summary, "worst_tokens": self.worst, "timing": self.timing}

    def __str__(self) -> str:
        return self.text

    def save(self, folder, overwrite: bool = False) -> Path:
        """The run folder: tokens.npz, windows.csv, summary.json, llama.txt, written together (all or none); with
        `overwrite` an earlier corpus run's files (and figures) are removed first. Sets ``folder`` once they are
        written and returns it."""
        folder = Path(folder)
        if overwrite:
            runio.remove(folder / name for name in CORPUS_FILES)
        folder.mkdir(parents=True, exist_ok=True)
        with runio.files_together(done=lambda: setattr(self, "folder", folder)):
            runio.write_npz(folder / "tokens.npz", {k: (v.astype(np.float64) if v.dtype.kind == "f" else v)
                                                    for k, v in self.tokens.items()})
            runio.write_csv(folder / "windows.csv", self.windows)
            runio.write_json(folder / "summary.json", dict(self.to_dict(), versions=runio.versions(
                "torch", "transformers", "tokenizers", "gguf")))
            runio.write_text(folder / "llama.txt", self.text)
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
    if hasattr(model, "window_logits"):  # llama.cpp's runtime (backend.LlamaCppModel)
        return model.window_logits(ids, keep, vocab)
    from kl_estimation.llm.pair import _inner

    inner = _inner(model)
    kw = {"logits_to_keep": keep} if "logits_to_keep" in inspect.signature(type(inner).forward).parameters else {}
    logits = model(input_ids=ids, use_cache=False, **kw).logits
    if logits.shape[1] != keep:
        logits = logits[:, -keep:]
    return logits[:, :-1, :vocab]


def _device_of(model) -> torch.device:
    from kl_estimation.llm.loading import main_device

    if hasattr(model, "window_logits"):  # llama.cpp hands its logits over in CPU memory
        return torch.device("cpu")
    return main_device(model)


def _top(logits_row: torch.Tensor, k: int):
    lp = torch.log_softmax(logits_row.float(), -1)
    v, i = lp.topk(min(k, lp.numel()))
    return [(int(a), float(b)) for a, b in zip(i.tolist(), v.exp().tolist())]


SPILL_SHARE = 0.95  # of the free temporary disk P's logits may take


def _free_disk(where) -> tuple[Path, int]:
    """(the folder P's logits would go to — `where`, default the system's temporary folder —, its free bytes)."""
    import shutil
    import tempfile

    where = Path(where) if where is not None else Path(tempfile.gettempdir())
    probe = where
    while not probe.exists():  # the run folder is made later
        probe = probe.parent
    return where, shutil.disk_usage(probe).free


def spill_fits(W: int, rows: int, vocab: int, where=None, share: float = SPILL_SHARE) -> bool:
    """Whether P's float32 logits of W windows (rows × vocab each) take at most `share` of the free disk under
    `where` (default: the system's temporary folder)."""
    return W * rows * vocab * 4 <= share * _free_disk(where)[1]


class SpilledLogits:
    """P's logits of every window, bit for bit, in a temporary file (read back a batch at a time by plain reads, not a
    memory map, so they never count in the process's memory): P's side when its logits are not hidden × head
    (llama.cpp's runtime, soft-capped heads), so that P runs once and is released before the candidates load. Twice
    the size of llama.cpp's 16-bit base file at float32; removed by close() (or when garbage-collected)."""

    def __init__(self, W: int, rows: int, vocab: int, dtype: torch.dtype, where=None):
        import tempfile
        import weakref

        self.shape, self.dtype = (rows, vocab), dtype
        self.window_bytes = rows * vocab * torch.empty((), dtype=dtype).element_size()
        self.nbytes = need = W * self.window_bytes
        where, free = _free_disk(where)
        if need > SPILL_SHARE * free:
            raise ValueError(f"n_windows: P's logits of {W} windows take {need / 2**30:.1f} GiB of temporary disk in "
                             f"{where}, which has {free / 2**30:.1f} GiB free (P's logits are not its hidden states "
                             f"× head, so they are kept whole); score fewer windows, or free space there")
        where.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".p-logits-", dir=where))
        self.file = open(self.folder / "p_logits.bin", "w+b")  # noqa: SIM115 - closed by close() or the finalizer
        self._cleanup = weakref.finalize(self, SpilledLogits._remove, self.file, self.folder)

    @staticmethod
    def _remove(file, folder) -> None:
        import shutil

        file.close()
        shutil.rmtree(folder, ignore_errors=True)

    def write(self, w0: int, logits: torch.Tensor) -> None:
        self.file.seek(w0 * self.window_bytes)
        for window in logits.detach():  # a window at a time: a view of llama.cpp's buffer is written without a copy
            self.file.write(window.to("cpu", self.dtype).contiguous().view(torch.uint8).numpy().data)

    def read(self, w0: int, w1: int) -> torch.Tensor:
        out = torch.empty((w1 - w0, *self.shape), dtype=self.dtype)
        self.file.seek(w0 * self.window_bytes)
        if self.file.readinto(out.view(torch.uint8).numpy().data) != (w1 - w0) * self.window_bytes:
            raise RuntimeError(f"P's logits file {self.file.name} was cut short")  # pragma: no cover
        return out

    def close(self) -> None:
        self._cleanup()


class BaseCache:
    """P's side of every window, computed once for any number of candidates: P's final hidden states (the input of
    its output head, in P's dtype, (W, keep, hidden)) and the head itself, so that P's logits of a batch are the head
    applied again to the same input — the same operation on the same values as in P's own forward, hence the same
    bits (checked on the first batch). llama.cpp's head is a backend.GgmlHead: its tensor in ggml's matmul. A model
    whose logits are not its head's output (soft-capping, scaling after the head), and llama.cpp's runtime unless a
    base cache is written, leave their logits whole on disk instead (``spilled``, SpilledLogits)."""

    def __init__(self, hidden, head, spilled, windows: np.ndarray, mask: np.ndarray, keep: int, vocab: int):
        self.hidden, self.head, self.spilled = hidden, head, spilled
        self.windows, self.mask, self.keep, self.vocab = windows, mask, keep, vocab

    @property
    def nbytes(self) -> int:
        """P's cached hidden states in memory (0 when its logits are on disk)."""
        return 0 if self.hidden is None else self.hidden.numel() * self.hidden.element_size()

    @property
    def exact_from_hidden(self) -> bool:
        return self.spilled is None

    @property
    def description(self) -> str:
        if self.spilled is None:
            how = "" if isinstance(self.head, torch.nn.Module) else " in ggml, as llama.cpp applies it"
            return f"P's final hidden states × its output head{how}, computed once"
        return (f"P's logits, computed once and kept in a temporary file ({self.spilled.nbytes} bytes: they are not "
                f"hidden × head)")

    def device(self) -> torch.device:
        if self.spilled is not None or not isinstance(self.head, torch.nn.Module):
            return torch.device("cpu")
        return next(self.head.parameters()).device

    @torch.inference_mode()
    def logits(self, w0: int, w1: int) -> torch.Tensor:
        """(w1 − w0, keep − 1, vocab) logits of P for windows w0 … w1 − 1."""
        if self.spilled is not None:
            return self.spilled.read(w0, w1)
        h = self.hidden[w0:w1]
        if isinstance(self.head, torch.nn.Module):
            h = h.to(self.device(), self.head.weight.dtype)  # a no-op unless the cache was rounded
        return self.head(h)[:, :-1, : self.vocab]

    def close(self) -> None:
        if self.spilled is not None:
            self.spilled.close()


def base_pass(p, windows: np.ndarray, mask: np.ndarray, keep: int, vocab: int, batch_size: int,
              bar=None, spill_to=None, llama_hidden: str | None = None) -> BaseCache:
    """P over every window once (batches of `batch_size`, as the candidates will be), keeping what its output head
    received; when P's logits are not that head's output, its logits themselves, in a temporary file under
    `spill_to` (default: the system's temporary folder). llama.cpp's runtime keeps its hidden states only when
    `llama_hidden` says why — "save_base" (a cache is written: a head whose logits they do not give is refused) or
    "disk" (P's logits do not fit the temporary disk: such a head falls back to the file) —, since its head then
    runs on every position of a window and reading its logits back costs less than recomputing them for each
    candidate. P is not kept either way."""
    from kl_estimation.llm.pair import _inner

    W = windows.shape[0]
    llama = hasattr(p, "window_logits")
    seen, hook = {}, None
    if llama:
        head = p.output_head() if llama_hidden else None
    else:
        head = _inner(p).get_output_embeddings()
        hook = head.register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    hidden, spilled = [], None
    try:
        for w0 in range(0, W, batch_size):
            w1 = min(W, w0 + batch_size)
            ids = torch.from_numpy(windows[w0:w1]).to(_device_of(p))
            if llama and head is not None and spilled is None:
                lp, seen["x"] = p.window_logits(ids, keep, vocab, hidden=True)
            else:
                lp = window_logits(p, ids, keep, vocab)
            if spilled is None and head is not None:
                x = seen.pop("x")
                if x.shape[1] != keep:  # the model computed every position's logits: the head's output is rebuilt
                    x = x[:, -keep:]
                hidden.append(x.to("cpu", copy=True))
                if w0 == 0 and not torch.equal(head(hidden[0].to(x.device))[:, :-1, :vocab], lp):
                    alt = head.repacked() if llama else None  # llama.cpp laid the head out for its CPU's kernels
                    if alt is not None and torch.equal(alt(hidden[0])[:, :-1, :vocab], lp):
                        head = alt
                    elif llama_hidden == "save_base":  # refused now, not after P's pass
                        raise ValueError(f"save_base: llama.cpp's logits of P are not its output head ({head.tensor}, "
                                         f"{head.type_name}) applied in ggml to its hidden states, plain or repacked "
                                         f"(a head scaled after the matmul?); a base cache would not reproduce them "
                                         f"— score the candidates in one run instead")
                    else:
                        hidden = []
                        spilled = SpilledLogits(W, keep - 1, vocab, lp.dtype, spill_to)
            elif spilled is None:
                spilled = SpilledLogits(W, keep - 1, vocab, lp.dtype, spill_to)
            if spilled is not None:
                spilled.write(w0, lp)
            if bar is not None:
                bar.update(w1 - w0)
    except BaseException:
        if spilled is not None:
            spilled.close()
        raise
    finally:
        if hook is not None:
            hook.remove()
    if spilled is not None:
        return BaseCache(None, None, spilled, windows, mask, keep, vocab)
    return BaseCache(torch.cat(hidden), head, None, windows, mask, keep, vocab)


def _worst(worst: list, kl: torch.Tensor, lp: torch.Tensor, lq: torch.Tensor, w: int, s0: int, n: int) -> list:
    """The running `n` tokens of largest KL(P‖Q), updated with window `w`'s (kl: its per-position KL, NaN where
    unscored)."""
    kf = torch.nan_to_num(kl, nan=-math.inf)
    top = kf.topk(min(n, kf.numel()))
    floor = worst[-1][0] if len(worst) >= n else -math.inf
    for val, t in zip(top.values.tolist(), top.indices.tolist()):
        if val <= floor or not math.isfinite(val):
            break
        worst.append((val, w, s0 + t, _top(lp[t], TOP), _top(lq[t], TOP)))
    return sorted(worst, key=lambda r: -r[0])[:n]


def score_windows(base: BaseCache, q, mask: np.ndarray, *, batch_size: int, base_storage: str = "exact",
                  n_worst: int = 0, bar=None) -> tuple[dict, list]:
    """Candidate `q` over every window (batches of `batch_size`) against P's logits from `base`, token_stats on the
    scored positions. Returns the per-token arrays ((W, n_ctx), NaN / False where unscored) and the `n_worst` tokens
    of largest KL(P‖Q) as (kl, window, position, P's top, Q's top)."""
    windows, keep, vocab = base.windows, base.keep, base.vocab
    W, n_ctx = windows.shape
    s0 = n_ctx - keep + 1                  # first scored target; logits from position s0 − 1 on
    out = {k: np.full((W, n_ctx), np.nan) for k in STAT_KEYS if k != "top1_agree"}
    out["top1_agree"] = np.zeros((W, n_ctx), dtype=bool)
    dev_q = _device_of(q)
    worst: list = []
    for w0 in range(0, W, batch_size):
        w1 = min(W, w0 + batch_size)
        ids = torch.from_numpy(windows[w0:w1])
        lq_batch = window_logits(q, ids.to(dev_q), keep, vocab)
        for w in range(w0, w1):  # P's side a window at a time: one window of it in memory beside Q's batch
            lp = base.logits(w, w + 1)
            lq = lq_batch[w - w0:w - w0 + 1].to(lp.device)
            tg = ids[w - w0:w - w0 + 1, s0:].to(lp.device)
            m = torch.from_numpy(mask[w:w + 1, s0:]).to(lp.device)
            st = token_stats(lp, lq, tg, m, base_storage=base_storage)
            for k in STAT_KEYS:
                out[k][w, s0:] = st[k][0].cpu().numpy()
            if n_worst:
                worst = _worst(worst, st["kl_forward"][0], lp[0], lq[0], w, s0, n_worst)
            del lp, lq, st
        del lq_batch
        if bar is not None:
            bar.update(w1 - w0)
    return out, worst


# ------------------------------------------------------------------------------------------------------ the run

def _model_record(cfg: CorpusConfig) -> dict:
    from kl_estimation.llm.loading import is_gguf

    rec = {"p": cfg.p_model, "q": cfg.q_model}
    for side in ("p", "q"):
        name = getattr(cfg, f"{side}_model")
        if name is None:
            continue
        if getattr(cfg, f"{side}_revision"):
            rec[f"{side}_revision"] = getattr(cfg, f"{side}_revision")
        if getattr(cfg, f"{side}_adapter"):
            rec[f"{side}_adapter"] = getattr(cfg, f"{side}_adapter")
        if is_gguf(name) and Path(name).is_file():
            rec[f"{side}_gguf"] = {"path": str(Path(name).resolve()), "bytes": Path(name).stat().st_size,
                                   "loaded_as": "llama.cpp's runtime (llama-cpp-python)" if cfg.backend == "llama.cpp"
                                   else "dequantized to float32 by transformers (gguf_file=)"}
    return rec


def _context_limit(cfg: CorpusConfig) -> tuple[int | None, str]:
    """The positions both models take, from their configs (GGUF: its header) — read before any weights."""
    from kl_estimation.llm.loading import gguf_facts, is_gguf, load_config

    limits = []
    for side in ("p", "q"):
        name = getattr(cfg, f"{side}_model")
        if name is None:
            continue
        if is_gguf(name) and Path(name).is_file():
            n = gguf_facts(f"{side}_model", name, transformers=cfg.backend == "transformers")["context_length"]
        else:
            c = load_config(f"{side}_model", name, getattr(cfg, f"{side}_revision"), cfg.trust_remote_code)
            n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None)
        if isinstance(n, int) and n > 0:
            limits.append((n, side))
    return min(limits) if limits else (None, "")


def check_context(context: int, limit: int | None, side: str = "") -> None:
    if limit is not None and context > limit:
        who = "the models take" if not side else side.upper() + " takes"
        raise ValueError(f"context: {context} tokens per window, but {who} "
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
    docs = read_documents(cfg.corpus, cfg.texts, cfg.dataset, cfg.split, cfg.text_field, cfg.n_documents,
                          cfg.group_field)
    groups = None
    if cfg.group_field is not None:
        docs, groups = docs
    ids, doc, rec = tokenize_documents(tokenizer, docs)
    if groups is not None:  # group names in order of first appearance; per document its index among them
        names = list(dict.fromkeys(groups))
        rec["groups"] = names
        rec["document_group"] = [names.index(g) for g in groups]
    rec["source"] = (f"file {cfg.corpus}" if cfg.corpus else f"dataset {cfg.dataset} ({cfg.split})" if cfg.dataset
                     else "texts") + (", tokenized by llama.cpp's tokenizer" if hasattr(tokenizer, "tokenize_documents")
                                      else ", tokenized by the tokenizer")
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
    return size + 10 * (1 << 21) * 4 + batch * 12 * (1 << 20)


def candidate_configs(cfg: CorpusConfig) -> list[CorpusConfig]:
    """One config per candidate Q: what its one-candidate run would be given."""
    return [replace(cfg, q_model=name) for name in cfg.candidates]


def run_corpus(cfg: CorpusConfig, *, models=None, tokenizer=None, progress: bool = False, say=None):
    """Validate cfg, load P, score every window once for P (base_pass), then each candidate Q in turn against it
    (loaded one at a time: memory is that of the larger model, whatever the number of candidates); summarize; write
    the run folder when cfg.output_dir is set. `models`: (P, Q or a list of Qs) already loaded, with their shared
    `tokenizer`. One candidate (`q_model` a name): a CorpusResult; a list: a CorpusComparison (compare.py)."""
    t_start = time.perf_counter()
    cfg = cfg.validate()
    work = _Work(progress, say)
    try:
        if cfg.output_dir is None:
            return _run_corpus(cfg, models, tokenizer, work, t_start)
        with runio.RunFolder(cfg.output_dir):  # one run at a time on a folder; checked again now that it is ours
            check_corpus_folder(cfg.output_dir, cfg.overwrite)
            return _run_corpus(cfg, models, tokenizer, work, t_start)
    finally:  # an interrupted run's bar ends before its one-line report
        work.close()


def _run_corpus(cfg: CorpusConfig, models, tokenizer, work: _Work, t_start: float):
    cfg = replace(cfg, threads=set_threads(cfg.threads))  # the number used, recorded in the run
    if cfg.backend == "llama.cpp":  # llama-perplexity's grouping of windows, so that the logits are its bits
        from kl_estimation.llm.corpus.backend import windows_per_decode

        cfg = replace(cfg, batch_size=windows_per_decode(cfg.context))
    elif cfg.batch_size is None:  # on a CPU a batch of 4 took the time of 4 batches of 1 and 300 MB more on SmolLM2
        from kl_estimation.llm.run.config import resolve_device

        cfg = replace(cfg, batch_size=4 if resolve_device(cfg.device).type == "cuda" else 1)
    from kl_estimation.llm.loading import check_logit_rows, gguf_speedups

    given_q = None
    if models is not None:
        given_q = list(models[1]) if isinstance(models[1], (list, tuple)) else [models[1]]
        if len(given_q) != len(cfg.candidates):
            raise ValueError(f"q_model: {len(given_q)} loaded candidates for {len(cfg.candidates)} names")
    if cfg.base is not None and is_llama_base_file(cfg.base):  # P as llama.cpp evaluated it
        base, tokenizer, cfg, corpus, document = _llama_file_base(cfg)
        windows, mask, vocab, p_class = base.windows, base.mask, base.vocab, "llama.cpp base file"
        W, base_rec = windows.shape[0], {"p": {"p": f"llama.cpp's base file {cfg.base}"}}
        t_loaded = time.perf_counter()
    elif cfg.base is not None:
        from kl_estimation.llm.corpus.basecache import load_base
        from kl_estimation.llm.run.config import resolve_device

        base, tokenizer, base_rec, document = load_base(cfg.base, resolve_device(cfg.device), cfg.threads)
        cfg = replace(cfg, **base_rec["settings"])  # the windows are the cache's
        if cfg.backend == "llama.cpp":  # llama-perplexity's grouping at the cache's n_ctx
            from kl_estimation.llm.corpus.backend import windows_per_decode

            cfg = replace(cfg, batch_size=windows_per_decode(cfg.context))
        with gguf_speedups():
            _check_against_cache(cfg, tokenizer, base_rec)
        windows, mask, corpus, vocab = base.windows, base.mask, base_rec["corpus"], base.vocab
        W, p_class = windows.shape[0], base_rec["p"].get("class", "P")
        t_loaded = time.perf_counter()
    else:
        with gguf_speedups():  # each GGUF file parsed once for its tokenizer, config and weights
            tokenizer, prepared = _prepare(cfg, models, tokenizer)
            p = models[0] if models is not None else _load_side(cfg, "p", cfg.p_model)
        _, _, corpus, windows, mask, document, _ = prepared
        W = windows.shape[0]
        vocab = len(tokenizer)
        if cfg.backend == "transformers":
            check_logit_rows(p, p, vocab)
        elif p.n_vocab != vocab:
            raise ValueError(f"p_model: llama.cpp reads {p.n_vocab} tokens in {cfg.p_model}, the tokenizer {vocab}")
        keep = cfg.context - int(np.flatnonzero(mask.any(0))[0]) + 1
        rows = max(vocab, _logit_rows(p))
        check_memory(_batch_bytes(p, p, cfg.batch_size, keep, rows), "batch_size",
                     f"a forward batch of {cfg.batch_size} windows of {cfg.context} tokens (vocabulary {vocab})",
                     torch.cuda.mem_get_info(_device_of(p))[0] if _device_of(p).type == "cuda" else None)
        p_class = type(p).__name__
        t_loaded = time.perf_counter()
        work.start(cfg, W, 1 + len(cfg.candidates), "corpus windows, P")
        hidden = "save_base" if cfg.save_base is not None else None
        if cfg.backend == "llama.cpp" and hidden is None and cfg.candidates \
                and not spill_fits(W, keep - 1, vocab, cfg.output_dir, share=0.5):
            hidden = "disk"
        base = base_pass(p, windows, mask, keep, vocab, cfg.batch_size, work.meter, spill_to=cfg.output_dir,
                         llama_hidden=hidden)
        del p  # P goes before any candidate loads (a spilled base's file goes with `base`, by its finalizer)
        if cfg.save_base is not None:
            from kl_estimation.llm.corpus.basecache import save_base

            p_rec = dict(_model_record(replace(cfg, q_model=None)), **{"class": p_class})
            save_base(cfg.save_base, base, cfg, corpus, document, tokenizer, p_rec)
            if not cfg.candidates:
                return Path(cfg.save_base)
    t_base = time.perf_counter()
    results = []
    for i, cq in enumerate(candidate_configs(cfg)):
        t0 = time.perf_counter()
        if given_q is not None:
            q, record = given_q[i], {"p": p_class + " (loaded)", "q": type(given_q[i]).__name__ + " (loaded)"}
        else:
            with gguf_speedups():
                q = _load_side(cq, "q", cq.q_model)
            record = _model_record(cq)
            record["dtype"] = resolve_dtype_of(cfg)
            if cfg.base is not None:
                record.update(p=base_rec["p"].get("p"), p_cache=str(Path(cfg.base).resolve()))
        if _logit_rows(q) and _logit_rows(q) < vocab:
            raise ValueError(f"q_model: {cq.q_model} has {_logit_rows(q)} logit rows but the tokenizer {vocab} "
                             f"tokens")
        record.update(text_start=corpus["text_start"], classes=[p_class, type(q).__name__],
                      base=base.description,
                      base_cache_bytes=base.nbytes, vocab=vocab)
        t1 = time.perf_counter()
        desc = f"corpus windows, Q {i + 1}/{len(cfg.candidates)}"
        if work.meter is None:  # P's side read from a cache: the candidates are the whole work
            work.start(cfg, W, len(cfg.candidates), desc)
        work.stage(desc)
        arrays, worst = score_windows(base, q, mask, batch_size=cfg.batch_size, base_storage=cfg.base_storage,
                                      n_worst=cfg.n_worst, bar=work.meter)
        del q
        t2 = time.perf_counter()
        arrays["mask"] = mask
        summary = summarize(arrays, document_index=document if cfg.cluster_by == "document" else None,
                            rng=np.random.default_rng(cfg.seed), n_bootstrap=cfg.n_bootstrap)
        if "groups" in corpus:
            summary["groups"] = group_means(arrays, summary, document, corpus)
        tokens = {"windows": windows, "mask": mask, "document": document, **{k: arrays[k] for k in STAT_KEYS}}
        n_scored = int(mask.sum())
        timing = {"load_s": (t_loaded - t_start) + (t1 - t0), "base_s": t_base - t_loaded, "score_s": t2 - t1,
                  "total_s": (t_base - t_start) + (t2 - t0), "scored_tokens_per_s": n_scored / max(t2 - t1, 1e-9),
                  "window_tokens_per_s": W * cfg.context / max(t2 - t1, 1e-9), "threads": cfg.threads,
                  "device": str(base.device()), "cost_estimate": work.estimate()}
        results.append(CorpusResult(summary, tokens, window_rows(tokens, summary), cq.to_dict(), record, corpus,
                                    worst_records(worst, windows, document, arrays, tokenizer), timing))
    if cfg.runtime_floor:
        work.close()  # the runtime split's passes get bars of their own
        runtime_split(cfg, base.windows, mask, document, base.keep, vocab, results, work.progress)
    if isinstance(cfg.q_model, str):
        result = results[0]
        if cfg.output_dir is not None:
            result.save(cfg.output_dir, cfg.overwrite)
        return result
    from kl_estimation.llm.corpus.compare import CorpusComparison

    comparison = CorpusComparison.build(results, cfg, timing={"total_s": time.perf_counter() - t_start,
                                                              "base_s": t_base - t_loaded,
                                                              "cost_estimate": work.estimate()})
    if cfg.output_dir is not None:
        comparison.write(cfg.output_dir, cfg.overwrite)
    return comparison


def runtime_split(cfg: CorpusConfig, windows, mask, document, keep: int, vocab: int, results: list,
                  progress: bool = False) -> None:
    """Beside each candidate's KL in llama.cpp's runtime, what the weights alone do and what the runtime alone does:
    ``summary["runtime"]`` = {runtime_kl, weights_kl (the candidate dequantized, transformers in `dtype`, against P
    the same way), floor (P in llama.cpp against P in transformers: the kernels' own KL, no quant difference)},
    each a cluster_mean of per-token KL(P‖Q) on the run's scored tokens."""
    from kl_estimation.llm.corpus.stats import cluster_mean
    from kl_estimation.llm.loading import gguf_speedups

    clusters = (document if cfg.cluster_by == "document"
                else np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape))[mask]
    from contextlib import nullcontext

    from kl_estimation import progress as progress_bars

    def _bar(progress: bool, total: int, desc: str):
        return progress_bars.bar(total=total, desc=desc, unit="window") if progress else nullcontext()

    tf = replace(cfg, backend="transformers")
    with gguf_speedups():
        p_tf = _load_side(tf, "p", cfg.p_model)
    with _bar(progress, windows.shape[0], "corpus windows, P (transformers)") as bar:
        base_tf = base_pass(p_tf, windows, mask, keep, vocab, cfg.batch_size, bar, spill_to=cfg.output_dir)
    del p_tf

    def mean_kl(q, desc):
        with _bar(progress, windows.shape[0], desc) as bar:
            arrays, _ = score_windows(base_tf, q, mask, batch_size=cfg.batch_size, bar=bar)
        return cluster_mean(arrays["kl_forward"][mask], clusters)

    floor = mean_kl(_load_side(cfg, "p", cfg.p_model), "runtime floor: P in llama.cpp")
    for i, (r, cq) in enumerate(zip(results, candidate_configs(cfg))):
        with gguf_speedups():
            q = _load_side(replace(cq, backend="transformers"), "q", cq.q_model)
        weights = mean_kl(q, f"weights-only KL, Q {i + 1}/{len(results)} (transformers)")
        del q
        r.summary["runtime"] = {"runtime_kl": r.summary["means"]["kl_forward"], "weights_kl": weights,
                                "floor": floor}


def runtime_text(runtime: dict) -> str:
    """The runtime/weights/floor lines under a candidate's block."""
    def fmt(m):
        return f"{m['mean']:.6f} ± {m['se_cluster']:.6f}"

    return ("\nKL(P||Q), llama.cpp's runtime      : " + fmt(runtime["runtime_kl"])
            + "\nKL(P||Q), weights only (float32)  : " + fmt(runtime["weights_kl"])
            + "\nruntime floor (P llama.cpp vs P float32): " + fmt(runtime["floor"]) + "\n")


def _llama_file_base(cfg: CorpusConfig):
    """(LlamaBaseFile with its windows, the candidates' tokenizer, cfg with the file's windows, corpus record,
    document): llama.cpp's --kl-divergence-base file as P, scored with llama.cpp's arithmetic on its stored log-probs
    (base_storage llama-file)."""
    from kl_estimation.llm.corpus.backend import LlamaBaseFile, llama_vocab_bos
    from kl_estimation.llm.loading import check_tokenizers, load_tokenizer

    base = LlamaBaseFile(cfg.base, cfg.n_windows)
    cands = candidate_configs(cfg)

    def load(cq):
        if cfg.backend == "llama.cpp":
            from kl_estimation.llm.corpus.backend import LlamaCppTokenizer

            return LlamaCppTokenizer(cq.q_model, "q_model")
        return load_tokenizer("q_model", cq.q_model, cq.q_revision, cfg.trust_remote_code)

    tokenizer = load(cands[0])
    for cq in cands[1:]:
        check_tokenizers(tokenizer, load(cq), ignore_eos=True)
    if len(tokenizer) != base.vocab:
        raise ValueError(f"base: {cfg.base} holds log-probs over {base.vocab} tokens, the candidates' tokenizer has "
                         f"{len(tokenizer)}")
    for cq in cands:
        check_context(base.n_ctx, _context_limit(replace(cq, p_model=None))[0], "q")
    from kl_estimation.llm.loading import is_gguf

    first = cands[0].q_model
    bos = llama_vocab_bos(first) if is_gguf(first) and _has_llama_cpp() else bos_of(tokenizer)
    W = base.codes.shape[0]
    windows, mask = llama_windows(base.tokens, base.n_ctx, bos, score="second-half")
    base.windows, base.mask = windows, mask
    cfg = replace(cfg, context=base.n_ctx, score="second-half", base_storage="llama-file", n_windows=W,
                  cluster_by="window")
    if cfg.backend == "llama.cpp":
        from kl_estimation.llm.corpus.backend import windows_per_decode

        cfg = replace(cfg, batch_size=windows_per_decode(base.n_ctx))
    corpus = {"source": f"llama.cpp's base file {cfg.base} (its token ids and 16-bit log-probs)",
              "n_tokens": int(base.tokens.size), "n_windows": W, "tokens_used": W * base.n_ctx, "tokens_dropped": 0,
              "n_documents": 1, "bos_replaces_first_token": bos, "llama_base_bytes": base.file_bytes,
              "text_start": {"prepended": None}}
    return base, tokenizer, cfg, corpus, np.zeros(windows.shape, dtype=np.int32)


def _has_llama_cpp() -> bool:
    try:
        from kl_estimation.llm.corpus.backend import import_llama_cpp

        import_llama_cpp()
        return True
    except ValueError:
        return False


def group_means(arrays: dict, summary: dict, document: np.ndarray, corpus: dict) -> dict:
    """Per group of documents: mean KL(P‖Q), same top-1 and ln PPL ratio with SEs clustered as the run's (windows or
    documents), on the group's tokens only (a window straddling two groups is a cluster in each)."""
    mask = arrays["mask"]
    group = np.asarray(corpus["document_group"])[document][mask]
    clusters = (document if summary["cluster_by"] == "document"
                else np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape))[mask]
    x = {"kl_forward": arrays["kl_forward"][mask], "same_top": arrays["top1_agree"][mask].astype(np.float64),
         "ln_ppl_ratio": (arrays["logp_p"] - arrays["logp_q"])[mask]}
    out = {}
    for g, name in enumerate(corpus["groups"]):
        sel = group == g
        if sel.sum() >= 2:
            out[name] = {k: cluster_mean(v[sel], clusters[sel], confidence=summary["confidence"])
                         for k, v in x.items()}
    return out


def _check_against_cache(cfg: CorpusConfig, tokenizer, rec: dict) -> None:
    """Every candidate's tokenizer is the cached P's (llama.cpp's of the GGUF when P's is), its context takes the
    cache's windows."""
    from kl_estimation.llm.corpus.backend import LlamaCppTokenizer
    from kl_estimation.llm.loading import check_tokenizers, load_tokenizer

    for cq in candidate_configs(cfg):
        if isinstance(tokenizer, LlamaCppTokenizer):
            with LlamaCppTokenizer(cq.q_model, "q_model") as tok:
                check_tokenizers(tokenizer, tok, ignore_eos=True)
        else:
            check_tokenizers(tokenizer, load_tokenizer("q_model", cq.q_model, cq.q_revision, cq.trust_remote_code),
                             ignore_eos=True)
        limit, _ = _context_limit(replace(cq, p_model=None))
        check_context(rec["settings"]["context"], limit, "q")


def resolve_dtype_of(cfg: CorpusConfig) -> str:
    from kl_estimation.llm.run.config import resolve_device, resolve_dtype

    return resolve_dtype(cfg.dtype, resolve_device(cfg.device))


class _Work:
    """The run's work in windows — W per model pass: P's, then each candidate's — on one progress bar (when
    `progress`), with the cost probe: the second forward batch of windows (the first pays for every first call),
    timed and scaled by the passes (cost.py;
    a candidate's pass costs about P's: one forward of Q, P's logits from its head). A run expected to take over
    cost.COST_LINE_SECONDS tells `say` (default with `progress`: a line on stderr) before its first pass is done;
    the reduction named is llama.cpp's --chunks, ``n_windows``."""

    def __init__(self, progress: bool, say=None):
        from kl_estimation.cost import say_on_stderr

        self.progress, self.say = progress, (say or say_on_stderr(flags=False)) if progress else say
        self.meter = None

    def start(self, cfg: CorpusConfig, W: int, passes: int, desc: str) -> None:
        from kl_estimation import progress as progress_bars
        from kl_estimation.cost import COST_LINE_SECONDS, CostEstimate, Meter

        total = W * passes
        bar = progress_bars.bar(total=total, desc=desc, unit="window") if self.progress else None
        plan = ((W, "windows"),) + (((passes, "model passes"),) if passes > 1 else ())

        def make(per_window: float, done: int, spent: float) -> CostEstimate:
            seconds = per_window * total
            n = max(1, int(W * COST_LINE_SECONDS / seconds))
            reduction = ("n_windows", str(n), seconds * n / W) if n < W else None
            return CostEstimate(seconds, plan, total, "windows", done, spent, reduction)

        self.meter = Meter(bar, total, min(cfg.batch_size, W), make, self.say, warmup=min(cfg.batch_size, W))
        self.meter.begin()

    def stage(self, desc: str) -> None:
        if self.meter is not None and self.meter.bar is not None:
            self.meter.bar.set_description_str(desc)

    def estimate(self) -> dict | None:
        e = None if self.meter is None else self.meter.estimate
        return None if e is None else e.to_dict()

    def close(self) -> None:
        if self.meter is not None and self.meter.bar is not None:
            self.meter.bar.close()


def _load_side(cfg: CorpusConfig, side: str, name: str):
    """One model of the run (P, or one candidate Q) in eval mode, with its adapter."""
    from kl_estimation.llm.loading import _with_adapters, load_model
    from kl_estimation.llm.pair import DTYPES, AdapterView
    from kl_estimation.llm.run.config import resolve_device, resolve_dtype

    if cfg.backend == "llama.cpp":
        from kl_estimation.llm.corpus.backend import load_llama_cpp

        return load_llama_cpp(f"{side}_model", name, cfg.context, cfg.threads)
    device = resolve_device(cfg.device)
    dt = DTYPES[resolve_dtype(getattr(cfg, f"{side}_dtype") or cfg.dtype, device)]
    m = load_model(f"{side}_model", name, device, dt, cfg.device_map, cfg.offload, getattr(cfg, f"{side}_revision"),
                   cfg.trust_remote_code)
    adapter = getattr(cfg, f"{side}_adapter")
    if adapter:
        m = AdapterView(_with_adapters(m, {side: (f"{side}_adapter", adapter)}, name), side)
    return m


def _prepare(cfg: CorpusConfig, models, tokenizer):
    """Tokenizers (every candidate's checked against P's), the text and its windows — everything that can be refused
    is refused before seconds of loading weights."""
    from kl_estimation.llm.loading import check_tokenizers, load_tokenizers

    llama = cfg.backend == "llama.cpp"
    if models is None and llama:  # llama.cpp's own tokenizer, as llama-perplexity has it; no transformers one
        from kl_estimation.llm.corpus.backend import LlamaCppTokenizer

        tokenizer = LlamaCppTokenizer(cfg.p_model)
        for cq in candidate_configs(cfg) or [cfg]:
            if cq.q_model is not None:
                with LlamaCppTokenizer(cq.q_model, "q_model") as q_tok:
                    check_tokenizers(tokenizer, q_tok, ignore_eos=True)
            check_context(cfg.context, _context_limit(cq)[0])
    elif models is None:
        for cq in candidate_configs(cfg) or [cfg]:  # P alone (save_base): its own tokenizer and context
            tokenizer, _ = load_tokenizers(cq.p_model, cq.q_model, p_revision=cq.p_revision,
                                           q_revision=cq.q_revision, trust_remote_code=cq.trust_remote_code,
                                           ignore_eos=True)
            check_context(cfg.context, _context_limit(cq)[0])
    elif tokenizer is None:
        raise ValueError("tokenizer: needed when the models are passed loaded")
    else:
        limits = [getattr(m.config, "max_position_embeddings", None) for m in _flat(models) if hasattr(m, "config")]
        limits = [n for n in limits if isinstance(n, int) and n > 0]
        check_context(cfg.context, min(limits) if limits else None)
    ids, doc, corpus = corpus_tokens(cfg, tokenizer)
    if llama and models is not None:  # loaded models with a transformers tokenizer: llama.cpp's BOS rule still
        from kl_estimation.llm.corpus.backend import llama_vocab_bos

        bos = llama_vocab_bos(cfg.p_model)
    else:
        bos = tokenizer.bos() if llama else bos_of(tokenizer)
    windows, mask = llama_windows(ids, cfg.context, bos, score=cfg.score, n_chunks=cfg.n_windows)
    W = windows.shape[0]
    document = doc[: W * cfg.context].reshape(W, cfg.context)
    corpus.update(n_tokens=int(ids.size), n_windows=W, tokens_used=int(W * cfg.context),
                  tokens_dropped=int(ids.size - W * cfg.context), bos_replaces_first_token=bos)
    return tokenizer, (ids, doc, corpus, windows, mask, document, bos)


def _flat(models):
    p, q = models
    return [p, *(q if isinstance(q, (list, tuple)) else [q])]


def _logit_rows(model) -> int:
    from kl_estimation.llm.pair import _inner

    if hasattr(model, "n_vocab"):  # llama.cpp's runtime
        return model.n_vocab
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
                    "token": piece(tok),
                    "context": tokenizer.decode([int(i) for i in windows[w, max(0, t - CONTEXT_SHOWN):t]]),
                    "kl_forward": float(kl), "kl_reverse": float(arrays["kl_reverse"][w, t]),
                    "p": float(np.exp(arrays["logp_p"][w, t])), "q": float(np.exp(arrays["logp_q"][w, t])),
                    "top_p": [(piece(i), pr) for i, pr in top_p], "top_q": [(piece(i), pr) for i, pr in top_q]})
    return out


def console_text(summary: dict, corpus: dict, models: dict, config: dict, columns: int | None = None) -> str:
    """The header, llama.cpp's blocks (stats.format_llama) and ours. Every line but llama.cpp's running per-window
    table fits 80 columns (its lines keep llama.cpp's printf format, CHUNK_WIDTH wide): `columns` None is the text of
    llama.txt (the table up to CHUNK_TABLE_MAX windows); a console narrower than the table gets a line saying where
    it is instead."""
    from kl_estimation.llm.corpus.stats import _wrap

    W = summary["n_windows"]
    head = (_wrap(f"corpus KL: P = {models.get('p')}, Q = {models.get('q')}") + "\n"
            + _wrap(f"{corpus.get('source')}: {corpus.get('n_tokens')} tokens → {W} windows of {config.get('context')} "
                    f"({corpus.get('tokens_dropped')} dropped at the end), {summary['n_tokens']} scored "
                    f"({config.get('score')}"
                    f"{', P stored as llama.cpp stores it' if config.get('base_storage') != 'exact' else ''}); "
                    f"text starts with {corpus.get('text_start', {}).get('prepended') or 'nothing added'}"
                    + (f", BOS id {corpus['bos_replaces_first_token']} replaces each window's first token"
                       if corpus.get("bos_replaces_first_token") is not None else "")) + "\n")
    if models.get("dtype") in LOW_PRECISION and config.get("backend", "transformers") == "transformers":
        head += _wrap(f"note: both models run in {models['dtype']}, whose arithmetic alone reads a KL of about 1e-3 "
                      f"per token (bfloat16 against float32 on SmolLM2: 0.0013), as large as a Q8_0's whole KL; for "
                      f"KLs of that size run in float32 (--dtype float32)") + "\n"
    fits = columns is None or columns >= CHUNK_WIDTH
    body = format_llama(summary, chunks=W <= CHUNK_TABLE_MAX and fits)
    if "runtime" in summary:
        body += runtime_text(summary["runtime"])
    if W > CHUNK_TABLE_MAX or not fits:
        where = "windows.csv" if W > CHUNK_TABLE_MAX else f"llama.txt ({CHUNK_WIDTH} columns) and windows.csv"
        body = _wrap(f"(llama.cpp's running per-window table: {W} windows, in {where})", rest=" ") + "\n\n" + body
    return head + "\n" + body
