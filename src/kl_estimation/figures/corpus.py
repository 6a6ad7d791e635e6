r"""Figures of a corpus run, drawn from its saved files alone (summary.json + tokens.npz + windows.csv).

  1 kld-distribution  per-token KL(P‖Q) and KL(Q‖P) on a log x axis (log10 bins), llama.cpp's percentiles marked
  2 kld-position      the mean KL at each position of the window (both directions), 95 % bands over windows, and the
                      share of P's top token Q agrees on
  3 per-window        each window's mean KL(P‖Q) with a token-i.i.d. 95 % interval, the overall mean with its
                      clustered and its i.i.d. 95 % intervals as bands
  4 delta-p           Δp = Q(x) − P(x) of the actual token, histogram (log counts) with llama.cpp's percentiles
  5 worst-tokens      the tokens of largest KL(P‖Q) in their context: P's and Q's probability of the token and their
                      top tokens
Colours: P's direction KL(P‖Q) blue, the reverse KL(Q‖P) orange, as in every panel.
"""
from __future__ import annotations

import math
import textwrap
from html import escape
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.core.estimators import Z95
from kl_estimation.figures.synthetic import FORMATS, RunFolderError, _plt, write_index

FWD, REV = "#1f77b4", "#ff7f0e"


class CorpusRun:
    def __init__(self, path: Path, summary: dict, tokens: dict, windows: list[dict]):
        self.path, self.summary, self.tokens, self.windows = path, summary, tokens, windows

    @property
    def mask(self) -> np.ndarray:
        return self.tokens["mask"].astype(bool)

    def scored(self, key: str) -> np.ndarray:
        return np.asarray(self.tokens[key], dtype=np.float64)[self.mask]

    @property
    def stats(self) -> dict:
        return self.summary["summary"]

    @property
    def title(self) -> str:
        m, c = self.summary.get("models", {}), self.summary.get("config", {})
        return (f"P = {_short(m.get('p'))}, Q = {_short(m.get('q'))}; {self.stats['n_tokens']} "
                f"scored tokens in {self.stats['n_windows']} windows of {c.get('context')} ({c.get('score')})")


def _short(name, n: int = 36) -> str:
    name = Path(str(name)).name
    return name if len(name) <= n else name[: n // 2 - 1] + "…" + name[-(n // 2):]


def load_corpus_run(path) -> CorpusRun:
    from kl_estimation.llm.corpus.run import CorpusResult

    try:
        res = CorpusResult.load(path)
    except ValueError as err:
        raise RunFolderError(str(err)) from None
    return CorpusRun(Path(path), res.to_dict(), res.tokens, res.windows)


# ------------------------------------------------------------------------------------------------ figures

def _log_bins(values: np.ndarray, n: int = 60):
    pos = values[values > 0]
    lo = max(float(pos.min()) if pos.size else 1e-8, 1e-9)
    hi = max(float(values.max()), lo * 10)
    return np.logspace(math.log10(lo), math.log10(hi), n)


def fig_kld_distribution(plt, run: CorpusRun):
    kf, kr = run.scored("kl_forward"), run.scored("kl_reverse")
    fig, ax = plt.subplots(figsize=(11, 5))
    bins = _log_bins(np.concatenate([kf, kr]))
    for v, c, lab in ((kf, FWD, "KL(P‖Q) — llama.cpp's KLD"), (kr, REV, "KL(Q‖P) — reverse")):
        nonpos = int(np.sum(v <= 0))
        ax.hist(np.clip(v, bins[0], None), bins=bins, histtype="step", lw=1.8, color=c,
                label=f"{lab}: mean {v.mean():.4g}, median {np.median(v):.4g}"
                      + (f" ({nonpos} ≤ 0 at the left edge)" if nonpos else ""))
        ax.axvline(v.mean(), color=c, lw=1, ls="--")
    pct = run.stats["percentiles"]["kl_forward"]
    for k in ("99.0", "90.0", "median", "10.0"):
        ax.axvline(pct[k], color="0.5", lw=0.7, ls=":")
        ax.text(pct[k], ax.get_ylim()[1] * 0.97, k + ("" if k == "median" else "%"), rotation=90, va="top",
                ha="right", fontsize=7, color="0.35")
    ax.set_xscale("log")
    ax.set_xlabel("per-token KL (nats), log scale")
    ax.set_ylabel("scored tokens")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"Per-token KL divergence, both directions — dashed: means; dotted: llama.cpp's KLD percentiles\n"
                 f"{run.title}", fontsize=10)
    fig.tight_layout()
    return fig, ("Distribution of the per-token KL(P‖Q) (llama.cpp's KLD) and KL(Q‖P) on a log axis, with their means "
                 "and llama.cpp's percentiles of KL(P‖Q).")


def fig_kld_position(plt, run: CorpusRun):
    mask = run.mask
    cols = np.flatnonzero(mask.any(0))
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    for key, c, lab in (("kl_forward", FWD, "KL(P‖Q)"), ("kl_reverse", REV, "KL(Q‖P)")):
        x = np.where(mask, run.tokens[key], np.nan)[:, cols]
        n = np.sum(np.isfinite(x), 0)
        m = np.nanmean(x, 0)
        se = np.nanstd(x, 0, ddof=1) / np.sqrt(np.maximum(n, 1)) if x.shape[0] > 1 else np.zeros_like(m)
        a1.plot(cols, m, color=c, lw=1.4, label=f"{lab}, mean over windows")
        a1.fill_between(cols, m - Z95 * se, m + Z95 * se, color=c, alpha=0.2, lw=0)
    same = np.where(mask, run.tokens["top1_agree"], np.nan)[:, cols].astype(float)
    a2.plot(cols, 100 * np.nanmean(same, 0), color="0.3", lw=1.2)
    a2.set_ylabel("same top-1 (%)")
    a1.set_ylabel("mean KL (nats)")
    a1.set_ylim(bottom=0)
    a1.legend(loc="upper right", fontsize=8)
    a2.set_xlabel("position of the predicted token in the window (tokens of context before it)")
    a1.set_title(f"KL along the window — bands: 95% over the {mask.shape[0]} windows (one value per window and "
                 f"position)\n{run.title}", fontsize=10)
    fig.tight_layout()
    return fig, ("Mean per-token KL in both directions at each position of the window, with 95% bands over windows, "
                 "and the share of positions where Q's top token is P's.")


def fig_per_window(plt, run: CorpusRun):
    rows = run.windows
    w = np.array([r["window"] for r in rows])
    m = np.array([r["kl_forward"] for r in rows])
    lo = np.array([r["kl_forward_ci_low"] for r in rows])
    hi = np.array([r["kl_forward_ci_high"] for r in rows])
    M = run.stats["means"]["kl_forward"]
    cb = run.stats.get("cluster_by", "window")
    fig, ax = plt.subplots(figsize=(11, 4.8))
    ax.axhspan(*M["ci_cluster"], color=FWD, alpha=0.18, lw=0, label=f"overall mean {M['mean']:.4g}, 95% CI clustered "
                                                                    f"by {cb} ±{M['ci_cluster'][1] - M['mean']:.3g}")
    ax.axhspan(*M["ci_iid"], color="0.3", alpha=0.25, lw=0, label=f"95% CI if tokens were i.i.d. (llama.cpp's ±) "
                                                                 f"±{M['ci_iid'][1] - M['mean']:.3g}")
    ax.axhline(M["mean"], color=FWD, lw=1)
    if len(w) <= 400:
        ax.errorbar(w, m, yerr=[m - lo, hi - m], fmt="o", ms=3.5, color=FWD, ecolor="0.55", elinewidth=0.8, capsize=0,
                    label="window mean, token-i.i.d. 95% interval within the window")
    else:
        ax.plot(w, m, ".", ms=2, color=FWD, label="window mean")
    ax.set_xlabel("window (in corpus order)")
    ax.set_ylabel("mean KL(P‖Q) of the window's scored tokens")
    ax.legend(loc="upper right", fontsize=8)
    ratio = M["se_cluster"] / M["se_iid"] if M["se_iid"] > 0 else math.nan
    ax.set_title(f"KL(P‖Q) per window — the clustered SE is {ratio:.2f}× the token-i.i.d. one: tokens of a window "
                 f"share their context\n{run.title}", fontsize=10)
    fig.tight_layout()
    return fig, (f"Mean KL(P‖Q) of each window with a within-window 95% interval; bands: the overall mean's 95% CI "
                 f"clustered by {cb} and the token-i.i.d. one llama.cpp prints.")


def fig_delta_p(plt, run: CorpusRun):
    dp = 100 * run.scored("delta_p")
    L = run.stats["llama"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    ax.hist(dp, bins=np.linspace(-100, 100, 101), color="#2ca02c", alpha=0.8)
    ax.set_yscale("log")
    pct = run.stats["percentiles"]["delta_p"]
    for k in ("1.0", "25.0", "median", "75.0", "99.0"):
        ax.axvline(100 * pct[k], color="0.3", lw=0.8, ls=":")
        ax.text(100 * pct[k], ax.get_ylim()[1] * 0.9, k + ("" if k == "median" else "%"), rotation=90, va="top",
                ha="right", fontsize=7, color="0.3")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("Δp = Q(x) − P(x) of the actual next token (percentage points)")
    ax.set_ylabel("scored tokens (log)")
    ax.set_title(f"Token probability change, Q against P — mean Δp {100 * L['dp'][0]:.3f} ± {100 * L['dp'][1]:.3f} %, "
                 f"RMS {100 * L['rms_dp'][0]:.3f} %, same top p {100 * L['same_top'][0]:.3f} %\n{run.title}",
                 fontsize=10)
    fig.tight_layout()
    return fig, "Histogram of Δp = Q(x) − P(x) for the actual next token (log counts), llama.cpp's percentiles dotted."


def _clean(s: str) -> str:
    return s.replace("\n", "⏎").replace("\t", "⇥").replace("$", r"\$")


def fig_worst_tokens(plt, run: CorpusRun):
    worst = run.summary.get("worst_tokens") or []
    if not worst:
        return None
    n = len(worst)
    fig = plt.figure(figsize=(13, 1.0 + 0.62 * n))
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.98 - 0.9 / (1.0 + 0.62 * n)])
    ax.axis("off")
    fig.suptitle(f"The {n} tokens of largest KL(P‖Q) in their context (⏎ = newline): p and q of the actual token, "
                 f"each model's top {len(worst[0]['top_p'])}\n{run.title}", fontsize=10)
    for i, r in enumerate(worst):
        y = 1 - (i + 0.5) / n
        ctx = _clean(r["context"])[-95:]
        ax.text(0.0, y + 0.2 / n, f"{i + 1:2d}. KL {r['kl_forward']:.3f} (rev {r['kl_reverse']:.3f})  window "
                f"{r['window']} pos {r['position']}", fontsize=8, color="#d62728", family="monospace", va="center")
        ax.text(0.0, y - 0.13 / n, "…" + ctx + " ", fontsize=8, family="monospace", va="center", color="0.25")
        ax.text(0.62, y + 0.2 / n, f"token {_clean(r['token'])!r}: p {r['p']:.3f}, q {r['q']:.3f}", fontsize=8,
                family="monospace", va="center", weight="bold")
        tp = ", ".join(f"{_clean(t)!r} {pr:.2f}" for t, pr in r["top_p"])
        tq = ", ".join(f"{_clean(t)!r} {pr:.2f}" for t, pr in r["top_q"])
        ax.text(0.62, y - 0.13 / n, textwrap.shorten(f"P: {tp} | Q: {tq}", 85), fontsize=7, family="monospace",
                va="center", color="0.25")
    return fig, "The tokens of largest KL(P‖Q) with their preceding context, P's and Q's probabilities and top tokens."


FIGURES = {"kld-distribution": fig_kld_distribution, "kld-position": fig_kld_position, "per-window": fig_per_window,
           "delta-p": fig_delta_p, "worst-tokens": fig_worst_tokens}


def draw_all(path, fmt: str = "png") -> Path:
    """Every figure of the corpus run folder `path` into `path/plots/` with an index.html; returns its path (drawn in
    a temporary folder that replaces plots/ only when every figure succeeded)."""
    if fmt not in FORMATS:
        raise RunFolderError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run = load_corpus_run(path)
    path = Path(path)
    plt = _plt()
    files = []
    with runio.replaced_folder(path / "plots", ".plots-") as tmp:
        for i, (name, draw) in enumerate(FIGURES.items(), 1):
            made = draw(plt, run)
            if made is None:
                continue
            fig, caption = made
            fname = f"corpus_{i}_{name}.{fmt}"
            fig.savefig(tmp / fname, format=fmt)
            plt.close(fig)
            files.append((fname, caption))
        s, L = run.stats, run.stats["llama"]
        M = s["means"]["kl_forward"]
        intro = (f"{escape(run.title)}. Mean KLD {L['kld'][0]:.6f}; SE clustered by {escape(s['cluster_by'])} "
                 f"{M['se_cluster']:.6f}, token-i.i.d. {M['se_iid']:.6f}; PPL(Q) {L['ppl_q'][0]:.4f}, PPL(base) "
                 f"{L['ppl_base'][0]:.4f}, same top p {100 * L['same_top'][0]:.3f} %. Numbers: summary.json, "
                 f"llama.txt, windows.csv; per token: tokens.npz.")
        write_index(tmp, f"Corpus run {path.resolve().name}", intro, files)
    return path / "plots" / "index.html"
