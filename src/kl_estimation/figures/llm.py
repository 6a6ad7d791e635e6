r"""Figures of an LLM run, drawn from its saved files alone (summary.json + one JSON document per proposal).

  1 estimates    every proposal × estimator: the estimate with its 95 % CI; flagged rows hollow, red and marked "!";
                 the recommended row starred; the exact KL where the run recorded one (tiny enumerable pairs), else RB
                 from P as the reference
  2 per-step     the KL contributed at each position t — per sequence W_<t·KL(P_t‖Q_t) (W = 1 for P), averaged over a
                 proposal's sequences — with 95 % bands, and its running sum: the KL of the process truncated at t
  3 log-weights  the distribution of the sequence log-weights log P(x)/r(x) per proposal, counts on a log axis so
                 that the few sequences with huge weights — the ones that decide IS — stay visible; a red title = the
                 run's saved flags mark that proposal's weights
  4 ess          Kish ESS (as saved in the summary: per prompt, averaged over prompts) and distinct sequences per
                 proposal, both as a percentage of the sequences drawn
  5 per-prompt   (prompt sets) each prompt's estimate ± 95 % CI for every proposal's RB / RB-IS estimator; flagged
                 estimates hollow and red, each prompt's recommended one starred

Every verdict shown (flags, the recommendation) is read from the run's summary.json — never recomputed here, so the
figures and the table always agree. Proposals are known by their saved identities (summary "proposals": key, label,
family); a run folder written before those were saved is read by parsing its names.
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
from kl_estimation.core.estimators import Z95
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.proposals import (
    FORWARD,
    P_KEY,
    P_NAME,
    SAMPLED_FROM,
    TARGET,
    proposal_label,
    sequence_proposal,
)
from kl_estimation.core.results import Row
from kl_estimation.figures.synthetic import (
    COLORS,
    FORMATS,
    RunFolderError,
    _grid,
    _plt,
    _shade,
    write_index,
)

LN10 = math.log(10)
MAIN_ESTIMATOR = {True: Estimator.RB, False: Estimator.RB_IS}  # the low-variance estimator of P / of any other


@dataclass
class LLMRun:
    path: Path
    summary: dict  # one direction's view: its rows, its exact KL
    docs: list[dict]  # one per proposal, in the run's order
    proposals: list[dict] = None  # their identities (key, label as this direction names it, family, …)
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
    records = summary.get("proposals") or [_record(name) for name in proposals]
    if methods:
        keys = {}
        for m in methods:
            try:
                keys[_record(m)["key"]] = m
            except ValueError:
                keys[m] = m
        unknown = [m for k, m in keys.items() if k not in {r["key"] for r in records}]
        if unknown:
            raise RunFolderError(f"--methods: unknown proposal {unknown[0]!r}; this run has: "
                                 f"{', '.join(r['label'] for r in records)}")
        records = [r for r in records if r["key"] in keys]
    if direction not in run_directions(summary):
        raise RunFolderError(f"{path / 'summary.json'} holds no {direction} direction")
    records = [dict(r, label=proposal_label(r["label"], direction)) for r in records]  # plain MC is Q in reverse
    docs = []
    for rec in records:
        f = direction_folder(path, direction) / f"{proposal_slug(rec['key'], direction)}.json"
        try:
            doc = json.loads(f.read_text())
            doc["sequences"], doc["estimates"]  # noqa: B018 - key check
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise RunFolderError(f"{f} (proposal {rec['label']!r}) is missing or corrupt ({type(err).__name__}: "
                                 f"{err})") from None
        doc["proposal"] = rec["label"]
        doc.setdefault("proposal_key", rec["key"])
        docs.append(doc)
    return LLMRun(path, _direction_view(summary, direction), docs, records, direction)


def _record(name) -> dict:
    """The identity of a proposal named in an older run folder (before summary.json kept them)."""
    return sequence_proposal(name).record()


# ------------------------------------------------------------------------------------------------ helpers

def _colors(run: "LLMRun") -> dict[str, tuple]:
    """Label → family colour, shaded by parameter among the run's proposals of that family (a prefix-aware variant
    shares its base's colour; the figures tell it apart by line style or label)."""
    out = {}
    recs = run.proposals
    fams = ["Naive MC" if r["family"] == P_NAME else r["family"] for r in recs]
    bases = [(f, r.get("param")) for f, r in zip(fams, recs)]
    for r, fam, base in zip(recs, fams, bases):
        same = list(dict.fromkeys(b for b in bases if b[0] == fam))
        out[r["label"]] = _shade(fam, same.index(base), len(same)) if fam in COLORS else (0.3, 0.3, 0.3)
    return out


def _is_prefix_aware(run: "LLMRun", label: str) -> bool:
    return any(r["label"] == label and r.get("prefix_aware") for r in run.proposals)


def _rows_of(run: "LLMRun", label: str, prompt: int | None = None) -> list[dict]:
    """The saved verdict rows of one proposal (overall, or at one prompt of a prompt set)."""
    rows = run.summary["rows"] if prompt is None else run.summary["per_prompt"][prompt]["rows"]
    return [r for r in rows if r["proposal"] == label]


WEIGHT_CODES = ("TOP_SHARE", "KHAT", "WEIGHT_IDENTITY", "SAMPLE_VAR_COLLAPSE")


E = Estimator
ESTIMATOR_ROWS = (E.RB, E.RB_CV, E.MC, E.RB_IS, E.RB_IS_CV, E.IS, E.SNIS, E.K3, E.K3_IS)  # low-variance first


def _is_p(doc) -> bool:
    return sequence_proposal(doc.get("proposal_key") or doc["proposal"]).key == P_KEY


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
    return m, m - Z95 * se, m + Z95 * se


def _label(name: str) -> str:
    return name.replace(" [prefix-aware]", " [pa]")


# ------------------------------------------------------------------------------------------------ figures

def fig_estimates(plt, run: LLMRun):
    names = [d["proposal"] for d in run.docs]
    colors = _colors(run)
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
            if r.get("recommended"):
                ax.plot(np.clip(est[i], left, right), i, "*", ms=15, color="#ffbf00", mec="black", mew=0.6,
                        zorder=5, label="recommended")
    ax.set_yticks(y, [("★ " if r.get("recommended") else "! " if r["flag"] else "")
                      + f"{_label(r['proposal'])} · {r['estimator']}" for r in rows], fontsize=8)
    for tick, r in zip(ax.get_yticklabels(), rows):
        if r["flag"]:
            tick.set_color("#d62728")
        if r.get("recommended"):
            tick.set_fontweight("bold")
    for i in range(1, len(rows)):
        if rows[i]["proposal"] != rows[i - 1]["proposal"]:
            ax.axhline(i - 0.5, color="0.6", lw=0.6)
    ax.invert_yaxis()
    ax.set_xlim(left, right)
    if exact is not None:
        ax.axvline(exact, color="#2ca02c", lw=1.5, label=f"exact KL {exact:.4g}")
        ref = "green line: the exact KL"
    else:
        rb = next((r for r in rows if r["proposal"] == run.sampled and r["estimator"] == Estimator.RB), None)
        if rb and rb["ci_low"] is not None:
            ax.axvspan(rb["ci_low"], rb["ci_high"], color="0.85", zorder=0, label=f"RB from {run.sampled}, 95% CI")
        ref = f"grey band: RB from {run.sampled} (no exact KL for this pair)"
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"{run.target} per sequence (nats); ◀ ▶: interval runs off the axis")
    cfg = run.config
    ax.set_title(f"{run.target} {run.direction}: sequences from {run.sampled} — estimates with 95% CIs, T = "
                 f"{cfg.get('max_new_tokens')}, {cfg.get('n_samples')} sequences per proposal"
                 f"{_prompts_note(run)}\n{ref}\nhollow red ! = flagged (do not trust; codes in summary.csv), "
                 f"★ = recommended", fontsize=10)
    fig.tight_layout()
    return fig, (f"{run.target}, {run.direction} direction (sequences from {run.sampled}): every proposal × "
                 f"estimator with its 95% confidence interval; flagged rows are hollow, red and marked '!'; the "
                 f"recommended row is starred (★); {ref}.")


def _step_kl(run: LLMRun) -> str:
    return "KL(P_t‖Q_t)" if run.direction == FORWARD else "KL(Q_t‖P_t)"


def _prompts_note(run: LLMRun) -> str:
    n = len(run.config.get("prompts") or [1])
    return f", {n} prompts" if n > 1 else ""


def fig_per_step(plt, run: LLMRun):
    colors = _colors(run)
    T = run.max_new_tokens
    t = np.arange(1, T + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5))
    means, cums = [], []
    for d in run.docs:
        c = step_contributions(_arrays(run, d))
        m, lo, hi = _mean_band(c)
        cm, clo, chi = _mean_band(np.cumsum(c, axis=1))
        style = "--" if _is_prefix_aware(run, d["proposal"]) else "-"
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


def _weight_flags(run: LLMRun, label: str) -> list[str]:
    """The saved flag codes of a proposal's rows that concern its weights (the same verdict as the table's)."""
    found = []
    for r in _rows_of(run, label):
        for c in filter(None, (r.get("flag") or "").split(",")):
            if c in WEIGHT_CODES and c not in found:
                found.append(c)
    return found


def fig_log_weights(plt, run: LLMRun):
    docs = [d for d in run.docs if not _is_p(d)]
    if not docs:
        return None
    colors = _colors(run)
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
        ax.axvline(lw.max(), color="#d62728", lw=1)
        e = d["estimates"].get(Estimator.IS, {})
        khat, share, where = e.get("khat"), e.get("top_weight_share"), ""
        if share is None and d.get("per_prompt"):  # a prompt set: weights are compared within a prompt only
            shares = [p["estimates"][Estimator.IS].get("top_weight_share") for p in d["per_prompt"]]
            share, where = max((s for s in shares if s is not None), default=None), " at a prompt"
        flagged = _weight_flags(run, d["proposal"])
        ax.set_title(f"{'! ' if flagged else ''}{_label(d['proposal'])}\nlargest weight: "
                     f"{'—' if share is None else f'{share:.0%}'} of Σw{where}; k-hat "
                     f"{'—' if khat is None or not np.isfinite(khat) else f'{khat:.2f}'}"
                     + (f"\nflagged: {', '.join(flagged)}" if flagged else ""), fontsize=8,
                     color="#d62728" if flagged else "black")
        ax.set_xlabel(f"log10 w, w = {run.sampled}(x)/r(x)", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(docs):]:
        ax.set_visible(False)
    for ax in axes[::cols]:
        ax.set_ylabel("sequences (log)", fontsize=8)
    fig.suptitle("Sequence log-weights per proposal (counts on a log axis; red line: the largest weight; w = 1 dotted)"
                 "\nIS averages w·log P/Q: when one sequence holds a large share of Σw, that one sequence is the "
                 "estimate (red title: the run's flags mark these weights, as in the table)", fontsize=10)
    fig.tight_layout()
    return fig, ("Distribution of the sequence log-weights log10 P(x)/r(x) per proposal (log counts, so rare huge "
                 "weights show), with the share of Σw held by the largest one and Pareto k̂; a red title names the "
                 "run's saved weight flags (the same as the table's).")


def distinct_share(doc) -> float:
    seqs = {(r.get("prompt", 0), tuple(r["token_ids"])) for r in doc["sequences"]}
    return len(seqs) / max(len(doc["sequences"]), 1)


def ess_pct(run: LLMRun, doc) -> float:
    """Kish ESS as a percentage of the sequences drawn, as saved in the run's rows (for a prompt set: each prompt's
    ESS, summed over the prompts, over all sequences — the mean share over prompts; weights of different prompts
    are never pooled). The table shows the same number."""
    rows = _rows_of(run, doc["proposal"])
    r = next((r for r in rows if r.get("ess") is not None and r.get("n")), None)
    if r is not None:
        return 100.0 * r["ess"] / r["n"]
    e = next(iter(doc["estimates"].values()))
    return 100.0 * e["ess"] / max(e.get("n") or len(doc["sequences"]), 1)


def fig_ess(plt, run: LLMRun):
    names = [d["proposal"] for d in run.docs]
    colors = _colors(run)
    ess = [ess_pct(run, d) for d in run.docs]
    distinct = [100 * distinct_share(d) for d in run.docs]
    y = np.arange(len(names))
    many = len(run.config.get("prompts") or [1]) > 1
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 1.4 + 0.32 * len(names)), sharey=True)
    for ax, vals, label in ((a1, ess, "Kish ESS of the sequence weights, % of sequences drawn"
                                      + (" (per prompt, averaged)" if many else "")),
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
    return fig, ("Kish ESS of the sequence weights (as in the table: % of the sequences drawn"
                 + (", each prompt's ESS averaged over the prompts" if many else "") + ") and the share of distinct "
                 "sequences, per proposal.")


def fig_per_prompt(plt, run: LLMRun):
    docs = [d for d in run.docs if d.get("per_prompt")]
    if not docs:
        return None
    prompts = run.config.get("prompts") or []
    m = len(docs[0]["per_prompt"])
    colors = _colors(run)
    judged = run.summary.get("per_prompt") or []
    fig, ax = plt.subplots(figsize=(max(11.0, 3.5 + 0.5 * m * max(1, len(docs) / 4)), 5.5))
    width = 0.8 / len(docs)
    points = []
    for j, d in enumerate(docs):
        key = MAIN_ESTIMATOR[_is_p(d)]
        x = np.arange(m) - 0.4 + width * (j + 0.5)
        e = np.array([p["estimates"][key]["estimate"] for p in d["per_prompt"]], dtype=float)
        se = np.array([p["estimates"][key]["std_error"] for p in d["per_prompt"]], dtype=float)
        verdict = [next((r for r in judged[i]["rows"] if r["proposal"] == d["proposal"] and r["estimator"] == key),
                        {}) if i < len(judged) else {} for i in range(m)]
        flagged = np.array([bool(v.get("flag")) for v in verdict])
        c = colors[d["proposal"]]
        fmt = "D" if _is_prefix_aware(run, d["proposal"]) else "o"
        ax.errorbar(x, e, yerr=Z95 * se, fmt="none", ecolor=c, capsize=2, lw=1)
        ax.plot(x[~flagged], e[~flagged], fmt, ms=4, color=c, label=f"{_label(d['proposal'])} ({key})")
        if flagged.any():
            ax.plot(x[flagged], e[flagged], fmt, ms=6, mfc="white", mec="#d62728", mew=1.3)
        for i, p in enumerate(judged[:m]):  # each prompt's recommended estimate (whichever estimator) at its proposal
            rec = p.get("recommended")
            if rec and rec.get("proposal") == d["proposal"]:
                ax.plot(x[i], rec["estimate"], "*", ms=13, color="#ffbf00", mec="black", mew=0.6, zorder=5)
        points.append(e)
    ax.plot([], [], "o", ms=6, mfc="white", mec="#d62728", mew=1.3, label="flagged (hollow red)")
    ax.plot([], [], "*", ms=11, color="#ffbf00", mec="black", mew=0.6, label="recommended at the prompt\n(its own "
                                                                               "estimator)")
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
    ax.set_title(f"Per-prompt KL: RB / RB-IS estimate ± 95% CI of each proposal, {m} prompts\nhollow red = flagged "
                 f"at that prompt, ★ = recommended there; the spread between prompts is what std_error_population "
                 f"adds", fontsize=10)
    fig.tight_layout()
    return fig, ("Per-prompt KL estimates (RB for P, RB-IS for other proposals) with 95% CIs, prompts side by side; "
                 "estimates flagged at a prompt are hollow and red, each prompt's recommended estimate starred.")


def recommendation_text(run: LLMRun) -> str:
    """The saved recommendation, as the console says it (report.recommendation_block: one line, or for a prompt
    set one short line per prompt and the overall one)."""
    from kl_estimation.report import recommendation_block

    def row(r):
        return r and Row.from_dict(r)

    s = run.summary  # saved rows read back as Rows (old folders' {code, message} flags included)
    view = dict(s, recommended=row(s.get("recommended")),
                per_prompt=[dict(p, recommended=row(p.get("recommended"))) for p in s.get("per_prompt") or []])
    return recommendation_block(view, columns=10_000)


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
                 f"{escape(run.summary.get('truncation', ''))}.</p>"
                 f"<p class='recommended'><b>{'<br>'.join(map(escape, recommendation_text(run).splitlines()))}</b>")
        write_index(tmp, f"LLM run {path.resolve().name}", intro, files)
    return path / "plots" / "index.html"


# ------------------------------------------------------------------------------------ several candidates, one P

def fig_candidates(plt, comp: dict):
    """KL(P‖Q) of every candidate (plain Monte Carlo from P, the compared estimator) with its 95 % CI, against its
    position in the order given (a checkpoint series), and each candidate minus the closest with its paired CI."""
    rows, vs = comp["table"], comp["vs_best"]
    x = np.arange(1, len(rows) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, ys, what in ((axes[0], rows, "KL(P‖Q), nats per sequence"),
                         (axes[1], [v or {"estimate": 0.0, "ci_low": 0.0, "ci_high": 0.0} for v in vs],
                          "candidate − closest (paired), nats per sequence")):
        y = np.array([r["estimate"] for r in ys], dtype=float)
        lo = np.array([r["ci_low"] for r in ys], dtype=float)
        hi = np.array([r["ci_high"] for r in ys], dtype=float)
        err = np.abs(np.vstack([y - lo, hi - y]))
        ax.errorbar(x, y, yerr=np.nan_to_num(err), fmt="o-", color="#1f77b4", ecolor="0.45", capsize=3, ms=5,
                    lw=0.8, label="estimate, 95 % CI")
        flagged = [i for i, r in enumerate(rows) if r.get("flag")]
        if flagged and ys is rows:
            ax.plot(x[flagged], y[flagged], "x", color="#d62728", ms=9, label="flagged")
        if ys is not rows:
            ax.axhline(0.0, color="0.6", lw=0.8)
        ax.set_xticks(x, [r["candidate"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel("candidate (in the order given)")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    cfg = comp["config"]
    est = rows[0].get("estimator", "")
    fig.suptitle(f"{len(rows)} candidates against one P: {cfg.get('n_samples')} sequences of P per prompt shared by "
                 f"all ({est}), T = {cfg.get('max_new_tokens')}, temperature {cfg.get('temperature')}", fontsize=10)
    fig.tight_layout()
    return fig, (f"KL(P‖Q) of each candidate ({est} from one set of sequences of P) with 95 % CIs, in the order "
                 f"given; right: each minus the closest, paired on the same sequences.")


def candidates_figure(comparison, path) -> Path:
    """The figure of a comparison of candidates (a KLComparison, or its folder) at `path`."""
    comp = comparison.to_dict() if hasattr(comparison, "to_dict") else json.loads(
        (Path(comparison) / "comparison.json").read_text())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    fig, _ = fig_candidates(plt, comp)
    fig.savefig(path, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
