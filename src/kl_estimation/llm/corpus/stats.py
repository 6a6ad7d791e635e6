r"""Corpus KL(base‖Q) by teacher forcing, llama.cpp's ``llama-perplexity --kl-divergence`` one to one, plus honest SEs.

llama.cpp compares a model with its quantized version in two passes: ``--kl-divergence-base F`` saves the base's
log-probs, ``--kl-divergence`` then runs Q over the same windows and prints "Mean KLD ± …", percentiles, Δp, "Same
top p", PPL(Q), PPL(base), … Its ± treats every scored token as independent, although the ~n_ctx/2 tokens of a window
share their context and are correlated; this module reproduces llama.cpp's numbers and adds cluster-robust SEs (by
window or by document), the reverse direction KL(Q‖base) and the Jeffreys divergence.

    windows, mask = llama_windows(token_ids, n_ctx, bos_id)           # llama.cpp's chunking, (W, n_ctx)
    lp, lq = base(windows).logits, quant(windows).logits              # (W, n_ctx, V), any float dtype
    st = token_stats(lp[:, :-1], lq[:, :-1], windows[:, 1:], mask[:, 1:])   # per-token (W, n_ctx − 1)
    s = summarize(st)                                                 # clusters = windows (rows)
    print(format_llama(s))                                            # llama.cpp's blocks, then ours

Conventions: P = the base model (llama.cpp's "base"), Q = the other (quantized) model. ``mask[w, t]`` says whether
token ``windows[w, t]`` is scored as a *target* (predicted from the logits at position t − 1); ``token_stats`` takes
logits and targets already aligned (``logits[:, t]`` predicts ``targets[:, t]``), hence the one-step shift above.
Jeffreys = KL(P‖Q) + KL(Q‖P) (the sum, not the average). Δp = Q(x) − P(x) for the actual next token x.

Source read: llama.cpp ``tools/perplexity/perplexity.cpp`` (ggml-org/llama.cpp @050fc7f, functions ``perplexity``,
``log_softmax``/``process_logits`` overloads, ``kl_divergence``); line numbers below refer to the same code in
``examples/perplexity/perplexity.cpp`` of ggerganov/llama.cpp @c392e50 (Feb 2025), whose final KLD block still
printed "99.0%" twice and no 95/90/0.1 % lines; the printed block here follows the current (@050fc7f) layout.

This module imports numpy, torch, the standard library and core (the clustered SE and the t-quantile shared with the
other areas).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from kl_estimation.core.estimators import clustered_se, t_quantile

__all__ = ["LlamaWindows", "llama_windows", "token_stats", "cluster_mean", "summarize", "format_llama",
           "quantile_cis", "paired_difference", "STAT_KEYS", "SCORE_MODES", "BASE_STORAGE", "QUANTILE_LEVELS"]

SCORE_MODES = ("second-half", "all")
BASE_STORAGE = ("exact", "llama-uint16")
STAT_KEYS = ("kl_forward", "kl_reverse", "logp_p", "logp_q", "top1_agree", "delta_p")

# Percentile points llama.cpp prints (kl_divergence(), @050fc7f): KLD omits 75 / 25, Δp has them.
_FRACTIONS = {"99.9": 0.999, "99.0": 0.990, "95.0": 0.950, "90.0": 0.900, "75.0": 0.750,
              "25.0": 0.250, "10.0": 0.100, "5.0": 0.050, "1.0": 0.010, "0.1": 0.001}
_KLD_ROWS = ("max", "99.9", "99.0", "95.0", "90.0", "median", "10.0", "5.0", "1.0", "0.1", "min")
_DP_ROWS = ("max", "99.9", "99.0", "95.0", "90.0", "75.0", "median", "25.0", "10.0", "5.0", "1.0", "0.1", "min")


# ---------------------------------------------------------------------------------------------------------- windows

class LlamaWindows(NamedTuple):
    """``windows`` (W, n_ctx) int64 model inputs; ``mask`` (W, n_ctx) bool, True where token ``windows[w, t]`` is a
    scored target. Window w is ``token_ids[w·n_ctx : (w+1)·n_ctx]``, so per-token document ids window the same way:
    ``doc[: W * n_ctx].reshape(W, n_ctx)``."""
    windows: np.ndarray
    mask: np.ndarray


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def llama_windows(token_ids, n_ctx, bos_id=None, *, score: str = "second-half", n_chunks=None) -> LlamaWindows:
    """llama.cpp's chunking of a tokenized corpus into non-overlapping windows of ``n_ctx`` tokens.

    As ``perplexity()`` (base pass) and ``kl_divergence()`` do: ``n_windows = len(token_ids) // n_ctx`` (the tail is
    dropped; ``n_chunks`` caps it like ``--chunks``, None or < 0 = all), window i = tokens[i·n_ctx : (i+1)·n_ctx],
    and when the model adds BOS (pass its ``bos_id``) the first token of *every* window is replaced by BOS for the
    forward pass (only an input, never a target). ``token_ids`` must be what llama.cpp tokenizes,
    ``common_tokenize(text, add_special=true)``, i.e. including the leading BOS when the model adds one.

    ``score="second-half"``: llama.cpp's scoring, logits at positions ``first = n_ctx // 2`` … n_ctx − 2, i.e.
    targets at positions n_ctx//2 + 1 … n_ctx − 1 (n_ctx − 1 − n_ctx//2 per window), and llama.cpp's refusal of a
    corpus under 2·n_ctx tokens. ``score="all"``: every position after the first is a target (corpus ≥ n_ctx).
    """
    if score not in SCORE_MODES:
        raise ValueError(f"score: must be one of {SCORE_MODES} (got {score!r})")
    if not _is_int(n_ctx):
        raise ValueError(f"context: n_ctx must be an integer (got {n_ctx!r})")
    n_ctx = int(n_ctx)
    min_ctx = 3 if score == "second-half" else 2
    if n_ctx < min_ctx:
        raise ValueError(f"context: n_ctx must be ≥ {min_ctx} for score={score!r} (got {n_ctx}); "
                         f"llama.cpp scores n_ctx - 1 - n_ctx/2 tokens per window")
    if bos_id is not None and not (_is_int(bos_id) and bos_id >= 0):
        raise ValueError(f"bos_id: must be None or an integer ≥ 0 (got {bos_id!r})")
    if n_chunks is not None and not _is_int(n_chunks):
        raise ValueError(f"n_chunks: must be None or an integer (got {n_chunks!r})")
    if n_chunks is not None and n_chunks == 0:
        raise ValueError("n_chunks: must be ≥ 1, or None / < 0 for all windows (got 0)")
    ids = np.asarray(token_ids)
    if ids.ndim != 1:
        raise ValueError(f"token_ids: must be a 1-D sequence of token ids (got shape {ids.shape})")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"token_ids: must be integers (got dtype {ids.dtype})")
    # perplexity() (base pass, l. 477) refuses fewer than 2*n_ctx tokens, though it then uses size/n_ctx chunks.
    need = 2 * n_ctx if score == "second-half" else n_ctx
    if ids.size < need:
        rule = "llama.cpp needs at least 2*n_ctx" if score == "second-half" else "one window needs n_ctx"
        raise ValueError(f"corpus: too short: {ids.size} tokens for n_ctx={n_ctx} ({rule} = {need} tokens)")
    n = ids.size // n_ctx                                                  # n_chunk_max, l. 490
    if n_chunks is not None and n_chunks > 0:
        n = min(n, int(n_chunks))
    windows = ids[: n * n_ctx].astype(np.int64).reshape(n, n_ctx)
    if bos_id is not None:
        windows[:, 0] = bos_id                                             # "add BOS token for the first batch"
    mask = np.zeros((n, n_ctx), dtype=bool)
    mask[:, (n_ctx // 2 + 1) if score == "second-half" else 1:] = True    # first = n_ctx/2 (l. 539, 1821)
    return LlamaWindows(windows, mask)


# ------------------------------------------------------------------------------------------------------ token stats

def _shifted_exp(z):
    """Per row: the max and its first index (llama.cpp's '>' scan keeps the first too), e = exp(z − max) and Σ e
    summed in double, so that the log-normaliser max + log Σ e carries no float32 rounding."""
    mx, i = torch.max(z, -1, keepdim=True)
    e = torch.sub(z, mx).exp_()
    return mx, i, e, e.sum(-1, keepdim=True, dtype=torch.float64)


def _kl_rows(e, total, diff, lz_gap):
    """KL(A‖B) per row as Σ e·(a − b)/Σ e + log Z_b − log Z_a, from e = exp(a − max a), its double sum `total`,
    `diff` = a − b and `lz_gap` = log Z_b − log Z_a in double; `e` is overwritten. Formed from float32 log-softmaxes
    instead, each term carries the normalisers' rounding (~1e-6, up to 3e-5 per token at V = 49 152); this way it is
    ~1e-8. 0·log 0 terms (NaN from −inf logits) count as 0."""
    return torch.nansum(e.mul_(diff), -1, dtype=torch.float64) / total.squeeze(-1) + lz_gap.squeeze(-1)


def _rows_exact(x, y, tg, cdt):
    """Exact values in `cdt` from in-place passes over the vocabulary, both directions by _kl_rows."""
    x, y = x.to(cdt), y.to(cdt)
    t = tg[:, None]
    (mxp, ip, ep, sp), (mxq, iq, eq, sq) = _shifted_exp(x), _shifted_exp(y)
    lzp, lzq = mxp.double() + torch.log(sp), mxq.double() + torch.log(sq)
    d = torch.sub(x, y)
    kf = _kl_rows(ep, sp, d, lzq - lzp)
    kr = -_kl_rows(eq, sq, d, lzq - lzp)  # Σ q·(y − x) = −Σ q·d, one difference tensor for both
    lpx, lqx = (x.gather(-1, t) - lzp).squeeze(-1), (y.gather(-1, t) - lzq).squeeze(-1)
    return {"kl_forward": kf.to(cdt), "kl_reverse": kr.to(cdt), "logp_p": lpx.to(cdt), "logp_q": lqx.to(cdt),
            "top1_agree": (ip == iq).squeeze(-1),  # raw logits
            "delta_p": (lqx.exp() - lpx.exp()).to(cdt)}


def _rows_llama(x, y, tg, cdt):
    """llama.cpp's float32 arithmetic with the base stored as uint16 (l. 77-105 writes, l. 189-250 reads)."""
    x, y = x.float(), y.float()
    # base pass: keep logits within 16 of the max, quantize (logit − min)/scale to uint16 with round-half-even
    mn, mx = torch.aminmax(x, dim=-1, keepdim=True)
    mn = torch.maximum(mn, mx - 16)
    lse64 = torch.log(torch.sub(x, mx).exp_().sum(-1, keepdim=True, dtype=torch.float64))  # expf summed in double
    lse = lse64.float()
    min_log_prob = (mn - mx) - lse
    scale = (mx - mn) / 65535.0
    inv = torch.where(scale > 0, 1 / scale, torch.zeros((), device=x.device))
    # code 0 at and below the clamp; llama.cpp's `& 0xFFFF` is left out: in float32 the top code rounds to 65535
    lpb = torch.sub(x, mn).mul_(inv).round_().clamp_(min=0).mul_(scale).add_(min_log_prob)  # dequantized log-probs
    return _rows_llama_stored(x, mx + lse64, lpb, y, tg, cdt)


def _rows_llama_file(lpb, y, tg, cdt):
    """llama.cpp's arithmetic on log-probs it stored itself (its --kl-divergence-base file, dequantized)."""
    lpb = lpb.float()
    return _rows_llama_stored(lpb, torch.logsumexp(lpb.double(), -1, keepdim=True), lpb, y.float(), tg, cdt)


def _rows_llama_stored(x, lse_x, lpb, y, tg, cdt):
    """llama.cpp's KL pass (l. 189-250) against the dequantized base log-probs `lpb`; `x` the base's logits and
    `lse_x` (float64) their log-normaliser for the reverse direction, which llama.cpp does not compute. Written as
    in-place passes over the vocabulary (one block's temporaries: three (rows, V) float32 tensors)."""
    t = tg[:, None]
    nll_base = -lpb.gather(-1, t).squeeze(-1)
    # KL pass over Q's float32 logits
    mxq, imax, q, total = _shifted_exp(y)
    c = mxq + torch.log(total).float()
    nll = (c - y.gather(-1, t)).squeeze(-1)
    d = torch.sub(lpb, y).add_(c).masked_fill_(lpb <= -16.0, 0.0)                 # base p < e^-16 dropped
    kf = torch.exp(lpb).mul_(d).sum(-1, dtype=torch.float64)                      # float32 terms, summed in double
    top = imax.squeeze(-1) == lpb.argmax(-1)
    dp = torch.exp(-nll) - torch.exp(-nll_base)
    # the reverse direction is not in llama.cpp: exact, as _rows_exact's
    kr = _kl_rows(q, total, torch.sub(y, x, out=d), lse_x - mxq.double() - torch.log(total))
    return {"kl_forward": kf.to(cdt), "kl_reverse": kr.to(cdt), "logp_p": (-nll_base).to(cdt),
            "logp_q": (-nll).to(cdt), "top1_agree": top, "delta_p": dp.to(cdt)}


def _as_tensor(a, name):
    if isinstance(a, torch.Tensor):
        return a
    try:
        return torch.as_tensor(np.asarray(a))
    except Exception as e:  # noqa: BLE001 — re-raised with the parameter's name
        raise ValueError(f"{name}: cannot be made a tensor ({e})") from None


@torch.no_grad()
def token_stats(logits_p, logits_q, targets, mask=None, *, chunk_size=None, base_storage: str = "exact"):
    """Per scored position: KL(P‖Q), KL(Q‖P), log P(x), log Q(x), argmax P == argmax Q, Δp = Q(x) − P(x).

    ``logits_p`` (base) and ``logits_q`` (B, T, V), any float dtype, with ``logits[:, t]`` predicting
    ``targets[:, t]`` (B, T) ints; ``mask`` (B, T) bool, None = all. The vocabulary-wide work is done in float32 (or
    float64 for float64 input) on blocks of at most ``chunk_size`` positions (default: 2**20 // V; a block's
    temporaries are then about 40 MB at V = 49 152), so beyond the inputs only one block is ever upcast; unscored
    positions are skipped.

    ``base_storage="llama-uint16"`` reproduces llama.cpp's arithmetic instead of the exact values: the base's log-probs
    as ``--kl-divergence-base`` stores them (logits below max − 16 clamped, the rest quantized to 16 bits, a step of
    (max − min)/65535 ≤ 2.4e-4 nats), KL summed only over tokens whose stored base log-prob is > −16, Q's log-softmax
    in float32, top-1 of the dequantized base. Then forward KL, log P(x), top-1 and Δp are llama.cpp's; KL(Q‖P) stays
    the exact float32 value.

    Returns a dict of (B, T) tensors on the logits' device: ``STAT_KEYS`` (floats in the compute dtype, NaN where
    unscored; ``top1_agree`` bool, False where unscored) and ``mask``.
    """
    if base_storage not in BASE_STORAGE + ("llama-file",):
        raise ValueError(f"base_storage: must be one of {BASE_STORAGE} (got {base_storage!r})")
    lp_, lq_ = _as_tensor(logits_p, "logits_p"), _as_tensor(logits_q, "logits_q")
    if lp_.ndim != 3:
        raise ValueError(f"logits_p: must be (B, T, V) (got shape {tuple(lp_.shape)})")
    if tuple(lq_.shape) != tuple(lp_.shape):
        raise ValueError(f"logits_q: shape {tuple(lq_.shape)} differs from logits_p's {tuple(lp_.shape)}")
    for name, a in (("logits_p", lp_), ("logits_q", lq_)):
        if not a.is_floating_point():
            raise ValueError(f"{name}: must be a floating-point tensor (got {a.dtype})")
    if lq_.device != lp_.device:
        raise ValueError(f"logits_q: on {lq_.device}, logits_p on {lp_.device}")
    B, T, V = lp_.shape
    if V < 1:
        raise ValueError("logits_p: empty vocabulary axis")
    dev = lp_.device
    tg = _as_tensor(targets, "targets")
    if tuple(tg.shape) != (B, T):
        raise ValueError(f"targets: must be (B, T) = {(B, T)} (got {tuple(tg.shape)})")
    if tg.is_floating_point() or tg.dtype == torch.bool or tg.is_complex():
        raise ValueError(f"targets: must be integer token ids (got {tg.dtype})")
    tg = tg.to(device=dev, dtype=torch.int64)
    if mask is None:
        m_all = torch.ones((B, T), dtype=torch.bool, device=dev)
    else:
        m_all = _as_tensor(mask, "mask")
        if tuple(m_all.shape) != (B, T):
            raise ValueError(f"mask: must be (B, T) = {(B, T)} (got {tuple(m_all.shape)})")
        if m_all.dtype != torch.bool:
            raise ValueError(f"mask: must be boolean (got {m_all.dtype})")
        m_all = m_all.to(dev)
    if bool(((tg < 0) | (tg >= V))[m_all].any()):
        raise ValueError(f"targets: scored token ids must lie in [0, {V})")
    if chunk_size is None:
        chunk_size = max(1, (1 << 20) // V)
    if not (_is_int(chunk_size) and chunk_size >= 1):
        raise ValueError(f"chunk_size: must be an integer ≥ 1 or None (got {chunk_size!r})")

    cdt = torch.promote_types(torch.promote_types(lp_.dtype, lq_.dtype), torch.float32)
    rows = {"exact": _rows_exact, "llama-uint16": _rows_llama, "llama-file": _rows_llama_file}[base_storage]
    out = {k: torch.full((B, T), float("nan"), dtype=cdt, device=dev) for k in STAT_KEYS if k != "top1_agree"}
    out["top1_agree"] = torch.zeros((B, T), dtype=torch.bool, device=dev)
    # blocks of ≤ chunk_size positions: whole rows when they fit, else pieces of one row
    tb = T if chunk_size >= T else chunk_size
    bb = max(1, chunk_size // T) if chunk_size >= T else 1
    for b0 in range(0, B, bb):
        for t0 in range(0, T, tb):
            sl = (slice(b0, b0 + bb), slice(t0, t0 + tb))
            m = m_all[sl]
            if not bool(m.any()):
                continue
            res = rows(lp_[sl][m], lq_[sl][m], tg[sl][m], cdt)
            for k, v in res.items():
                out[k][sl][m] = v
    out["mask"] = m_all.clone()
    return out


# -------------------------------------------------------------------------------------------------------- summaries

def cluster_mean(values, clusters, *, confidence: float = 0.95) -> dict:
    """Mean of ``values`` (1-D) with a token-i.i.d. SE and a cluster-robust SE for clusters of unequal size.

    The mean Σ_g S_g / Σ_g n_g is a ratio estimator; its linearized (sandwich, CR1) variance is
    G/(G−1) · Σ_g (S_g − x̄ n_g)² / N², S_g and n_g the cluster sums and sizes. CIs: Student t on G − 1 df (clustered)
    and on N − 1 df (i.i.d., SE = s/√N, which is llama.cpp's ± as well).
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    c = np.asarray(clusters).ravel()
    if c.shape != x.shape:
        raise ValueError(f"clusters: {c.size} labels for {x.size} values")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1) (got {confidence!r})")
    n = x.size
    if n == 0:
        raise ValueError("values: empty")
    _, inv = np.unique(c, return_inverse=True)
    inv = inv.ravel()
    G = int(inv.max()) + 1
    mean = float(x.mean())
    with np.errstate(invalid="ignore", divide="ignore"):
        se_cl = clustered_se(x, inv, mean)
        se_iid = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    t_cl, t_iid = t_quantile(G - 1, confidence), t_quantile(n - 1, confidence)
    return {"mean": mean, "se_cluster": se_cl, "se_iid": se_iid,
            "ci_cluster": (mean - t_cl * se_cl, mean + t_cl * se_cl),
            "ci_iid": (mean - t_iid * se_iid, mean + t_iid * se_iid),
            "n": n, "n_clusters": G, "df_cluster": G - 1, "confidence": confidence}


def _mean_unc(s, s2, n):
    """llama.cpp's mean_and_uncertainty (l. 1734): sqrt((⟨x²⟩ − ⟨x⟩²)/(n − 1)), 0 unless > 0 and n > 10."""
    f = s / n
    df = s2 / n - f * f
    return f, np.where((df > 0) & (n > 10), np.sqrt(np.abs(df) / np.maximum(n - 1, 1)), 0.0)


def _llama_from_sums(S):
    """llama.cpp's derived statistics from its running sums; works elementwise (final totals or per-chunk)."""
    n = S["n"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        lq, lq_u = _mean_unc(S["nll"], S["nll2"], n)
        lb, lb_u = _mean_unc(S["nllb"], S["nllb2"], n)
        # covariance (l. 1743) is that of the two means: biased covariance / (n − 1), 0 for n < 10
        cov = np.where(n < 10, 0.0, (S["nllnllb"] / n - (S["nll"] / n) * (S["nllb"] / n)) / np.maximum(n - 1, 1))
        ppl, ppl_b = np.exp(lq), np.exp(lb)
        ppl_u, ppl_bu = ppl * lq_u, ppl_b * lb_u
        lr = lq - lb
        lr_u = np.sqrt(lq_u * lq_u + lb_u * lb_u - 2.0 * cov)
        ratio = np.exp(lr)
        diff_u = np.sqrt(ppl_u * ppl_u + ppl_bu * ppl_bu - 2.0 * (ppl * ppl_b * cov))
        kld, kld_u = _mean_unc(S["kld"], S["kld2"], n)
        dp, dp_u = _mean_unc(S["dp"], S["dp2"], n)
        mse, mse_u = _mean_unc(S["dp2"], S["dp4"], n)
        rms = np.sqrt(mse)
        rms_u = 0.5 / rms * mse_u
        top = S["same"] / n
        top_u = np.sqrt(top * (1 - top) / (n - 1))
        cor = cov / (lq_u * lb_u)
    return {"ppl_q": (ppl, ppl_u), "ppl_base": (ppl_b, ppl_bu), "cov_ln_ppl": cov, "cor_ln_ppl": cor,
            "ln_ppl_ratio": (lr, lr_u), "ppl_ratio": (ratio, ratio * lr_u), "ppl_diff": (ppl - ppl_b, diff_u),
            "kld": (kld, kld_u), "dp": (dp, dp_u), "rms_dp": (rms, rms_u), "same_top": (top, top_u)}


def _llama_percentiles(values) -> dict:
    """llama.cpp's percentile lambda (l. 1902) in its float32 arithmetic, and its median; values as stored (float)."""
    v = np.sort(np.asarray(values, dtype=np.float32))
    n = v.size
    one, f32 = np.float32(1.0), np.float32
    out = {"max": float(v[-1]), "min": float(v[0])}
    out["median"] = float(f32(0.5) * (v[n // 2] + v[n // 2 - 1])) if n % 2 == 0 else float(v[n // 2])
    for key, fr in _FRACTIONS.items():
        p = f32(fr) * f32(n - 1)                     # float * size_t → float
        ip = int(p)
        p = f32(p - f32(ip))
        out[key] = float((one - p) * v[ip] + p * v[min(ip + 1, n - 1)])
    return out


def _to_np(a, name):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        a = a.double() if a.is_floating_point() else a
        return a.numpy()
    return np.asarray(a)


def _broadcast(idx, shape, name):
    a = _to_np(idx, name)
    if a.ndim == 1 and len(shape) >= 1 and a.shape[0] == shape[0]:
        a = a.reshape((-1,) + (1,) * (len(shape) - 1))
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ValueError(f"{name}: shape {a.shape} does not fit the stats' shape {shape} "
                         f"(give one id per row or one per position)") from None


def summarize(stats, window_index=None, document_index=None, *, confidence: float = 0.95, rng=None,
              n_bootstrap: int = 1000) -> dict:
    """Every llama.cpp statistic with llama.cpp's own formula, and clustered SEs beside the token-i.i.d. ones.

    ``stats``: token_stats' dict (torch or numpy, any shape; ``mask`` selects the scored tokens, else every finite
    ``kl_forward``). ``window_index``: window id per row (B,) or per position; None = each row is a window.
    ``document_index``: if given, clusters are documents instead of windows (a window that straddles two documents
    then contributes to both clusters, whose correlation through the shared context is ignored).

    Returns a dict (numpy float64 throughout):
      ``llama``: llama.cpp's numbers — (value, ±) pairs ``ppl_q``, ``ppl_base``, ``ln_ppl_ratio``, ``ppl_ratio``,
        ``ppl_diff``, ``kld``, ``dp``, ``rms_dp``, ``same_top``; ``cor_ln_ppl``; ``kld_percentiles``,
        ``dp_percentiles`` (keys "max", "99.9", …, "median", …, "min");
      ``means``: for kl_forward, kl_reverse, jeffreys, delta_p, same_top, ln_ppl_ratio, nll_q, nll_base, mse_dp the
        ``cluster_mean`` dict (mean, se_cluster, se_iid, ci_cluster, ci_iid, …), plus ``ppl_q``, ``ppl_base``,
        ``ppl_ratio`` and ``rms_dp`` transformed (exp / sqrt) with their CIs;
      ``percentiles``: llama.cpp-style percentiles of kl_forward, kl_reverse, jeffreys, delta_p;
      ``chunks``: llama.cpp's running per-chunk table (cumulative over windows in id order);
      ``kld_quantile_cis`` (only with a numpy Generator ``rng``): quantile_cis of KL(P‖Q), ``n_bootstrap`` cluster
        resamples;
      ``n_tokens``, ``n_windows``, ``n_clusters``, ``cluster_by``, ``confidence``.
    """
    if not isinstance(stats, dict):
        raise ValueError("stats: must be the dict returned by token_stats")
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"stats: missing {missing}")
    arr = {k: _to_np(stats[k], k) for k in STAT_KEYS}
    shape = arr["kl_forward"].shape
    for k, a in arr.items():
        if a.shape != shape:
            raise ValueError(f"stats: {k!r} has shape {a.shape}, kl_forward {shape}")
    if "mask" in stats and stats["mask"] is not None:
        mask = _to_np(stats["mask"], "mask").astype(bool)
        if mask.shape != shape:
            raise ValueError(f"stats: 'mask' has shape {mask.shape}, kl_forward {shape}")
    else:
        mask = np.isfinite(arr["kl_forward"])
    if window_index is None:
        if len(shape) == 0:
            raise ValueError("window_index: needed for 0-d stats")
        window_index = np.arange(shape[0])
    win = _broadcast(window_index, shape, "window_index")[mask]
    doc = None if document_index is None else _broadcast(document_index, shape, "document_index")[mask]
    x = {k: a[mask].astype(np.float64) for k, a in arr.items()}
    N = x["kl_forward"].size
    if N < 2:
        raise ValueError(f"stats: {N} scored token(s); need at least 2")
    for k, a in x.items():
        if not np.all(np.isfinite(a)):
            raise ValueError(f"stats: {k!r} is not finite at {int(np.sum(~np.isfinite(a)))} scored position(s)")

    nll, nllb = -x["logp_q"], -x["logp_p"]
    kl, kr, dp, same = x["kl_forward"], x["kl_reverse"], x["delta_p"], x["top1_agree"]
    tok = {"nll": nll, "nll2": nll * nll, "nllb": nllb, "nllb2": nllb * nllb, "nllnllb": nll * nllb,
           "kld": kl, "kld2": kl * kl, "dp": dp, "dp2": dp * dp, "dp4": (dp * dp) ** 2, "same": same}

    # final llama.cpp statistics (l. 1859-1952)
    llama = _llama_from_sums({"n": np.float64(N), **{k: np.float64(v.sum()) for k, v in tok.items()}})
    llama = {k: (tuple(float(u) for u in v) if isinstance(v, tuple) else float(v)) for k, v in llama.items()}
    llama["kld_percentiles"] = _llama_percentiles(kl)
    llama["dp_percentiles"] = _llama_percentiles(dp)
    llama["n_tokens"] = N

    # llama.cpp's per-chunk lines: running totals after each window
    wid, winv = np.unique(win, return_inverse=True)
    winv = winv.ravel()
    W = wid.size
    cum = {k: np.cumsum(np.bincount(winv, weights=v, minlength=W)) for k, v in tok.items()}
    cum["n"] = np.cumsum(np.bincount(winv, minlength=W)).astype(np.float64)
    ch = _llama_from_sums(cum)
    chunks = {"window": wid, "n_tokens": cum["n"]}
    for k in ("ppl_q", "ln_ppl_ratio", "kld", "rms_dp", "same_top"):
        chunks[k], chunks[k + "_unc"] = ch[k]

    clusters = win if doc is None else doc
    cm = lambda v: cluster_mean(v, clusters, confidence=confidence)  # noqa: E731
    means = {"kl_forward": cm(kl), "kl_reverse": cm(kr), "jeffreys": cm(kl + kr), "delta_p": cm(dp),
             "same_top": cm(same), "ln_ppl_ratio": cm(nll - nllb), "nll_q": cm(nll), "nll_base": cm(nllb),
             "mse_dp": cm(dp * dp)}
    for name, src in (("ppl_q", "nll_q"), ("ppl_base", "nll_base"), ("ppl_ratio", "ln_ppl_ratio")):
        s = means[src]
        means[name] = {"value": math.exp(s["mean"]), "ci_cluster": tuple(np.exp(s["ci_cluster"]).tolist()),
                       "ci_iid": tuple(np.exp(s["ci_iid"]).tolist()),
                       "se_cluster": math.exp(s["mean"]) * s["se_cluster"], "se_iid": math.exp(s["mean"]) * s["se_iid"]}
    s = means["mse_dp"]
    rms = math.sqrt(s["mean"])
    with np.errstate(invalid="ignore", divide="ignore"):
        means["rms_dp"] = {"value": rms, "se_cluster": 0.5 / rms * s["se_cluster"] if rms > 0 else math.nan,
                           "se_iid": 0.5 / rms * s["se_iid"] if rms > 0 else math.nan,
                           "ci_cluster": tuple(np.sqrt(np.maximum(s["ci_cluster"], 0.0)).tolist()),
                           "ci_iid": tuple(np.sqrt(np.maximum(s["ci_iid"], 0.0)).tolist())}
    percentiles = {"kl_forward": llama["kld_percentiles"], "kl_reverse": _llama_percentiles(kr),
                   "jeffreys": _llama_percentiles(kl + kr), "delta_p": llama["dp_percentiles"]}
    out = {"llama": llama, "means": means, "percentiles": percentiles, "chunks": chunks, "n_tokens": N,
           "n_windows": W, "n_clusters": means["kl_forward"]["n_clusters"],
           "cluster_by": "window" if doc is None else "document", "confidence": confidence}
    if rng is not None:
        out["kld_quantile_cis"] = quantile_cis(kl, clusters, rng, confidence=confidence, n_resamples=n_bootstrap)
    return out


# ------------------------------------------------------------------------------------------------------- formatting

_CHUNK_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS"
                 "            Same top p")


def _llama_text(L: dict) -> str:
    """The three final blocks exactly as kl_divergence() prints them (printf formats of l. 1864-1952 / @050fc7f)."""
    o = ["====== Perplexity statistics ======"]
    o.append("Mean PPL(Q)                   : %10.6f ± %10.6f" % L["ppl_q"])
    o.append("Mean PPL(base)                : %10.6f ± %10.6f" % L["ppl_base"])
    o.append("Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%" % (100.0 * L["cor_ln_ppl"]))
    o.append("Mean ln(PPL(Q)/PPL(base))     : %10.6f ± %10.6f" % L["ln_ppl_ratio"])
    o.append("Mean PPL(Q)/PPL(base)         : %10.6f ± %10.6f" % L["ppl_ratio"])
    o.append("Mean PPL(Q)-PPL(base)         : %10.6f ± %10.6f" % L["ppl_diff"])
    o += ["", "====== KL divergence statistics ======"]
    o.append("Mean    KLD: %10.6f ± %10.6f" % L["kld"])
    kp = L["kld_percentiles"]
    lab = {"max": "Maximum", "min": "Minimum", "median": "Median "}
    for k in _KLD_ROWS:
        o.append("%s KLD: %10.6f" % (lab.get(k, "%4s%%  " % k), kp[k]))
    o += ["", "====== Token probability statistics ======"]
    o.append("Mean    Δp: %6.3f ± %5.3f %%" % (100.0 * L["dp"][0], 100.0 * L["dp"][1]))
    dpp = L["dp_percentiles"]
    for k in _DP_ROWS:
        o.append("%s Δp: %6.3f%%" % (lab.get(k, "%4s%%  " % k), 100.0 * dpp[k]))
    o.append("RMS Δp    : %6.3f ± %5.3f %%" % (100.0 * L["rms_dp"][0], 100.0 * L["rms_dp"][1]))
    o.append("Same top p: %6.3f ± %5.3f %%" % (100.0 * L["same_top"][0], 100.0 * L["same_top"][1]))
    return "\n".join(o) + "\n"


def _chunk_text(C: dict) -> str:
    rows = zip(C["ppl_q"], C["ppl_q_unc"], C["ln_ppl_ratio"], C["ln_ppl_ratio_unc"], C["kld"], C["kld_unc"],
               C["rms_dp"], C["rms_dp_unc"], C["same_top"], C["same_top_unc"])
    # the header once, before the first chunk's line (kl_divergence(): `if (i == 0)`, l. 1825-1837 of the
    # llama-cpp-python 0.3.36 vendored copy; its log shows one header above all chunk lines)
    lines = ["%4d    %9.4f ± %9.4f    %10.5f ± %10.5f    %10.5f ± %10.5f    %6.3f ± %6.3f %%    %6.3f ± %6.3f %%\n"
             % (i + 1, a, b, c, d, e, f, 100.0 * g, 100.0 * h, 100.0 * p, 100.0 * q)
             for i, (a, b, c, d, e, f, g, h, p, q) in enumerate(rows)]
    return "\n" + _CHUNK_HEADER + "\n" + "".join(lines) + "\n"


TEXT_WIDTH = 80  # our block's lines fit 80 columns (llama.cpp's own lines keep its formats, whatever their width)
EXTRA_ROWS = (  # label, key in summary["means"], scale, value field
    ("KL(base||Q)", "kl_forward", 1.0, "mean"), ("KL(Q||base)", "kl_reverse", 1.0, "mean"),
    ("Jeffreys", "jeffreys", 1.0, "mean"), ("dp [%]", "delta_p", 100.0, "mean"),
    ("same top-1 [%]", "same_top", 100.0, "mean"), ("ln PPL ratio Q/base", "ln_ppl_ratio", 1.0, "mean"),
    ("NLL(Q)", "nll_q", 1.0, "mean"), ("NLL(base)", "nll_base", 1.0, "mean"), ("perplexity Q", "ppl_q", 1.0, "value"),
    ("perplexity base", "ppl_base", 1.0, "value"), ("perplexity Q/base", "ppl_ratio", 1.0, "value"),
    ("RMS dp [%]", "rms_dp", 100.0, "value"))
EXTRA_LEGEND = ("KL(base||Q) is llama.cpp's KLD; Jeffreys = KL(base||Q) + KL(Q||base); dp = p_Q(x) - p_base(x) of "
                "the scored token; NLL = mean negative log-likelihood = ln perplexity; ratio = SE(cluster) / SE(iid).")


def _wrap(text: str, first: str = "", rest: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, TEXT_WIDTH, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False,
                         break_long_words=False)  # a path longer than a line stays whole


def value_ci(v, ci, se=None, scale: float = 1.0, sign: bool = False) -> str:
    """'v [lo, hi]' to the decimals the SE supports (report.se_decimals; without `se`, the SE of a normal interval
    of that width); 4 significant digits when the interval is missing."""
    from kl_estimation.report import fixed, se_decimals

    lo, hi = (scale * c for c in ci)
    if se is None:
        se = (hi - lo) / (2 * 1.959964) if math.isfinite(lo) and math.isfinite(hi) else None
    else:
        se = scale * se
    d = se_decimals(se)
    mid = fixed(scale * v, d)
    mid = ("+" + mid) if sign and not mid.startswith("-") else mid
    return mid if not (math.isfinite(lo) and math.isfinite(hi)) else f"{mid} [{fixed(lo, d)}, {fixed(hi, d)}]"


def _extra_text(s: dict) -> str:
    """Our block, within TEXT_WIDTH columns: every number to the decimals its clustered SE supports."""
    from kl_estimation.report import estimate_text, fixed, se_decimals

    M, conf = s["means"], s["confidence"]
    G, N = s["n_clusters"], s["n_tokens"]
    pc = "%g%%" % (100 * conf)
    o = ["====== kl_estimation: both directions, Jeffreys, clustered SEs ======",
         _wrap(f"scored tokens {N}, clusters {G} {s['cluster_by']}s; SE(cluster): ratio-estimator sandwich with "
               f"G/(G-1), CI Student t on {G - 1} df; SE(iid): token-i.i.d., llama.cpp's error, CI t on {N - 1} df")]
    heads = ("quantity", "mean", "SE(cluster)", "SE(iid)", "ratio", f"{pc} CI (cluster)")
    cells = []
    for label, key, sc, field in EXTRA_ROWS:
        r = M[key]
        d = se_decimals(sc * r["se_cluster"])
        ratio = r["se_cluster"] / r["se_iid"] if r["se_iid"] > 0 else math.nan
        cells.append((label, fixed(sc * r[field], d), estimate_text(0.0, sc * r["se_cluster"])[1],
                      estimate_text(0.0, sc * r["se_iid"])[1], "%.2f" % ratio,
                      f"[{fixed(sc * r['ci_cluster'][0], d)}, {fixed(sc * r['ci_cluster'][1], d)}]"))
    w = [max(len(c[i]) for c in [heads, *cells]) for i in range(len(heads))]
    split = sum(w) + len(w) - 1 > TEXT_WIDTH  # the CI in a second table of the same rows

    def line(c, idx):
        return " ".join(c[i].ljust(w[i]) if i == 0 else c[i].rjust(w[i]) for i in idx).rstrip()

    first = range(5) if split else range(6)
    o += [line(heads, first), *(line(c, first) for c in cells)]
    if split:
        o += ["", line(heads, (0, 5)), *(line(c, (0, 5)) for c in cells)]
    o.append(_wrap(EXTRA_LEGEND))
    for label, key in (("KL(Q||base) quantiles", "kl_reverse"), ("Jeffreys quantiles", "jeffreys")):
        q = s["percentiles"][key]
        o.append(_wrap(label + ": " + ", ".join("%s %s" % (k if k in ("max", "min", "median") else k + "%",
                                                           fixed(q[k], None)) for k in _KLD_ROWS)))
    if "kld_quantile_cis" in s:
        qc = s["kld_quantile_cis"]
        o.append(_wrap(f"KL(base||Q) quantiles with {pc} CIs (bootstrap over the {qc['n_clusters']} "
                       f"{s['cluster_by']}s, {qc['n_resamples']} resamples): " + ", ".join(
                           f"{k if k == 'median' else k + '%'} {value_ci(qc[k]['value'], qc[k]['ci'])}"
                           for k in QUANTILE_LEVELS)))
    for name, g in s.get("groups", {}).items():
        o.append(_wrap(f"group {name}: {g['kl_forward']['n']} tokens in {g['kl_forward']['n_clusters']} "
                       f"{s['cluster_by']}s: " + group_line(g, pc)))
    if N < 100:
        o.append(_wrap(f"note: llama.cpp prints no final statistics for fewer than 100 scored tokens (here {N})"))
    return "\n".join(o) + "\n"


def group_line(g: dict, pc: str = "95%") -> str:
    """A group's mean KL(P‖Q), same top-1 and ln PPL ratio with their clustered CIs, on one (long) line, each to the
    decimals its SE supports; callers wrap it."""
    kf, st, lr = g["kl_forward"], g["same_top"], g["ln_ppl_ratio"]
    from kl_estimation.report import estimate_text

    return (f"KL(base||Q) {value_ci(kf['mean'], kf['ci_cluster'], kf['se_cluster'])} (SE "
            f"{estimate_text(kf['mean'], kf['se_cluster'])[1]}), same top-1 "
            f"{value_ci(st['mean'], st['ci_cluster'], st['se_cluster'], 100.0)} %, ln PPL ratio "
            f"{value_ci(lr['mean'], lr['ci_cluster'], lr['se_cluster'])} ({pc} CIs)")


def format_llama(summary: dict, *, chunks: bool = False, extra: bool = True) -> str:
    """llama.cpp's final text blocks from ``summarize``'s result, labels and printf formats exactly.

    "====== Perplexity statistics ======", "====== KL divergence statistics ======" and "====== Token probability
    statistics ======" (blank line between), as ``llama-perplexity --kl-divergence`` prints them; ``chunks=True``
    first prints its running per-chunk table. ``extra=True`` appends, after a blank line, one more block ("======
    kl_estimation: …") with the reverse KL, the Jeffreys divergence and clustered / i.i.d. SEs and CIs; none of its
    lines reuses a llama.cpp label, so parsers of llama.cpp's output read the same numbers.
    """
    if not (isinstance(summary, dict) and "llama" in summary):
        raise ValueError("summary: must be the dict returned by summarize")
    text = (_chunk_text(summary["chunks"]) if chunks else "") + _llama_text(summary["llama"])
    if extra:
        text += "\n" + _extra_text(summary)
    return text


# ------------------------------------------------------------------------------------- several candidates, one base

QUANTILE_LEVELS = {"99.9": 0.999, "99.0": 0.990, "95.0": 0.950, "90.0": 0.900, "median": 0.500}


def _weighted_llama_quantiles(sorted_values, sorted_clusters, counts, levels):
    """llama.cpp's interpolated percentile (_llama_percentiles, in float64) of the data set in which cluster g appears
    counts[..., g] times, for every row of `counts` (..., G) at once: the k-th value of that data set in sorted order
    is the first sorted value whose running weight exceeds k, found for all rows by one searchsorted on the running
    weights laid end to end (row r shifted by r · (largest total + 1), so the concatenation stays sorted)."""
    counts = np.asarray(counts, dtype=np.float64)
    lead = counts.shape[:-1]
    c = counts.reshape(-1, counts.shape[-1])
    cum = np.cumsum(c[:, sorted_clusters], axis=1)                       # (R, N) running weights
    total = cum[:, -1]
    shift = (np.arange(c.shape[0]) * (total.max() + 1.0))[:, None]
    flat = (cum + shift).ravel()
    n_v = sorted_values.size
    out = []
    for f in levels:
        pos = f * (total - 1)
        ip = np.floor(pos)
        frac = pos - ip
        hi = np.minimum(ip + 1, total - 1)
        i_lo = np.searchsorted(flat, (ip[:, None] + shift).ravel(), side="right") - np.arange(c.shape[0]) * n_v
        i_hi = np.searchsorted(flat, (hi[:, None] + shift).ravel(), side="right") - np.arange(c.shape[0]) * n_v
        out.append((1 - frac) * sorted_values[i_lo] + frac * sorted_values[i_hi])
    return np.stack(out).reshape((len(levels),) + lead)


def quantile_cis(values, clusters, rng: np.random.Generator, *, levels: dict | None = None,
                 confidence: float = 0.95, n_resamples: int = 1000, method: str = "percentile") -> dict:
    """Quantiles of per-token values (llama.cpp's interpolation) with CIs from a bootstrap over clusters.

    Clusters (windows or documents) are drawn with replacement, G of G, and every quantile is recomputed on the tokens
    of the drawn clusters (scipy.stats.bootstrap on the cluster labels, vectorised: one weighted-quantile pass per
    batch of resamples). Tokens of a cluster share their context, so resampling tokens would give intervals as
    narrow as llama.cpp's token-i.i.d. ± suggests. `levels`: {label: fraction} (default QUANTILE_LEVELS). The
    coverage of these intervals, measured in simulation, is in docs/corpus.md: an extreme quantile estimated from
    few clusters is covered less often than `confidence` says.

    Returns {label: {"value", "ci": (low, high), "level"}} plus "method", "n_resamples", "n_clusters".
    """
    from scipy import stats as sps

    levels = QUANTILE_LEVELS if levels is None else levels
    if not isinstance(rng, np.random.Generator):
        raise ValueError("rng: pass a numpy Generator (np.random.default_rng(seed))")  # noqa: TRY004 - bad input
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise ValueError(f"n_resamples: must be an integer ≥ 1 (got {n_resamples!r})")
    x = np.asarray(values, dtype=np.float64).ravel()
    c = np.asarray(clusters).ravel()
    if c.shape != x.shape:
        raise ValueError(f"clusters: {c.size} labels for {x.size} values")
    _, inv = np.unique(c, return_inverse=True)
    inv = inv.ravel()
    G = int(inv.max()) + 1 if inv.size else 0
    order = np.argsort(x, kind="stable")
    xs, cs = x[order], inv[order]
    fr = np.array(list(levels.values()), dtype=np.float64)
    point = _weighted_llama_quantiles(xs, cs, np.ones(G), fr)
    out = {k: {"value": float(v), "level": float(f)} for (k, f), v in zip(levels.items(), point)}
    if G < 2:
        for r in out.values():
            r["ci"] = (math.nan, math.nan)
    else:
        def stat(idx, axis=-1):
            idx = np.moveaxis(np.asarray(idx, dtype=np.int64), axis, -1)
            lead = idx.shape[:-1]
            flat = idx.reshape(-1, idx.shape[-1])
            rows = np.repeat(np.arange(flat.shape[0]), flat.shape[1])
            counts = np.bincount(rows * G + flat.ravel(), minlength=flat.shape[0] * G).reshape(-1, G)
            return _weighted_llama_quantiles(xs, cs, counts.reshape(lead + (G,)), fr)

        # batches of resamples keep the (batch, tokens) running weights near 2**22 floats: at 2**24 their
        # temporaries were the peak of a whole llama.cpp-backend run (+300 MB)
        batch = max(1, (1 << 22) // max(x.size, 1))
        import inspect

        # scipy ≥ 1.15 calls the Generator `rng`; 1.11–1.14 (our floor) `random_state`
        seed = {"rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state": rng}
        with np.errstate(invalid="ignore", divide="ignore"):
            res = sps.bootstrap((np.arange(G),), stat, vectorized=True, n_resamples=n_resamples, batch=batch,
                                confidence_level=confidence, method=method, **seed)
        for r, lo, hi in zip(out.values(), np.atleast_1d(res.confidence_interval.low),
                             np.atleast_1d(res.confidence_interval.high)):
            r["ci"] = (float(lo), float(hi))
    return {**out, "method": method, "n_resamples": int(n_resamples), "n_clusters": G, "confidence": confidence}


def paired_difference(a, b, clusters, *, confidence: float = 0.95) -> dict:
    """Mean of a − b over the same tokens (per-token KL of two candidates against one base) with its clustered SE
    and CI: the pairing removes what the two share (hard tokens are hard for both), so the difference is far better
    determined than either mean. cluster_mean's dict plus "indistinguishable" (the CI covers 0)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"b: {b.size} values for a's {a.size} (the same tokens are needed)")
    d = cluster_mean(a - b, clusters, confidence=confidence)
    d["indistinguishable"] = bool(d["ci_cluster"][0] <= 0 <= d["ci_cluster"][1])
    return d
