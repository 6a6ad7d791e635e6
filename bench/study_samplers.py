"""Variance of RB (and MC) under each way of drawing sequences, against i.i.d. RB's exact variance, on toy Markov
pairs at temperatures 0.4 and 1, orders 1 and 2, n from 64 to 4096; a figure of the ratio against n.

    python bench/study_samplers.py [--repeats 200] [--out results/sampler_study]
        [--samplers iid stratified sobol array array-kl 'array-kl[id order]']

For each (temperature, order, sampler, n): R independent randomizations (one unit of n sequences each, R capped so
that R·n ≤ --budget); ratio = n·Var_R(RB estimate) / exact per-sequence Var(i.i.d. RB) (DP), so i.i.d. is 1 up to
noise (relative SE of a ratio ≈ √(2/(R−1))). Also, by DP, two ceilings of what reorganising only the *first step*
can give — proportional stratification of x₁ (= sum-and-sample over every first-token prefix, sequences allocated
∝ P(x₁)) and the optimal (Neyman) allocation over x₁ — and the share of distinct sequences among n i.i.d. draws
(what sampling without replacement could remove). Draws go through sequences.sampler_rb_repeats: the same draw
sources as the engine, with the per-step KL looked up in a table (equal to the engine's estimates to 1e-15,
tests/test_samplers.py). Writes study.json and variance_ratio.png.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.toy import markov as sq  # noqa: E402

ABLATION = "array-kl[id order]"  # array-kl's row ranking with array's token-id CDF
CASES = {1: 201, 2: 51}  # order → V (order 2 at V = 51 keeps the DP tables small)


def first_step_ceilings(tb) -> dict:
    """Per-sequence variance of RB when x₁ is perfectly stratified (proportional) or Neyman-allocated, over i.i.d."""
    ex = sq.exact_values(tb)
    s0 = tb.start_state
    p1 = np.exp(tb.log_p[0, s0])
    within = np.zeros(tb.vocab_size)
    for v in range(1, tb.vocab_size):  # x₁ = EOS ends the sequence: RB is the constant K₀ there
        lp, lq = tb.log_p.copy(), tb.log_q.copy()
        lp[0, s0] = lq[0, s0] = np.where(np.arange(tb.vocab_size) == v, 0.0, -np.inf)
        within[v] = sq.exact_values(sq.MarkovTables(lp, lq, tb.order)).rbis_variance
    return dict(proportional=float(np.sum(p1 * within) / ex.rbis_variance),
                neyman=float(np.sum(p1 * np.sqrt(within)) ** 2 / ex.rbis_variance))


def distinct_share(tb, n: int, seed: int) -> float:
    from kl_estimation.llm.engine import sample_batch, sequence_proposal, unit_generator

    b = sample_batch(sq.MarkovPair(tb), sequence_proposal("P"), n, tb.shape[0], unit_generator(seed, "dup", n, "cpu"))
    return len({tuple(row[m]) for row, m in zip(b.token_ids, b.mask)}) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=200, help="randomizations per point (capped by --budget)")
    ap.add_argument("--budget", type=int, default=204800, help="at most R·n sequences per point")
    ap.add_argument("--ns", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--samplers", nargs="+", default=["iid", "stratified", "sobol", "array"])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.4, 1.0])
    ap.add_argument("--orders", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--iid-max-n", type=int, default=256, help="i.i.d. (exactly 1 in expectation) only up to this n")
    ap.add_argument("--out", default="results/sampler_study")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # a shared machine: one core is steadier than two contended ones
    from kl_estimation.core.draws import DRAWS, array_kl

    if ABLATION in args.samplers:  # not a --sampler choice: registered for this study only
        DRAWS[ABLATION] = array_kl.ArrayKLIdOrderDraws
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, cases = [], []
    for order in args.orders:
        base = sq.markov_pair("zipf", "medium", CASES[order], order, args.max_new_tokens, np.random.default_rng(0))
        for tau in args.temperatures:
            tb = sq.temper(base, tau)
            ex = sq.exact_values(tb)
            case = dict(order=order, vocab_size=CASES[order], temperature=tau, kl=ex.kl, var_rb=ex.rbis_variance,
                        var_mc=ex.is_variance, first_step=first_step_ceilings(tb),
                        distinct_share={n: distinct_share(tb, n, 0) for n in args.ns})
            cases.append(case)
            print(f"order {order} V={CASES[order]} τ={tau}: KL {ex.kl:.4f}, Var RB {ex.rbis_variance:.4g}, "
                  f"Var MC {ex.is_variance:.4g}; first-step ceilings {case['first_step']}; distinct share of n "
                  f"i.i.d. sequences {case['distinct_share']}", flush=True)
            for sampler in args.samplers:
                for n in args.ns:
                    if sampler == "iid" and n > args.iid_max_n:
                        continue
                    R = max(2, min(args.repeats, args.budget // n))
                    t0 = time.perf_counter()
                    est = sq.sampler_rb_repeats(tb, sampler, n, R, seed=1)
                    dt = time.perf_counter() - t0
                    row = dict(order=order, temperature=tau, sampler=sampler, n=n, repeats=R, seconds=dt,
                               rb_bias_in_se=float((est["RB"].mean() - ex.kl) / (est["RB"].std(ddof=1) / math.sqrt(R))),
                               ratio_rb=float(n * est["RB"].var(ddof=1) / ex.rbis_variance),
                               ratio_mc=float(n * est["MC"].var(ddof=1) / ex.rbis_variance),
                               ratio_se=math.sqrt(2 / (R - 1)))
                    rows.append(row)
                    print(f"  {sampler:>10} n={n:5d} R={R:4d}: Var RB ratio {row['ratio_rb']:.3f} "
                          f"(±{row['ratio_se'] * row['ratio_rb']:.3f}), MC/RB_iid {row['ratio_mc']:.2f}, "
                          f"mean−KL {row['rb_bias_in_se']:+.2f} SE, {dt:.1f} s", flush=True)
                    (out / "study.json").write_text(json.dumps(dict(config=vars(args), cases=cases, rows=rows),
                                                               indent=1))
    figure(rows, cases, out / "variance_ratio.png")
    print(f"wrote {out / 'study.json'} and {out / 'variance_ratio.png'}")


def figure(rows, cases, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["order"], r["temperature"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), sharey=True, squeeze=False)
    for ax, (order, tau) in zip(axes[0], keys):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["n"], r["ratio_rb"], r["ratio_se"] * r["ratio_rb"]) for r in rows
                         if r["sampler"] == sampler and r["order"] == order and r["temperature"] == tau)
            if pts:
                n, y, e = map(np.array, zip(*pts))
                ax.errorbar(n, y, yerr=e, marker="o", ms=3, capsize=2, label=f"RB · {sampler}")
        c = next(c for c in cases if c["order"] == order and c["temperature"] == tau)
        ax.axhline(c["first_step"]["proportional"], color="grey", ls=":", lw=1, label="x₁ stratified (ceiling)")
        ax.axhline(c["first_step"]["neyman"], color="grey", ls="--", lw=1, label="x₁ Neyman (ceiling)")
        ax.axhline(0.5, color="red", lw=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"order {order}, V={c['vocab_size']}, τ={tau}", fontsize=10)
        ax.set_xlabel("sequences n per randomization")
    axes[0][0].set_ylabel("n·Var(RB estimate) / Var(i.i.d. RB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("RB variance per sequence against i.i.d. RB (T = 20, zipf/medium toy pairs; red: 0.5)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
