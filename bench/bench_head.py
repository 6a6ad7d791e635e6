"""Cost of the exact head plus sampled remainder (llm/head.py) against the i.i.d. sample that reaches the same SE.

    python bench/bench_head.py [--budgets 16 64 256] [--n 200] [--json out.json]
    python bench/bench_head.py --smollm2 P.gguf Q.gguf [--budgets 64] [--n 64] [--reference 512]

On the tiny enumerable GPT-2 pair of the truth grid (tests/tiny_lms.save_pair, seed 0, prompt "a b", T = 6, EOS
reachable) at temperatures 0.05, 0.2 and 0.4, and on a toy Markov pair (tests/test_near_deterministic, V = 6,
T = 5). Cost is counted in forward positions (one next-token row of P and of Q): the head pays one per expanded
prefix, a sampled sequence one per token. For each budget: the head's mass, its RB estimate and SE (from n
remainder draws), the error against the exact KL, and the i.i.d. RB sample that would reach that SE —
n_iid = Var_P(g_RB)/SE² sequences (the variance exact, by enumeration) of mean length E_P[L] — and the ratio
of its cost to the head's (budget + n × the remainder's mean length).

--smollm2: the real pair (P = SmolLM2-135M-Instruct Q4_1, Q = its Q4_0, bench/real_lm.py), the chat prompt
"chat-sky" at τ = 0.2 and 0.4, T = 16: the head's estimate, its SE and the mass enumerated against an i.i.d. RB
reference of --reference sequences (no exact value exists there).
"""
import argparse
import dataclasses
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from kl_estimation import runio  # noqa: E402
from kl_estimation.llm import engine, enumeration  # noqa: E402
from kl_estimation.llm import head as hd  # noqa: E402
from kl_estimation.toy import markov as sq  # noqa: E402

TEMPERATURES = (0.05, 0.2, 0.4)
P = engine.sequence_proposal("P")


def exact_rb(pair, T):
    """KL, Var_P(g_RB) per sequence and E_P[L] by enumeration."""
    leaves = enumeration.enumerate_sequences(pair, P, T)
    p = np.exp(leaves["log_p"])
    kl = leaves["kl"]
    var = max(float(np.sum(p * leaves["rb"] ** 2) - kl * kl), 0.0)
    plain = engine.sample_batch(pair, P, 4000, T, engine.unit_generator(0, "length", 0, "cpu"))
    return kl, var, float(plain.mask.sum(1).mean())


def cell(name, pair, T, budget, n, seed=1):
    kl, var, length = exact_rb(pair, T)
    head = hd.search_head(pair, P, T, budget=budget, eps=0.0)
    b = engine.sample_batch(pair, P, n, T, engine.unit_generator(seed, "remainder", 0, "cpu"), exclude=head)
    e = hd.head_estimates(head, b, True)["RB"]
    cost = head.forwards + float(b.mask.sum())
    n_iid = var / e["std_error"] ** 2 if e["std_error"] > 0 else math.inf
    return dict(pair=name, T=T, budget=budget, n=n, kl=kl, head_mass=head.mass, remainder=math.exp(head.log_remainder),
                forwards=head.forwards, estimate=e["estimate"], std_error=e["std_error"],
                z=(e["estimate"] - kl) / e["std_error"], informative=bool(e["se_informative"]),
                n_distinct=int(e["n_distinct"]), cost=cost, iid_variance=var, iid_mean_length=length,
                iid_sequences=n_iid, iid_cost=n_iid * length, ratio=n_iid * length / cost)


def smollm2(p_gguf, q_gguf, budgets, n, reference, T=16):
    import time

    from bench import real_lm

    from kl_estimation.core.estimators import sequence_estimates

    (tok, p), q = real_lm.load_gguf(p_gguf), real_lm.load_gguf(q_gguf)[1]
    cells = []
    for tau in (0.2, 0.4):
        pair = real_lm.real_pair(tok, p, q, "chat-sky", tau)
        t0 = time.perf_counter()
        b = engine.sample_batch(pair, P, reference, T, engine.unit_generator(0, "reference", 0, "cpu"))
        ref = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, True)
        t_ref = time.perf_counter() - t0
        for budget in budgets:
            t0 = time.perf_counter()
            head = hd.search_head(pair, P, T, budget=budget)
            r = engine.sample_batch(pair, P, n, T, engine.unit_generator(1, "remainder", 0, "cpu"), exclude=head)
            e = hd.head_estimates(head, r, True)
            cells.append(dict(tau=tau, T=T, budget=budget, n=n, head_mass=head.mass, top=head.top,
                              head_rb=e["RB"]["estimate"], head_rb_se=e["RB"]["std_error"],
                              head_rbcv=e["RB+CV"]["estimate"], head_rbcv_se=e["RB+CV"]["std_error"],
                              informative=bool(e["RB"]["se_informative"]), head_seconds=time.perf_counter() - t0,
                              iid_rb=ref["RB"]["estimate"], iid_rb_se=ref["RB"]["std_error"], iid_n=reference,
                              iid_modal_share=ref["RB"]["modal_share"], iid_seconds=t_ref,
                              iid_variance=ref["RB"]["variance"]))
            c = cells[-1]
            print(f"τ={tau} T={T} budget={budget}: head mass {c['head_mass']:.4f} (top sequence {c['top']:.3f}), "
                  f"RB {c['head_rb']:.5g} ± {c['head_rb_se']:.2g} (informative {c['informative']}, "
                  f"{c['head_seconds']:.0f} s) vs i.i.d. RB {c['iid_rb']:.5g} ± {c['iid_rb_se']:.2g} "
                  f"(n={reference}, modal share {c['iid_modal_share']:.2f}, {t_ref:.0f} s); i.i.d. sequences for the "
                  f"head's SE: {c['iid_variance'] / c['head_rb_se'] ** 2:.3g}", flush=True)
    return cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budgets", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--n", type=int, default=200, help="remainder sequences per cell")
    ap.add_argument("--json", help="write the cells here")
    ap.add_argument("--smollm2", nargs=2, metavar=("P_GGUF", "Q_GGUF"), help="the real pair instead")
    ap.add_argument("--reference", type=int, default=512, help="--smollm2: i.i.d. reference sequences")
    args = ap.parse_args(argv)
    if args.smollm2:
        torch.set_num_threads(1)
        cells = smollm2(*args.smollm2, args.budgets, args.n, args.reference)
        if args.json:
            runio.write_json(Path(args.json), dict(cells=cells, versions=runio.versions("torch", "transformers"),
                                                   config=vars(args)))
        return
    from kl_estimation.llm.loading import load_transformers_pair
    from test_near_deterministic import near_deterministic_pair
    from tiny_lms import save_pair

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        base = load_transformers_pair(*save_pair(Path(d), seed=0), prompts="a b", temperature=1.0)
    pairs = [(f"tiny GPT-2 τ={t}", dataclasses.replace(base, temperature=t), 6) for t in TEMPERATURES]
    pairs += [(f"Markov τ={t}", sq.MarkovPair(sq.temper(near_deterministic_pair(3, 0.5, V=6, T=5), t)), 5)
              for t in TEMPERATURES]
    cells = [cell(name, pair, T, budget, args.n) for name, pair, T in pairs for budget in args.budgets]
    print(f"{'pair':<20}{'budget':>7}{'head mass':>14}{'RB':>13}{'SE':>10}{'z':>10}{'info':>5}{'cost':>8}"
          f"{'iid seqs':>11}{'iid cost':>11}{'ratio':>9}")
    for c in cells:
        print(f"{c['pair']:<20}{c['budget']:>7}{c['head_mass']:>14.10f}{c['estimate']:>13.8g}{c['std_error']:>10.2g} "
              f"{c['z']:>10.3g}{'yes' if c['informative'] else 'no':>5}{c['cost']:>8.0f}{c['iid_sequences']:>11.3g}"
              f"{c['iid_cost']:>11.3g}{c['ratio']:>9.3g}")
    if args.json:
        runio.write_json(Path(args.json), dict(cells=cells, versions=runio.versions("torch", "transformers"),
                                         config=vars(args)))


if __name__ == "__main__":
    main()
