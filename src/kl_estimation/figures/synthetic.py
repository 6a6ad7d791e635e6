"""Figures of a synthetic run, drawn from its saved files alone (results.json + distributions.npz).

Per (family, divergence) pair:
  1 overlay     P (solid), Q (dashed), |log P/Q| (right axis) and every proposal r by rank, log–log, one panel per
                proposal family
  2 weights     exact distribution of the weights w = P/r under r (log-spaced bins on each proposal's own range) and
                the share of the IS second moment per bin (where the variance lives), one panel per proposal
  3 coverage    expected share of draws per vocabulary region for P and every proposal, plus where the KL lives
  4 ess         Kish ESS % and max weight per proposal, sorted
  5 scatter     exact variance vs the sample variance the run saw, per method (far below the diagonal: the heavy
                tail was never drawn), degenerate points named
  6 exact-var   exact variance relative to naive MC per method (the noise-free picture)
  7 error-vs-n  RMSE over repeats against n for naive MC, RB and the best proposals, beside the exact √(Var/n)
Across pairs:
  8 cross       heatmap of log10(exact variance / naive MC variance), methods × pairs

A method family keeps its colour in every figure; parameters are shades of it. Flagged methods (the run's saved
flags, verdicts) are drawn hatched or with an ✕ so a calm-looking degenerate proposal never looks like a winner; no
figure recomputes a threshold of its own.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from html import escape
from pathlib import Path

import numpy as np

from kl_estimation import runio
from kl_estimation.core.proposals import REGISTRY, log_ratio
from kl_estimation.core.streams import named_stream
from kl_estimation.runio import RunFolderError
from kl_estimation.synthetic.evaluation import exact_kl, exact_moments
from kl_estimation.synthetic.experiment import SyntheticResult, methods_for, sample_indices

FORMATS = ("png", "pdf", "svg")
GROUP_ORDER = ("Naive MC", "Rao-Blackwell", "Schulman", *REGISTRY)
_PALETTE = ["#000000", "#1b9e77", "#7f7f7f", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
            "#e377c2", "#bcbd22", "#17becf", "#393b79", "#b8860b", "#637939"]
COLORS = dict(zip(GROUP_ORDER, _PALETTE))
SAMPLE_SIZES = (10, 30, 100, 300, 1000, 3000)
ERROR_REPEATS = 200


Run = SyntheticResult  # a synthetic or sequence run folder, loaded (figures draw from it alone)
load_run = SyntheticResult.load


# ------------------------------------------------------------------------------------------------ helpers

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # A fixed title height switches off matplotlib's per-draw title placement, which dominates the time of
    # many-panel figures; so do minor ticks on log axes.
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.titlesize": 13, "axes.grid": True,
                         "grid.alpha": 0.3, "legend.fontsize": 8, "savefig.dpi": 90, "axes.titley": 1.0,
                         "xtick.minor.visible": False, "ytick.minor.visible": False})
    return plt


def _shade(group: str, i: int, n: int):
    """i-th of n shades of a family colour: light for the smallest parameter, full for the largest."""
    from matplotlib.colors import to_rgb

    base = np.array(to_rgb(COLORS.get(group, "#444444")))
    t = 1.0 if n <= 1 else 0.35 + 0.65 * i / (n - 1)
    return tuple(1 - t * (1 - base))


def _proposals(pair: dict, methods: set | None):
    return [m for m in pair["methods"] if m["family"] in REGISTRY and (methods is None or m["name"] in methods)]


def _grid(n: int, max_cols: int = 4):
    cols = min(max_cols, n)
    return math.ceil(n / cols), cols


def _grid_layout(fig, rows: int, hspace: float = 0.3, axes=None, wspace: float = 0.12, right: float = 0.97):
    """Fixed margins for small-multiple grids (tight_layout costs seconds on 30 log-scaled panels). Tick labels go
    on the outer panels of `axes` only (shared axes); other axes (a twin) keep theirs."""
    for ax in (fig.axes if axes is None else axes):
        ax.label_outer()
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.05, right=right, bottom=0.6 / h, top=1 - 0.95 / h, wspace=wspace, hspace=hspace)


def _title(pair):
    return f"{pair['family']} · divergence {pair['divergence']} (KL = {pair['true_kl']:.4g})"


# ------------------------------------------------------------------------------------------------ figures

def fig_overlay(plt, run: Run, key: str, methods, n_tokens: int = 300):
    pair, a = run.pair(key), run.arrays
    P, Q = a[f"{key}/P"], a[f"{key}/Q"]
    order = np.argsort(-P, kind="stable")[: min(P.size, n_tokens)]
    ranks = np.arange(1, order.size + 1)
    groups: dict[str, list] = {}
    for m in _proposals(pair, methods):
        groups.setdefault(m["family"], []).append(m)
    rows, cols = _grid(len(groups) + 1)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), sharex=True, sharey=True, squeeze=False)
    axes = axes.ravel()
    f = np.abs(log_ratio(np.log(P), np.log(Q)))[order]
    ax = axes[0]
    ax.vlines([], 0, 0, color="#d62728", lw=0.8, label="|log P/Q| (right axis)")  # legend entry only
    ax2 = ax.twinx()
    ax2.vlines(ranks, 0, f, color="#d62728", lw=0.8, alpha=0.45)
    ax2.set_ylim(0, 1.05 * max(float(f.max()), 1e-12))
    ax2.set_ylabel("|log P/Q|", color="#d62728")
    ax2.tick_params(axis="y", colors="#d62728", labelsize=8)
    ax2.grid(False)
    ax.set_zorder(ax2.get_zorder() + 1)  # P and Q above the bars
    ax.patch.set_visible(False)
    ax.set_title("P, Q and |log P/Q| by P-rank")
    for i, ax in enumerate(axes[: len(groups) + 1]):  # Q lighter beside the proposals, so their dots stand out
        ax.plot(ranks, P[order], color="black", lw=1.3, label="P", zorder=3)
        ax.plot(ranks, Q[order], color="#555555", lw=1.1 if i == 0 else 0.8, ls=(0, (4, 2)), label="Q",
                alpha=1 if i == 0 else 0.6, zorder=3 if i == 0 else 1)
    for ax, (group, ms) in zip(axes[1:], groups.items()):
        for i, m in enumerate(ms):
            ax.plot(ranks, a[f"{key}/r/{m['name']}"][order], ".", ms=3, color=_shade(group, i, len(ms)),
                    label=m["name"].removeprefix(group).strip(" ()") or group)
        ax.set_title(group)
        ax.legend(loc="lower left", ncol=1 if len(ms) < 3 else 2, markerscale=3, handlelength=1.6)
    axes[0].legend(loc="lower left", handlelength=2.2)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_ylim(P[order].min() / 1e3, 1.5)
    for ax in axes[len(groups) + 1:]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("token rank under P")
    for ax in axes[::cols]:
        ax.set_ylabel("probability")
    fig.suptitle(f"P (solid black), Q (dashed grey) and every proposal r (dots) over the {order.size} most likely "
                 f"tokens — {_title(pair)}\nshades: light = smallest parameter; dots above P get more draws than "
                 f"under P")
    _grid_layout(fig, rows, axes=list(axes), wspace=0.16, right=0.95)
    return fig, (f"P (solid), Q (dashed), |log P/Q| (red bars, right axis) and every proposal (dots) over the "
                 f"{order.size} most likely tokens (log–log), one panel per proposal family.")


def weight_bins(P: np.ndarray, r: np.ndarray, Q: np.ndarray, n_bins: int = 40):
    """Exact histogram of log10 w, w = P/r, under r over bins spanning this proposal's own weights: the share of
    draws per bin and the share of the IS second moment E_r[(w·log P/Q)²] per bin (where the variance comes from)."""
    s = (r > 0) & (P > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lw = np.log10(P[s] / r[s])
        g2 = r[s] * (P[s] / r[s] * log_ratio(np.log(P[s]), np.log(Q[s]))) ** 2
    lo, hi = float(lw.min()), float(lw.max())
    pad = max(0.05 * (hi - lo), 0.1)
    edges = np.linspace(min(lo, 0.0) - pad, max(hi, 0.0) + pad, n_bins + 1)
    # bincount, not np.histogram: its weighted sums are differences of a running total, which erase shares below
    # 1e-16 of the total, the very bins this figure exists to show
    idx = np.clip(np.searchsorted(edges, lw, side="right") - 1, 0, n_bins - 1)
    draws = np.bincount(idx, weights=r[s], minlength=n_bins)
    second = np.bincount(idx, weights=g2, minlength=n_bins)
    total = second.sum()
    return edges, draws, second / total if total > 0 and np.isfinite(total) else np.zeros_like(second)


def fig_weights(plt, run: Run, key: str, methods):
    pair, a = run.pair(key), run.arrays
    P, Q = a[f"{key}/P"], a[f"{key}/Q"]
    props = _proposals(pair, methods)
    rows, cols = _grid(len(props), 5)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.55 * rows), squeeze=False)
    axes = axes.ravel()
    for ax, m in zip(axes, props):
        edges, draws, second = weight_bins(P, a[f"{key}/r/{m['name']}"], Q)
        c = COLORS[m["family"]]
        # down to 1e-8, and further only as far as the bins that hold the variance need: rare heavy bins show,
        # bins that hold neither draws nor variance do not flatten the rest
        heavy = draws[(second >= 1e-4) & (draws > 0)]
        floor = max(min(1e-8, float(heavy.min(initial=1.0))) / 100, 1e-300)
        ax.stairs(np.maximum(draws, floor), edges, baseline=floor, fill=True, color=c, alpha=0.75,
                  hatch="//" if m["flags"] else None, label="share of draws")
        ax.stairs(np.maximum(second, floor), edges, baseline=floor, color="black", lw=1.1,
                  label="share of E[(w·log P/Q)²]")
        ax.axvline(0.0, color="black", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_ylim(floor, 3.0)
        ax.set_xlim(edges[0], edges[-1])
        ax.tick_params(labelsize=7)
        khat = "—" if m["mean_khat"] is None else f"{m['mean_khat']:.2f}"
        ev = m["exact_variance"]
        ax.set_title(f"{'! ' if m['flags'] else ''}{m['name']}\nexact var {'—' if ev is None else f'{ev:.2g}'}  ESS "
                     f"{m['mean_ess_pct']:.0f}%  k-hat {khat}", fontsize=8, color="#d62728" if m["flags"] else "black")
    axes[0].legend(loc="upper left", fontsize=6.5, framealpha=0.85)
    for ax in axes[len(props):]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols:]:
        ax.set_xlabel("log10 w", fontsize=8)
    for ax in axes[::cols]:
        ax.set_ylabel("share (log)", fontsize=8)
    fig.suptitle(f"Exact distribution of the weights w = P/r under r — {_title(pair)}\nbars: share of draws per "
                 f"bin; black line: share of the IS second moment, i.e. where the variance comes from — rare bins far "
                 f"right holding it = degenerate weights\nw = 1 dotted; each panel on its own range; titles: exact "
                 f"variance, mean Kish ESS, Pareto k-hat; red / hatched = flagged")
    h = fig.get_figheight()
    fig.subplots_adjust(left=0.05, right=0.985, bottom=0.55 / h, top=1 - 1.25 / h, wspace=0.28, hspace=0.75)
    return fig, ("Exact distribution of the importance weights per proposal under r (share of draws per log10 w "
                 "bin) and where the IS variance comes from (share of the second moment), each panel on its own "
                 "range, with exact variance, ESS and k̂.")


def _regions(V: int):
    edges = [0] + [e for e in (10, 100, 1000, 10_000, 100_000) if e < V] + [V]
    labels = [f"{lo + 1}–{hi}" for lo, hi in zip(edges[:-1], edges[1:])]
    return edges, labels


def fig_coverage(plt, run: Run, key: str, methods):
    pair, a = run.pair(key), run.arrays
    P, Q = a[f"{key}/P"], a[f"{key}/Q"]
    order = np.argsort(-P, kind="stable")
    edges, labels = _regions(P.size)
    contrib = P * np.abs(log_ratio(np.log(P), np.log(Q)))
    kl_tokens = contrib >= np.quantile(contrib, 0.9)  # the top 10 % of tokens by P·|log P/Q|
    rows = [("P", P)] + [(m["name"], a[f"{key}/r/{m['name']}"]) for m in _proposals(pair, methods)]
    data = np.array([[r[order[lo:hi]].sum() for lo, hi in zip(edges[:-1], edges[1:])] + [r[kl_tokens].sum()]
                     for _, r in rows])
    cols = [f"ranks {x}" for x in labels] + ["top-10% P·|log P/Q|\ntokens"]
    fig, ax = plt.subplots(figsize=(2.0 + 1.35 * len(cols), 1.2 + 0.28 * len(rows)))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, fontsize=8)
    ax.set_yticks(range(len(rows)), [n for n, _ in rows], fontsize=8)
    ax.grid(False)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if data[i, j] < 0.6 else "black")
    ax.axvline(len(labels) - 0.5, color="white", lw=2)
    fig.colorbar(im, ax=ax, label="expected share of draws", fraction=0.04)
    ax.set_title(f"Where each proposal puts its draws — {_title(pair)}\n"
                 f"last column: share on the 10 % of tokens carrying the most KL (P·|log P/Q|: "
                 f"{contrib[kl_tokens].sum() / contrib.sum():.0%} of Σ P|log P/Q|)")
    fig.tight_layout()
    return fig, "Share of draws per vocabulary region (by P-rank) for P and each proposal, and on the KL-heavy tokens."


def fig_ess(plt, run: Run, key: str, methods):
    pair = run.pair(key)
    props = sorted(_proposals(pair, methods), key=lambda m: -(m["mean_ess_pct"] or 0))
    names = [("! " if m["flags"] else "") + m["name"] for m in props]
    y = np.arange(len(props))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 1.2 + 0.27 * len(props)), sharey=True)
    colors = [COLORS[m["family"]] for m in props]
    hatches = ["//" if m["flags"] else None for m in props]
    for ax, vals, label in ((a1, [m["mean_ess_pct"] for m in props], "Kish ESS % of the drawn weights (mean)"),
                            (a2, [max(m["max_weight"]) for m in props], "largest weight drawn (log)")):
        bars = ax.barh(y, vals, color=colors, edgecolor="black", lw=0.3)
        for b, h in zip(bars, hatches):
            b.set_hatch(h)
        ax.set_xlabel(label)
    a1.set_yticks(y, names, fontsize=8)
    a1.invert_yaxis()
    a1.set_xlim(0, 100)
    a2.set_xscale("log")
    a2.axvline(1, color="black", lw=0.6, ls=":")
    fig.suptitle(f"Effective sample size and largest weight per proposal, sorted by ESS — {_title(pair)}\n"
                 f"! / hatched = flagged (a high ESS with a degenerate weight distribution is a warning, not a win)")
    fig.tight_layout()
    return fig, "Kish ESS % and largest drawn weight per proposal, sorted; flagged proposals hatched."


def fig_scatter(plt, run: Run, key: str, methods):
    from kl_estimation.verdicts import DEGENERATE_RATIO, Code, has

    pair = run.pair(key)
    ms = [m for m in pair["methods"] if methods is None or m["name"] in methods or m["family"] not in REGISTRY]
    pts = [m for m in ms if m["exact_variance"] is not None and m["exact_variance"] > 0
           and m["empirical_variance"] > 0]
    left_out = len(ms) - len(pts)
    fig, ax = plt.subplots(figsize=(10, 7))
    x = np.array([m["exact_variance"] for m in pts], dtype=float)
    y = np.array([m["empirical_variance"] for m in pts], dtype=float)
    finite = np.isfinite(x)
    lo = min(float(np.min(x[finite], initial=np.inf)), float(y.min(initial=np.inf))) / 3
    hi_x = float(np.max(x[finite], initial=1.0)) * 3
    hi = max(hi_x, float(y.max(initial=1.0)) * 3)
    x_shown = np.where(finite, x, hi)  # a variance beyond float64 sits at the right edge
    groups: dict[str, list] = {}
    for m in pts:
        groups.setdefault(m["family"], []).append(m["name"])
    labels, degenerate = [], []
    for m, xi, yi in zip(pts, x_shown, y):
        same = groups[m["family"]]
        c = _shade(m["family"], same.index(m["name"]), len(same))
        big = m["family"] in ("Naive MC", "Rao-Blackwell")
        ax.scatter(xi, yi, s=150 if big else 50, marker="X" if m["flags"] else ("*" if big else "o"), color=c,
                   edgecolor="#d62728" if m["flags"] else "black", lw=0.9 if m["flags"] else 0.4, zorder=3)
        if big:
            labels.append((xi, yi, m["name"], "black"))
        elif has(m["flags"], Code.SAMPLE_VAR_COLLAPSE, Code.EXACT_VAR_OVERFLOW):  # as saved: the table's verdict
            degenerate.append((xi / yi, (xi, yi, "! " + m["name"], "#d62728")))
    degenerate.sort(key=lambda t: -t[0])
    named = [d for _, d in degenerate[:MAX_NAMED]]
    _place_labels(ax, labels + named, lo, hi)
    for fam in groups:  # legend in each family's full colour (the points are shades of it)
        ax.scatter([], [], s=50, marker="*" if fam in ("Naive MC", "Rao-Blackwell") else "o", color=COLORS[fam],
                   edgecolor="black", lw=0.4, label=fam)
    ax.scatter([], [], s=50, marker="X", color="white", edgecolor="#d62728", lw=0.9, label="flagged")
    line = np.array([lo, hi])
    ax.plot(line, line, color="black", lw=0.8, label="empirical = exact")
    ax.plot(line, line / DEGENERATE_RATIO, color="#d62728", lw=0.8, ls="--",
            label=f"empirical = exact / {DEGENERATE_RATIO:g} (the verdict's threshold)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("exact variance per draw (noise-free)" + (" — ▶ right edge: beyond float64" if not finite.all()
                                                              else ""))
    ax.set_ylabel(f"sample variance per draw (mean over {run.results['config'].get('n_repeats')} repeats)")
    more = len(degenerate) - len(named)
    ax.set_title(f"Exact against observed variance — {_title(pair)}\non the diagonal the samples show the true "
                 f"noise; far below it the heavy tail was never drawn\n(the run looks calmer than it is); named: the "
                 f"{len(named)} furthest below{f' ({more} more unnamed)' if more > 0 else ''}"
                 + (f"\n{left_out} methods without an exact variance (prefix-aware) left out" if left_out else ""),
                 fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.7, bottom=0.09, top=0.85)  # fixed: labels never squeeze the axes
    return fig, ("Exact per-draw variance against the sample variance the run observed, per method (log axes): "
                 "points far below the diagonal had their heavy tail unsampled; flagged methods red ✕ and named.")


MAX_NAMED = 12  # degenerate points named in the variance scatter


def _place_labels(ax, labels, lo: float, hi: float, char: float = 0.0105, height: float = 0.03):
    """Point labels on a log–log square [lo, hi]², moved down, then up (with a leader line), until none overlap and
    all stay inside the axes: the degenerate points cluster, and their names are the message."""
    span = math.log10(hi) - math.log10(lo)
    placed = []

    def free(tx, ty, w):
        return 0.01 <= ty <= 0.97 and not any(abs(ty - py) < height and tx < px + pw and px < tx + w
                                                for px, py, pw in placed)

    for x, y, text, color in sorted(labels, key=lambda t: -t[1]):
        fx, fy = (math.log10(x) - math.log10(lo)) / span, (math.log10(y) - math.log10(lo)) / span
        tx, w = fx + 0.012, char * len(text)
        if tx + w > 0.99:
            tx = fx - 0.012 - w
        tries = [fy - k * height for k in range(40)] + [fy + k * height for k in range(1, 40)]
        ty = next((t for t in tries if free(tx, t, w)), None)
        if ty is None:
            continue
        placed.append((tx, ty, w))
        ax.annotate(text, (x, y), xytext=(tx, ty), textcoords="axes fraction", fontsize=7, color=color,
                    va="center", arrowprops=dict(arrowstyle="-", color=color, lw=0.4, alpha=0.6)
                    if abs(ty - fy) > height / 2 else None)


def fig_exact_variance(plt, run: Run, key: str, methods, clip: float = 6.0):
    pair = run.pair(key)
    by = {m["name"]: m for m in pair["methods"]}
    wanted = [n for n in pair["rankings"]["by_exact_variance"]  # the noise-free ranking: biased ones last
              if methods is None or n in methods or by[n]["family"] not in REGISTRY]
    ms = [by[n] for n in wanted if by[n]["exact_variance"] is not None]
    ratio = np.log10([max(m["exact_variance"], 1e-300) / pair["theoretical_variance"] for m in ms])
    y = np.arange(len(ms))
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.22 * len(ms)))
    shown = np.clip(ratio, -clip, clip)
    bars = ax.barh(y, shown, color=[COLORS[m["family"]] for m in ms], edgecolor="black", lw=0.3)
    for b, m, r, v in zip(bars, ms, ratio, shown):
        if m["flags"]:
            b.set_hatch("//")
            b.set_edgecolor("#d62728")
        if r != v:  # clipped: say how far it goes
            ax.text(v, b.get_y() + b.get_height() / 2, f" 10^{r:.0f} ▶", va="center", ha="left", fontsize=7)
    ax.set_yticks(y, [("! " if m["flags"] else "") + m["name"] for m in ms], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(min(-1.0, shown.min() - 0.2), clip + 1.5)
    ax.axvline(0, color="black", lw=1)
    ax.set_xlabel(f"log10(exact variance / naive MC variance), clipped at ±{clip:g}  — left of 0 beats naive MC")
    ax.set_title(f"Exact variance relative to naive MC (noise-free ranking) — {_title(pair)}\n"
                 f"hatched red = flagged (biased, degenerate weights or k-hat > 0.7); biased methods last")
    fig.tight_layout()
    return fig, "Exact per-sample variance relative to naive MC for every method, in the noise-free ranking's order."


def error_vs_n(run: Run, key: str, n_best: int = 3, sizes=SAMPLE_SIZES, repeats=ERROR_REPEATS):
    """RMSE over `repeats` fresh repeats at each n, for naive MC, RB and the best unflagged proposals by exact
    variance. The methods are rebuilt from the saved P, Q and config; the draws are new (deterministic from the
    run's seed), a few hundred thousand per pair, so this never multiplies the run time."""
    pair, a, cfg = run.pair(key), run.arrays, run.results["config"]
    P, Q = a[f"{key}/P"], a[f"{key}/Q"]
    kl = float(exact_kl(P, Q))
    flagged = {m["name"] for m in pair["methods"] if m["flags"]}
    ranked = pair["rankings"]["by_exact_variance"]
    group = {m["name"]: m["family"] for m in pair["methods"]}  # the method's group, not a name prefix
    names = [n for n in ranked if group[n] in ("Naive MC", "Rao-Blackwell")]
    names += [n for n in ranked if n not in flagged and n not in names and group[n] in REGISTRY][:n_best]
    built = {m.name: m for m in methods_for(P, Q, cfg["alpha_values"], cfg["rb_top_k"])}
    out = {}
    for name in names:
        m = built[name]
        var = exact_moments(np.exp(m.log_r), m.g)[1]
        rng = named_stream(cfg["seed"], "error-vs-n", key, name)
        rmse = [float(np.sqrt(np.mean((m.g[sample_indices(m.log_r, (repeats, n), rng)].mean(-1) - kl) ** 2)))
                for n in sizes]
        out[name] = (np.array(rmse), var)
    return out


def fig_error_vs_n(plt, run: Run, key: str, methods):
    pair = run.pair(key)
    data = error_vs_n(run, key)
    n = np.array(SAMPLE_SIZES)
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    fams = {m["name"]: m["family"] for m in pair["methods"]}
    for i, (name, (rmse, var)) in enumerate(data.items()):
        same = [k for k in data if fams[k] == fams[name]]
        c = _shade(fams[name], same.index(name), len(same))
        ax.loglog(n, rmse, "osD^v<>"[i % 7], color=c, label=name, ms=6, markeredgecolor="black", mew=0.4)
        ax.loglog(n, np.sqrt(var / n), "-", color=c, lw=1, alpha=0.8)
    ax.set_xlabel("samples n")
    ax.set_ylabel(f"RMSE over {ERROR_REPEATS} repeats")
    ax.set_title(f"Error vs sample size — {_title(pair)}\npoints: fresh repeats; lines: exact √(Var/n)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig, "RMSE against n for naive MC, RB and the best proposals by exact variance, with exact √(Var/n) lines."


def fig_cross(plt, run: Run, keys: list[str], methods):
    pairs = [run.pair(k) for k in keys]
    names = [m["name"] for m in pairs[0]["methods"] if methods is None or m["name"] in methods
             or m["family"] not in REGISTRY]
    data = np.full((len(names), len(pairs)), np.nan)
    flagged = np.zeros_like(data, dtype=bool)
    for j, p in enumerate(pairs):
        by = {m["name"]: m for m in p["methods"]}
        for i, n in enumerate(names):
            if n in by and by[n]["exact_variance"] is not None:
                data[i, j] = np.log10(max(by[n]["exact_variance"], 1e-300) / p["theoretical_variance"])
                flagged[i, j] = bool(by[n]["flags"])
    lim = max(1.0, min(np.nanmax(np.abs(data)), 6))
    fig, ax = plt.subplots(figsize=(max(7.0, 2.5 + 1.1 * len(pairs)), 1.3 + 0.27 * len(names)))
    im = ax.imshow(np.clip(data, -lim, lim), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(pairs)), [f"{p['family']}\n{p['divergence']}" for p in pairs], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.grid(False)
    for i in range(len(names)):
        for j in range(len(pairs)):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}{'!' if flagged[i, j] else ''}", ha="center", va="center",
                        fontsize=7, color="white" if abs(data[i, j]) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, label="log10(exact var / naive MC var), clipped", fraction=0.04)
    ax.set_title("Exact variance vs naive MC across families and divergences\nblue beats naive MC; ! = flagged")
    fig.tight_layout()
    return fig, "log10(exact variance / naive MC variance) for every method across all pairs (blue beats naive MC)."


PAIR_FIGURES = {
    "overlay": fig_overlay, "weights": fig_weights, "coverage": fig_coverage, "ess": fig_ess,
    "scatter": fig_scatter, "exact-variance": fig_exact_variance, "error-vs-n": fig_error_vs_n,
}
# Sequence runs (toy Markov pairs) have no single next-token distribution to overlay, bin or re-sample:
# they get the figures that read per-method numbers only.
SEQUENCE_FIGURES = ("ess", "scatter", "exact-variance")


def figure_names(run: Run) -> list[str]:
    if run.kind == "sequence":
        return [n for n in PAIR_FIGURES if n in SEQUENCE_FIGURES]
    return list(PAIR_FIGURES)


# ------------------------------------------------------------------------------------------------ driver

def select(run: Run, pairs=None, methods=None) -> tuple[list[str], set | None]:
    keys = [f"{p['family']}/{p['divergence']}" for p in run.results["pairs"]]
    if pairs:
        unknown = [k for k in pairs if k not in keys]
        if unknown:
            raise RunFolderError(f"--pairs: unknown pair {unknown[0]!r}; this run has: {', '.join(keys)}")
        keys = [k for k in keys if k in pairs]
    if methods:
        known = {m["name"] for p in run.results["pairs"] for m in p["methods"]}
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise RunFolderError(f"--methods: unknown method {unknown[0]!r}; e.g. {', '.join(sorted(known)[:4])}, …")
        methods = set(methods)
    return keys, methods


_LOADED: dict[Path, Run] = {}  # the run being drawn; forked workers inherit it instead of reloading


def _render(job):
    """Draw one figure to a file (a top-level function so a process pool can run it)."""
    path, fmt, name, key, methods, out = job
    plt = _plt()
    run = _LOADED.get(path) or load_run(path)
    if name == "cross":
        fig, caption = fig_cross(plt, run, key, methods)
    else:
        fig, caption = PAIR_FIGURES[name](plt, run, key, methods)
    fig.savefig(out, format=fmt)
    plt.close(fig)
    return caption


def draw_all(path, fmt: str = "png", pairs=None, methods=None, workers: int | None = None) -> Path:
    """Draw the figures of the run folder `path` into `path/plots/` with an index.html; returns the index path.

    `pairs` narrows the per-pair figures: only those pairs' figures are replaced, the others' are kept (the
    cross-family figure always covers every pair). Figures are drawn into a temporary folder and moved into plots/
    only when all succeeded: nothing half-written.
    """
    if fmt not in FORMATS:
        raise RunFolderError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run = load_run(path)
    keys, methods = select(run, pairs, methods)
    all_keys = [f"{p['family']}/{p['divergence']}" for p in run.results["pairs"]]
    path = Path(path)
    _LOADED.clear()
    _LOADED[path] = run
    final = path / "plots"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".plots-", dir=path))
    try:
        jobs = []
        for key in keys:
            for name in figure_names(run):
                jobs.append((path, fmt, name, key, methods, tmp / _file_name(key, name, fmt)))
        jobs.append((path, fmt, "cross", all_keys, methods, tmp / f"{CROSS_STEM}.{fmt}"))
        from kl_estimation.progress import bar as progress_bar

        workers = workers or min(len(jobs), os.cpu_count() or 1)
        _plt()  # import matplotlib once, before the workers fork
        with progress_bar(total=len(jobs), desc="figures", unit="figure") as b:  # ~15 s: not in silence
            if workers > 1:
                import multiprocessing as mp

                # a Pool, not a ProcessPoolExecutor: leaving it terminates the workers at once, so Ctrl-C does not
                # wait for every queued figure to be drawn
                with mp.get_context("fork").Pool(workers, initializer=_ignore_sigint) as pool:
                    captions = []
                    for c in pool.imap(_render, jobs):
                        captions.append(c)
                        b.update(1)
            else:
                captions = []
                for j in jobs:
                    captions.append(_render(j))
                    b.update(1)
        _merge(final, tmp, keys, fmt, {j[-1].name: c for j, c in zip(jobs, captions)}, run, all_keys)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final / "index.html"


CROSS_STEM = "cross_family_8_exact-variance"
CAPTIONS = "captions.json"  # file → caption of every figure in plots/, so a partial redraw keeps the index whole


def _file_name(key: str, name: str, fmt: str) -> str:
    return f"{key.replace('/', '_')}_{list(PAIR_FIGURES).index(name) + 1}_{name}.{fmt}"


def _ignore_sigint():
    """Workers leave Ctrl-C to the parent, which reports it in one line (a worker would print a traceback), and end
    quietly on the SIGTERM with which the parent stops them (not with the parent's SIGTERM-as-Ctrl-C handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _merge(final: Path, tmp: Path, keys, fmt: str, captions: dict, run: "Run", all_keys) -> None:
    """Move the new figures into plots/: the redrawn pairs' old figures (any format) go, the others stay."""
    final.mkdir(exist_ok=True)
    try:
        known = json.loads((final / CAPTIONS).read_text())
    except (OSError, ValueError):
        known = {}
    stems = [k.replace("/", "_") + "_" for k in keys] + [CROSS_STEM + "."]
    for old in final.iterdir():
        if old.is_file() and old.name.startswith(tuple(stems)) and old.suffix.lstrip(".") in FORMATS:
            old.unlink()
            known.pop(old.name, None)
    for f in tmp.iterdir():
        os.replace(f, final / f.name)
    known = {n: c for n, c in {**known, **captions}.items() if (final / n).exists()}
    runio.write_json(final / CAPTIONS, known)
    order = [_file_name(k, n, f) for k in all_keys for n in PAIR_FIGURES for f in FORMATS] + \
        [f"{CROSS_STEM}.{f}" for f in FORMATS]
    files = [(n, known[n]) for n in order if n in known]
    cfg = run.results.get("config", {})
    intro = (f"V = {cfg.get('vocab_size')}, n = {cfg.get('n_samples')} × {cfg.get('n_repeats')} repeats, "
             f"seed {cfg.get('seed')}. Pairs: {escape(', '.join(all_keys))}.")
    write_index(final, f"{'Sequence' if run.kind == 'sequence' else 'Synthetic'} run {run.path.name}", intro, files)


def write_index(folder: Path, title: str, intro_html: str, files) -> None:
    """index.html: every figure (file name, caption) with its caption; PDFs as links."""
    parts = ["<!doctype html><meta charset='utf-8'><title>KL estimation run — figures</title>",
             "<style>body{font-family:sans-serif;max-width:1400px;margin:auto}figure{margin:1.5em 0}"
             "img{max-width:100%;border:1px solid #ddd}figcaption{color:#333}</style>",
             f"<h1>{escape(title)}</h1>", f"<p>{intro_html}</p>"]
    for name, caption in files:
        media = (f"<a href='{escape(name)}'>{escape(name)}</a>" if name.endswith(".pdf")
                 else f"<a href='{escape(name)}'><img src='{escape(name)}' alt='{escape(caption)}'></a>")
        parts.append(f"<figure>{media}<figcaption><b>{escape(name)}</b> — {escape(caption)}</figcaption></figure>")
    tmp = folder / ".index.html.tmp"
    tmp.write_text("\n".join(parts) + "\n")
    os.replace(tmp, folder / "index.html")
