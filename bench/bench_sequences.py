"""Exact sequence-level values by DP: an order-2 pair with V = 50, T = 20 (50^20 sequences), every proposal.

    python bench/bench_sequences.py
"""
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.core.proposals import build_proposals  # noqa: E402
from kl_estimation.toy import markov as sq  # noqa: E402


def main():
    for family in ("zipf", "mixture"):
        t0 = time.perf_counter()
        tb = sq.markov_pair(family, "medium", 50, 2, 20, np.random.default_rng(0))
        t1 = time.perf_counter()
        ex_p = sq.exact_values(tb)
        props = build_proposals()
        for prop in props:
            sq.exact_values(tb, sq.proposal_table(tb, prop))
        t2 = time.perf_counter()
        print(f"{family}: order 2, V=50, T=20, tables {tb.shape} built in {t1 - t0:.2f} s; exact KL "
              f"{ex_p.kl:.6f}, Var MC {ex_p.is_variance:.4g}, Var RB {ex_p.rbis_variance:.4g}; exact IS / SNIS / "
              f"RB-IS values for P and all {len(props)} token-level proposals in {t2 - t1:.2f} s "
              f"({(t2 - t1) / (len(props) + 1) * 1000:.0f} ms each)")


if __name__ == "__main__":
    main()
