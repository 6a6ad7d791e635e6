r"""Figures of an LLM run, drawn from its saved files alone (summary.json + one JSON document per proposal).

  1 estimates    every proposal × estimator: the estimate with its 95 % CI; flagged rows hollow, red and marked "!";
                 the exact KL where the run recorded one (tiny enumerable pairs), else RB from P as the reference
  2 per-step     the KL contributed at each position t — per sequence W_<t·KL(P_t‖Q_t) (W = 1 for P), averaged over a
                 proposal's sequences — with 95 % bands, and its running sum: the KL of the process truncated at t
  3 log-weights  the distribution of the sequence log-weights log P(x)/r(x) per proposal, counts on a log axis so
                 that the few sequences with huge weights — the ones that decide IS — stay visible
  4 ess          Kish ESS and distinct sequences per proposal, as a share of the sequences drawn
  5 per-prompt   (prompt sets) each prompt's estimate ± 95 % CI for every proposal's RB / RB-IS estimator

Colours: a proposal keeps its registry family's colour from the synthetic figures (plots.COLORS); P is black.

Directions: a run of the reverse direction (or of both) gets every figure once per direction, the reverse ones as
``llm_<i>_<name>_reverse.<fmt>`` drawn from the files in ``reverse/``; titles, axes and captions name the direction
(KL(Q‖P), sequences from Q, whose plain Monte Carlo row is "Q").
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.figures.synthetic import (
    COLORS,
    FORMATS,
    RunFolderError,
    _grid,
    _plt,
    _shade,
    write_index,
)
from kl_estimation.llm.engine import FORWARD, P_NAME, PREFIX_SUFFIX, SAMPLED_FROM, TARGET, sequence_proposal

LN10 = math.log(10)
MAIN_ESTIMATOR = {True: "RB", False: "RB-IS"}  # the low-variance estimator of P / of any other proposal


@dataclass
class LLMRun:
    path: Path
    summary: dict  # one direction's view: its rows, its exact KL
    docs: list[dict]  # one per proposal, in the run's order
    direction: str = FORWARD

    @property
    def target(self) -> str:
        return TARGET[self.direction]

    @property
    def sampled(self) -> str:
        return SAMPLED_FROM[self.direction]

    @property
    def config(self) -> dict:
        return self.summary.get("config", {})

    @property
    def max_new_tokens(self) -> int:
        return int(self.config.get("max_new_tokens") or max(len(r["log_p"]) for d in self.docs for r in d["sequences"]))


def run_directions(summary: dict) -> tuple:
    """The directions a run folder holds (a summary written before directions existed: forward)."""
    from kl_estimation.llm.run.directions import BOTH

    d = summary.get("config", {}).get("direction") or FORWARD
    return tuple(SAMPLED_FROM) if d == BOTH else (d,)


def _direction_view(summary: dict, direction: str) -> dict:
    """The summary as one direction's figures read it: its rows, its exact KL (a number or {direction: number})."""
    out = dict(summary, rows=[r for r in summary["rows"] if r.get("direction", FORWARD) == direction])
    for k in ("exact_kl", "exact_per_prompt"):
        if isinstance(out.get(k), dict):
            out[k] = out[k].get(direction)
    return out


def load_llm_run(path, methods=None, direction: str = FORWARD) -> LLMRun:
    from kl_estimation.llm.run.store import direction_folder, proposal_slug

    path = Path(path)
    if not path.is_dir():
        raise RunFolderError(f"{path} is not a folder (give an LLM run folder holding summary.json)")
    try:
        summary = json.loads((path / "summary.json").read_text())
        proposals = list(summary["config"]["proposals"])
        summary["rows"]  # noqa: B018 - key check
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{path / 'summary.json'} is missing, corrupt or not an LLM summary "
                             f"({type(err).__name__}: {err})") from None
    if methods:
        unknown = [m for m in methods if m not in proposals]
        if unknown:
            raise RunFolderError(f"--methods: unknown proposal {unknown[0]!r}; this run has: {', '.join(proposals)}")
        proposals = [p for p in proposals if p in methods]
    if direction not in run_directions(summary):
        raise RunFolderError(f"{path / 'summary.json'} holds no {direction} direction")
    docs = []
    for name in proposals:
        f = direction_folder(path, direction) / f"{proposal_slug(name, direction)}.json"
        try:
            doc = json.loads(f.read_text())
            doc["sequences"], doc["estimates"]  # noqa: B018 - key check
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{f} (proposal {name!r}) is missing or corrupt ({type(err).__name__}: {err})") \
                from None
        docs.append(doc)
    return LLMRun(path, _direction_view(summary, direction), docs, direction)


# ------------------------------------------------------------------------------------------------ helpers

def _family(name: str) -> str:

    return "Naive MC" if name in SAMPLED_FROM.values() else sequence_proposal(name).base.family


def _colors(names: list[str]) -> dict[str, tuple]:
    """Family colour, shaded by parameter among the run's proposals of that family (a prefix-aware variant shares
    its base's colour; the figures tell it apart by line style or label)."""
    out = {}
    bases = [n.removesuffix(PREFIX_SUFFIX) for n in names]
    for name, base in zip(names, bases):
        fam = _family(name)
        same = list(dict.fromkeys(b for b in bases if _family(b) == fam))
        out[name] = _shade(fam, same.index(base), len(same)) if fam in COLORS else (0.3, 0.3, 0.3)
    return out


ESTIMATOR_ROWS = ("RB", "RB+CV", "MC", "RB-IS", "RB-IS+CV", "IS", "SNIS", "k3", "k3-IS")  # low-variance first


def _is_p(doc) -> bool:
    return doc["proposal"] == doc.get("sampled_from", P_NAME)  # plain Monte Carlo: "Q" in reverse


def _arrays(run: LLMRun, doc) -> dict[str, np.ndarray]:
    from kl_estimation.llm.run.store import records_to_arrays

    return records_to_arrays(doc["sequences"], run.max_new_tokens)


def step_contributions(a: dict[str, np.ndarray]) -> np.ndarray:
    """(N, T): W_<t·KL(P_t‖Q_t) per sequence and step (0 after EOS); the row sums are the RB / RB-IS terms."""
    lw = np.where(a["mask"], a["log_p"] - a["log_r"], 0.0)
    prefix = np.cumsum(lw, axis=1) - lw  # log W_<t
    with np.errstate(over="ignore"):
        return np.where(a["mask"], np.exp(prefix) * a["kl_step"], 0.0)


def _mean_band(x: np.ndarray):
    n = x.shape[0]
    m = x.mean(0)
    se = x.std(0, ddof=1) / math.sqrt(n) if n > 1 else np.zeros_like(m)
    return m, m - 1.96 * se, m + 1.96 * se


def _label(name: str) -> str:
    return name.replace(" [prefix-aware]", " [pa]")


# ------------------------------------------------------------------------------------------------ figures

def fig_estimates(plt, run: LLMRun):
    names = [d["proposal"] for d in run.docs]
    colors = _colors(names)
    order = {e: i for i, e in enumerate(ESTIMATOR_ROWS)}
    rows = [r for name in names for r in sorted((r for r in run.summary["rows"] if r["proposal"] == name),
                                                key=lambda r: order.get(r["estimator"], len(order)))]
    exact = run.summary.get("exact_kl")
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.24 * len(rows)))
    y = np.arange(len(rows))
    est = np.array([np.nan if r["estimate"] is None else r["estimate"] for r in rows], dtype=float)
    lo = np.array([np.nan if r["ci_low"] is None else r["ci_low"] for r in rows], dtype=float)
    hi = np.array([np.nan if r["ci_high"] is None else r["ci_high"] for r in rows], dtype=float)
    good = np.array([not r["flag"] for r in rows]) & np.isfinite(lo) & np.isfinite(hi)
    # x-range from the unflagged intervals (and the reference): one wild row must not squash the others
    span = np.concatenate([lo[good], hi[good], [exact] if exact is not None else []])
    if span.size == 0:
        span = est[np.isfinite(est)] if np.isfinite(est).any() else np.array([0.0, 1.0])
    left, right = float(span.min()), float(span.max())
    pad = 0.15 * max(right - left, 1e-3 * max(abs(left), abs(right), 1e-12))
    left, right = left - pad, right + pad
    for i, r in enumerate(rows):
        c = colors[r["proposal"]]
        flagged = bool(r["flag"])
        if np.isfinite(lo[i]) and np.isfinite(hi[i]):
            ax.plot([max(lo[i], left), min(hi[i], right)], [i, i], color=c, lw=2.2, alpha=0.55 if flagged else 1)
            for edge, side, mark in ((lo[i], left, "◀"), (hi[i], right, "▶")):
                if (edge < side) if mark == "◀" else (edge > side):
                    ax.text(side, i, mark, color=c, ha="center", va="center", fontsize=8)
        if np.isfinite(est[i]):
            ax.plot(np.clip(est[i], left, right), i, "o", ms=6, mfc="white" if flagged else c, mec=c, mew=1.5)
    ax.set_yticks(y, [("! " if r["flag"] else "") + f"{_label(r['proposal'])} · {r['estimator']}" for r in rows],
                  fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r["flag"]:
            tick.set_color("#d62728")
    for i in range(1, len(rows)):
        if rows[i]["proposal"] != rows[i - 1]["proposal"]:
            ax.axhline(i - 0.5, color="0.6", lw=0.6)
    ax.invert_yaxis()
    ax.set_xlim(left, right)
    if exact is not None:
        ax.axvline(exact, color="#2ca02c", lw=1.5, label=f"exact KL {exact:.4g}")
        ref = "green line: the exact KL"
    else:
        rb = next((r for r in rows if r["proposal"] == run.sampled and r["estimator"] == "RB"), None)
        if rb and rb["ci_low"] is not None:
            ax.axvspan(rb["ci_low"], rb["ci_high"], color="0.85", zorder=0, label=f"RB from {run.sampled}, 95% CI")
        ref = f"grey band: RB from {run.sampled} (no exact KL for this pair)"
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"{run.target} per sequence (nats); ◀ ▶: interval runs off the axis")
    cfg = run.config
    ax.set_title(f"{run.target} {run.direction}: sequences from {run.sampled} — estimates with 95% CIs, T = "
                 f"{cfg.get('max_new_tokens')}, {cfg.get('n_samples')} sequences per proposal"
                 f"{_prompts_note(run)}\n{ref}; hollow red ! = flagged (do not trust), see summary.csv", fontsize=10)
    fig.tight_layout()
    return fig, (f"{run.target}, {run.direction} direction (sequences from {run.sampled}): every proposal × "
                 f"estimator with its 95% confidence interval; flagged rows are hollow, red and marked '!'; {ref}.")


def _step_kl(run: LLMRun) -> str:
    return "KL(P_t‖Q_t)" if run.direction == FORWARD else "KL(Q_t‖P_t)"


def _prompts_note(run: LLMRun) -> str:
    n = len(run.config.get("prompts") or [1])
    return f", {n} prompts" if n > 1 else ""


def fig_per_step(plt, run: LLMRun):
    names = [d["proposal"] for d in run.docs]
    colors = _colors(names)
    T = run.max_new_tokens
    t = np.arange(1, T + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    means, cums = [], []
    for d in run.docs:
        c = step_contributions(_arrays(run, d))
        m, lo, hi = _mean_band(c)
        cm, clo, chi = _mean_band(np.cumsum(c, axis=1))
        style = "--" if d["proposal"].endswith("[prefix-aware]") else "-"
        for ax, (mm, ll, hh) in ((a1, (m, lo, hi)), (a2, (cm, clo, chi))):
            ax.plot(t, mm, style, color=colors[d["proposal"]], lw=2 if _is_p(d) else 1.3, label=_label(d["proposal"]),
                    zorder=4 if _is_p(d) else 2)
            ax.fill_between(t, ll, hh, color=colors[d["proposal"]], alpha=0.15, lw=0)
        means.append(m)
        cums.append(cm)
    exact = run.summary.get("exact_kl")
    if exact is not None:
        a2.plot([T], [exact], "*", color="#2ca02c", ms=14, mec="black", mew=0.5, zorder=5,
                label=f"exact KL at t = T: {exact:.4g}")
    for ax, curves in ((a1, means), (a2, cums)):
        top = max(float(np.nanmax(c)) for c in curves)
        bottom = min(0.0, min(float(np.nanmin(c)) for c in curves))
        ax.set_ylim(bottom, 1.35 * top if top > 0 else 1.0)  # from the means: a wild band runs off, not the scale
        ax.set_xlabel("position t (new token)")
        ax.set_xlim(0.5, T + 0.5)
    a1.set_ylabel(f"mean of W<t · {_step_kl(run)}  (nats)")
    a1.set_title("KL contributed at each position")
    a2.set_ylabel("KL of the process truncated at t (nats)")
    a2.set_title("Running sum: KL up to position t")
    a2.legend(loc="upper left", fontsize=8)
    fig.suptitle("Where along the sequence the KL comes from — lines: mean over each proposal's sequences; bands: "
                 "95% CI; dashed: prefix-aware\nall proposals estimate the same curve (W = P/r of the prefix; "
                 "W = 1 for P): a proposal whose band is wide there is noisy there", fontsize=11)
    fig.tight_layout()
    return fig, ("Mean per-step KL contribution W<t·KL(P_t‖Q_t) along the position t, and its running sum, per "
                 "proposal with 95% bands (RB for P, RB-IS for the others, step by step).")


def fig_log_weights(plt, run: LLMRun):
    docs = [d for d in run.docs if not _is_p(d)]
    if not docs:
        return None
    colors = _colors([d["proposal"] for d in run.docs])
    rows, cols = _grid(len(docs), 4)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.9 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, d in zip(axes, docs):
        lw = np.array([r["log_weight"] for r in d["sequences"]]) / LN10
        lo, hi = float(lw.min()), float(lw.max())
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(lw, bins=40, range=(lo, hi))
        ax.stairs(counts, edges, fill=True, color=colors[d["proposal"]], alpha=0.85)
        ax.set_yscale("log")
        ax.set_ylim(0.7, max(counts.max(), 1) * 2)
        ax.axvline(0.0, color="black", lw=0.7, ls=":")
        w = np.exp(lw * LN10 - lw.max() * LN10)
        top = w.max() / w.sum()
        ax.axvline(lw.max(), color="#d62728", lw=1)
        e = d["estimates"].get("IS", {})
        khat = e.get("khat")
        ax.set_title(f"{_label(d['proposal'])}\nlargest weight: {top:.0%} of Σw; k-hat "
                     f"{'—' if khat is None or not np.isfinite(khat) else f'{khat:.2f}'}", fontsize=8,
                     color="#d62728" if top > 0.1 else "black")
        ax.set_xlabel(f"log10 w, w = {run.sampled}(x)/r(x)", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(docs):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("sequences (log)", fontsize=8)
    fig.suptitle("Sequence log-weights per proposal (counts on a log axis; red line: the largest weight; w = 1 dotted)"
                 "\nIS averages w·log P/Q: when one sequence holds a large share of Σw, that one sequence is the "
                 "estimate (red title: > 10%)", fontsize=10)
    fig.tight_layout()
    return fig, ("Distribution of the sequence log-weights log10 P(x)/r(x) per proposal (log counts, so rare huge "
                 "weights show), with the share of Σw held by the largest one and Pareto k̂.")


def distinct_share(doc) -> float:
    seqs = {(r.get("prompt", 0), tuple(r["token_ids"])) for r in doc["sequences"]}
    return len(seqs) / max(len(doc["sequences"]), 1)


def kish_share(doc) -> float:
    from kl_estimation.core.diagnostics import kish_ess

    lw = np.array([r["log_weight"] for r in doc["sequences"]])
    return float(kish_ess(lw)) / max(lw.size, 1)


def fig_ess(plt, run: LLMRun):
    names = [d["proposal"] for d in run.docs]
    colors = _colors(names)
    ess = [100 * kish_share(d) for d in run.docs]
    distinct = [100 * distinct_share(d) for d in run.docs]
    y = np.arange(len(names))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.32 * len(names)), sharey=True)
    for ax, vals, label in ((a1, ess, "Kish ESS of the sequence weights, % of sequences drawn"),
                            (a2, distinct, "distinct sequences, % of sequences drawn")):
        ax.barh(y, vals, color=[colors[n] for n in names], edgecolor="black", lw=0.3)
        for yi, v in zip(y, vals):
            ax.text(min(v, 100) + 1, yi, f"{v:.0f}%", va="center", fontsize=8)
        ax.set_xlim(0, 112)
        ax.set_xlabel(label)
    a1.set_yticks(y, [_label(n) for n in names], fontsize=8)
    a1.invert_yaxis()
    fig.suptitle("Effective sample size and distinct sequences per proposal\nESS near 100% = weights near equal "
                 f"({run.sampled}: always 100%); few distinct sequences = the proposal keeps redrawing the same text",
                 fontsize=10)
    fig.tight_layout()
    return fig, "Kish ESS of the sequence weights and the share of distinct sequences, per proposal."


def fig_per_prompt(plt, run: LLMRun):
    docs = [d for d in run.docs if d.get("per_prompt")]
    if not docs:
        return None
    prompts = run.config.get("prompts") or []
    m = len(docs[0]["per_prompt"])
    colors = _colors([d["proposal"] for d in run.docs])
    fig, ax = plt.subplots(figsize=(max(11.0, 3.5 + 0.5 * m * max(1, len(docs) / 4)), 5.5))
    width = 0.8 / len(docs)
    points = []
    for j, d in enumerate(docs):
        key = MAIN_ESTIMATOR[_is_p(d)]
        x = np.arange(m) - 0.4 + width * (j + 0.5)
        e = np.array([p["estimates"][key]["estimate"] for p in d["per_prompt"]], dtype=float)
        se = np.array([p["estimates"][key]["std_error"] for p in d["per_prompt"]], dtype=float)
        ax.errorbar(x, e, yerr=1.96 * se, fmt="D" if d["proposal"].endswith(PREFIX_SUFFIX) else "o", ms=4,
                    color=colors[d["proposal"]], capsize=2, lw=1, label=f"{_label(d['proposal'])} ({key})")
        points.append(e)
    exact = run.summary.get("exact_per_prompt")
    if exact:
        ax.plot(np.arange(m), exact, "_", color="#2ca02c", ms=18, mew=2, label="exact KL")
    pts = np.concatenate(points)
    pts = pts[np.isfinite(pts)]
    if pts.size:  # the estimates set the scale; a wide interval runs off rather than flattening the rest
        lo, hi = float(pts.min()), float(pts.max())
        pad = 0.35 * max(hi - lo, 0.05 * max(abs(hi), 1e-9))
        ax.set_ylim(min(lo - pad, 0.0) if lo - pad < 0.1 * pad else lo - pad, hi + pad)
    labels = [(prompts[i] if i < len(prompts) else str(i)) for i in range(m)]
    ax.set_xticks(np.arange(m), [f"{i}: {t[:18]}{'…' if len(t) > 18 else ''}" for i, t in enumerate(labels)],
                  rotation=35, ha="right", fontsize=7)
    ax.set_ylabel(f"{run.target} per sequence after the prompt (nats)")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax.set_title(f"Per-prompt KL: RB / RB-IS estimate ± 95% CI of each proposal, {m} prompts\nthe spread between "
                 f"prompts is what std_error_population adds to the overall standard error", fontsize=10)
    fig.tight_layout()
    return fig, "Per-prompt KL estimates (RB for P, RB-IS for other proposals) with 95% CIs, prompts side by side."


FIGURES = {"estimates": fig_estimates, "per-step": fig_per_step, "log-weights": fig_log_weights, "ess": fig_ess,
           "per-prompt": fig_per_prompt}


def draw_all(path, fmt: str = "png", methods=None) -> Path:
    """Draw every figure of the LLM run folder `path` into `path/plots/` with an index.html; returns its path.
    The figures are drawn in a temporary folder that replaces plots/ only when all succeeded."""
    if fmt not in FORMATS:
        raise RunFolderError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run = load_llm_run(path, methods)
    runs = [run] if run_directions(run.summary) == (FORWARD,) else [
        load_llm_run(path, methods, d) for d in run_directions(run.summary)]
    path = Path(path)
    plt = _plt()
    files = []
    with runio.replaced_folder(path / "plots", ".plots-") as tmp:
        for run in runs:  # a reverse direction's figures: the same ones, named …_reverse
            suffix = "" if run.direction == FORWARD else f"_{run.direction}"
            for i, (name, draw) in enumerate(FIGURES.items(), 1):
                made = draw(plt, run)
                if made is None:
                    continue
                fig, caption = made
                fname = f"llm_{i}_{name}{suffix}.{fmt}"
                fig.savefig(tmp / fname, format=fmt)
                plt.close(fig)
                tagged = i > 1 and len(runs) + (run.direction != FORWARD) > 1  # the estimates caption says it
                files.append((fname, f"[{run.target}, {run.direction}] {caption}" if tagged else caption))
        cfg = run.config
        models = run.summary.get("models", {})
        which = "; ".join(f"{r.target} {r.direction} (sequences from {r.sampled})" for r in runs)
        intro = (f"P = {escape(str(models.get('p')))}, Q = {escape(str(models.get('q')))}; {which}; T = "
                 f"{cfg.get('max_new_tokens')}, temperature {cfg.get('temperature')}, {cfg.get('n_samples')} "
                 f"sequences per proposal and prompt, seed {cfg.get('seed')}. "
                 f"{escape(run.summary.get('truncation', ''))}.")
        write_index(tmp, f"LLM run {path.resolve().name}", intro, files)
    return path / "plots" / "index.html"
