"""Coverage of the percentile CIs of corpus mode (stats.quantile_cis: bootstrap over clusters) in simulation.

Per-token KL with a window effect, log-normal: log x = a_g + e, a_g ~ N(−5, s_a²) shared by the tokens of window g,
e ~ N(0, s_e²) — so the true quantiles are exp(−5 + z_q·√(s_a² + s_e²)) exactly. Each corpus: G windows of n scored
tokens; each quantile's 95 % interval from the cluster bootstrap (percentile and BCa), and, for contrast, from a
bootstrap that treats tokens as independent (what llama.cpp's ± assumes for the mean). Printed: the share of corpora
whose interval covers the true quantile, with its binomial SE.

    python bench/study_quantile_ci.py                       # G = 40 windows × 128 tokens, 200 corpora
    python bench/study_quantile_ci.py --iid --reps 50       # the token-i.i.d. bootstrap on the same corpora
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from scipy.stats import norm

from kl_estimation.llm.corpus.stats import QUANTILE_LEVELS, quantile_cis


def coverage(G: int, n: int, reps: int, s_a: float, s_e: float, n_resamples: int, iid: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    truth = {k: math.exp(-5 + norm.ppf(f) * math.hypot(s_a, s_e)) for k, f in QUANTILE_LEVELS.items()}
    cl = np.repeat(np.arange(G), n)
    ways = ({"tokens i.i.d., percentile": (np.arange(G * n), "percentile")} if iid else
            {"cluster, percentile": (cl, "percentile"), "cluster, BCa": (cl, "BCa")})
    hits = {w: dict.fromkeys(QUANTILE_LEVELS, 0) for w in ways}
    width = {w: dict.fromkeys(QUANTILE_LEVELS, 0.0) for w in ways}
    for _ in range(reps):
        x = np.exp(-5 + rng.normal(0, s_a, G)[:, None] + rng.normal(0, s_e, (G, n))).ravel()
        for w, (c, method) in ways.items():
            r = quantile_cis(x, c, rng, n_resamples=n_resamples, method=method)
            for k in QUANTILE_LEVELS:
                lo, hi = r[k]["ci"]
                hits[w][k] += lo <= truth[k] <= hi
                width[w][k] += (hi - lo) / truth[k] / reps
    return {w: {k: (hits[w][k] / reps, width[w][k]) for k in QUANTILE_LEVELS} for w in ways}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=128, help="scored tokens per window")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--resamples", type=int, default=300)
    ap.add_argument("--iid", action="store_true", help="the token-i.i.d. bootstrap instead (for contrast)")
    ap.add_argument("--s-window", type=float, default=0.7, help="SD of the window effect on log KL")
    ap.add_argument("--s-token", type=float, default=1.5, help="SD of the token effect on log KL")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    res = coverage(a.windows, a.tokens, a.reps, a.s_window, a.s_token, a.resamples, a.iid)
    se = math.sqrt(0.95 * 0.05 / a.reps)
    print(f"coverage of 95 % intervals, {a.reps} corpora of {a.windows} windows × {a.tokens} tokens, log KL = "
          f"window N(0, {a.s_window}²) + token N(0, {a.s_token}²); binomial SE at 0.95: {se:.3f}; "
          f"{a.resamples} resamples; {time.perf_counter() - t:.0f} s")
    print("| interval | " + " | ".join(QUANTILE_LEVELS) + " |")
    print("|---|" + "---|" * len(QUANTILE_LEVELS))
    for w, r in res.items():
        print(f"| {w} | " + " | ".join(f"{c:.3f} (width {wd:.2f})" for c, wd in r.values()) + " |")
    print("width: mean interval width relative to the true quantile")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
