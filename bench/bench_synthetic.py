"""Synthetic benchmark: prints wall times, peak memory and the speed-up over a plain per-sample loop.

    python bench/bench_synthetic.py            # default run, large sweep, loop baseline
    python bench/bench_synthetic.py --quick    # skip the large sweep

Targets (2 cores): default run without plots ≤ 3 s; V=151,936, n=10,000 × 100 repeats, 3 families × 3 levels,
every method, no plots ≤ 60 s and ≤ 2 GB peak RSS.
"""
import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from kl_estimation.core.proposals import build_proposals  # noqa: E402
from kl_estimation.synthetic.experiment import SyntheticConfig, make_pair, run  # noqa: E402


def timed_script(args, repeats=1):
    """Best wall time of the script in a fresh interpreter, and the peak RSS (MB) of the last child."""
    best = float("inf")
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "Synthetic_tests.py"), "--no-plots", "--output-dir", out, *args],
                           check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
            best = min(best, time.perf_counter() - t)
    return best, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def plain_loop(cfg: SyntheticConfig) -> float:
    """The straightforward way: one rng.choice per sample, naive MC + IS with every proposal, Python accumulation."""
    t = time.perf_counter()
    for divergence in cfg.divergences:
        for family in cfg.families:
            pair = make_pair(family, divergence, cfg)
            P, Q = pair.P, pair.Q
            rs = [P] + [np.exp(p(np.log(P), np.log(Q))) for p in build_proposals(cfg.alpha_values)]
            rng = np.random.default_rng(0)
            for r in rs:
                r = r / r.sum()
                for _ in range(cfg.n_repeats):
                    total = 0.0
                    for _ in range(cfg.n_samples):
                        x = rng.choice(P.size, p=r)
                        total += P[x] / r[x] * np.log(P[x] / Q[x])
                    _ = total / cfg.n_samples
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the large sweep")
    quick = ap.parse_args().quick

    cfg = SyntheticConfig()
    t_default, _ = timed_script([], repeats=3)
    print(f"default run (V=3000, n=300 x 2, 3 families, medium, no plots), whole script: {t_default:.2f} s "
          f"(target <= 3 s)")

    t = time.perf_counter()
    run(cfg)
    t_ours = time.perf_counter() - t
    t_loop = plain_loop(cfg)
    print(f"same config in-process: vectorised (all methods + diagnostics) {t_ours:.3f} s, plain per-sample loop "
          f"(naive MC + IS only) {t_loop:.2f} s -> speed-up x{t_loop / t_ours:.0f}")

    if not quick:
        t_big, rss = timed_script(["--vocab-size", "151936", "--n-samples", "10000", "--n-repeats", "100",
                                   "--divergence", "all"])
        print(f"large sweep (V=151,936, n=10,000 x 100, 3 families x 3 levels, every method, no plots): "
              f"{t_big:.1f} s, peak RSS {rss:.0f} MB (targets <= 60 s, <= 2048 MB)")


if __name__ == "__main__":
    main()
