"""Cost of each way of drawing sequences against i.i.d. draws (wall time per sequence, same engine, same batches),
and with --llm-variance their RB variance on the offline default LM pair.

    python bench/bench_samplers.py [--llm] [--llm-variance --units 40 --rows 64] [--invert]
        [--real P.gguf Q.gguf [--samplers iid array array-kl] [--rows 64] [-T 8] [--repeats 3]]

Timing (one thread, best of 3): a toy order-1 Markov pair (V = 201, T = 20, 64 units × 64 sequences in one batch:
the draw source's own cost shows there) and, with --llm, the offline default LM pair (built once by
default_pair.ensure(); 64 sequences, T = 20), where the forward passes dominate.

--llm-variance: for each sampler, --units independent randomizations (units) of --rows sequences from P after the
default prompt (LLMConfig: T = 20, temperature 0.4); the ratio n·Var_units(RB) / Var(i.i.d. RB), the denominator from
the spread of all i.i.d. terms (valid for independent rows), with its relative noise √(2/(units − 1)).

--real: the cost per sequence-token on the real pair (bench/real_lm.py: SmolLM2-135M-Instruct, P a Q4_1 GGUF, Q a
second GGUF), --rows sequences of -T tokens after the chat prompt at τ = 1, EOS kept; the samplers interleaved
repeat by repeat (a shared machine's load hits them alike), best and median of --repeats, ratios to the first.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.core.draws import DRAWS  # noqa: E402
from kl_estimation.llm.engine import sample_batch, sequence_proposal, unit_generator  # noqa: E402
from kl_estimation.toy import markov as sq  # noqa: E402


def timed(pair, T, units, rows, sampler, repeats):
    prop = sequence_proposal("P")
    best = []
    for rep in range(repeats):
        streams = [(unit_generator(rep, "bench", u, "cpu"), rows) for u in range(units)]
        t0 = time.perf_counter()
        sample_batch(pair, prop, units * rows, T, streams, sampler=sampler)
        best.append(time.perf_counter() - t0)
    return min(best) / (units * rows)


def report(label, pair, T, units, rows, repeats):
    base = None
    for sampler in DRAWS:
        per = timed(pair, T, units, rows, sampler, repeats)
        base = base or per
        print(f"{label}: {sampler:>10} {per * 1e6:8.1f} µs per sequence  ({per / base:.2f}× iid)", flush=True)


def invert_costs(V: int = 49_152, rows: int = 128, repeats: int = 20):
    """One step's inversion of rows × V log-probabilities (SmolLM2's vocabulary): array's id-order CDF, array-kl's
    top-k order and the full sort it replaced."""
    from kl_estimation.core.draws import invert_cdf
    from kl_estimation.core.draws.array_kl import invert_topk_cdf

    def full_sort(log_r, u):  # the straightforward way: sort the whole row by probability
        r_sorted, perm = torch.sort(log_r.double().exp(), dim=-1, descending=True, stable=True)
        cdf = r_sorted.cumsum(-1)
        j = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:], right=True).clamp(max=V - 1)
        return perm.gather(-1, j)[..., 0]

    gen = torch.Generator().manual_seed(0)
    log_r = torch.log_softmax(torch.randn(rows, V, generator=gen) * 3, -1)
    u = torch.rand(rows, generator=gen, dtype=torch.float64)
    times = {}
    for name, fn in (("id order (array)", lambda: invert_cdf(log_r, u)), ("top-64 then id (array-kl)",
                     lambda: invert_topk_cdf(log_r, u)), ("full sort (array-kl before)", lambda: full_sort(log_r, u))):
        fn()
        best = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best.append(time.perf_counter() - t0)
        times[name] = min(best)
    base = times["id order (array)"]
    for name, t in times.items():
        print(f"invert {rows} rows × V={V}: {name:>28} {t * 1e3:7.2f} ms  ({t / base:.2f}× array's)")


def real_costs(p_gguf: str, q_gguf: str, samplers, rows: int, T: int, repeats: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_lm

    tok, p, q = real_lm.load_real("q4_0", p_gguf, q_gguf)
    pair = real_lm.real_pair(tok, p, q, "chat-story", 1.0)
    prop = sequence_proposal("P")
    times = {s: [] for s in samplers}
    for rep in range(repeats + 1):  # repeat 0 warms up (allocator, caches) and is not counted
        for s in samplers:
            t0 = time.perf_counter()
            b = sample_batch(pair, prop, rows, T, [(unit_generator(rep, "bench-real", 0, "cpu"), rows)], sampler=s)
            if rep:
                times[s].append((time.perf_counter() - t0) / float(b.mask.sum()))
    base, med = min(times[samplers[0]]), float(np.median(times[samplers[0]]))
    for s, t in times.items():
        print(f"SmolLM2 pair, {rows} sequences × T={T}: {s:>10} best {min(t) * 1e3:6.2f} ms, median "
              f"{float(np.median(t)) * 1e3:6.2f} ms per sequence-token ({min(t) / base:.3f}× {samplers[0]}, "
              f"median {float(np.median(t)) / med:.3f}×)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", action="store_true", help="also the offline default LM pair (builds it once)")
    ap.add_argument("--llm-variance", action="store_true", help="only the RB variance on the default LM pair")
    ap.add_argument("--units", type=int, default=40)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--invert", action="store_true", help="only the per-step inversion cost at V = 49,152")
    ap.add_argument("--real", nargs=2, metavar=("P_GGUF", "Q_GGUF"), help="only the cost on the real SmolLM2 pair")
    ap.add_argument("--samplers", nargs="+", default=["iid", "array", "array-kl"],
                    help="with --real; the first is the baseline")
    ap.add_argument("-T", type=int, default=8, help="with --real: tokens per sequence")
    ap.add_argument("--repeats", type=int, default=3, help="with --real")
    args = ap.parse_args()
    if args.llm_variance:
        return llm_variance(args.units, args.rows)
    torch.set_num_threads(1)
    if args.invert:
        return invert_costs()
    if args.real:
        return real_costs(*args.real, args.samplers, args.rows, args.T, args.repeats)
    tb = sq.markov_pair("zipf", "medium", 201, 1, 20, np.random.default_rng(0))
    report("toy V=201 T=20, 4096 sequences per batch", sq.MarkovPair(tb), 20, 64, 64, 3)
    if args.llm:
        from kl_estimation.llm import default_pair
        from kl_estimation.llm.loading import load_transformers_pair

        p, q = default_pair.ensure(0)
        pair = load_transformers_pair(p, q, prompts="import os\n", temperature=1.0, device="cpu", dtype="float32",
                                      ignore_eos=False)
        report("default LM pair, 64 sequences per batch, T=20", pair, 20, 1, 64, 3)


def llm_variance(units: int, rows: int):
    from kl_estimation.core.estimators import rao_blackwell_is_terms
    from kl_estimation.llm import default_pair
    from kl_estimation.llm.loading import load_transformers_pair
    from kl_estimation.llm.run.config import LLMConfig

    cfg = LLMConfig()
    p, q = default_pair.ensure(0)
    pair = load_transformers_pair(p, q, prompts=cfg.prompt, temperature=cfg.temperature, device="cpu",
                                  dtype="float32", ignore_eos=False)
    prop = sequence_proposal("P")
    var_iid = None
    for sampler in DRAWS:
        est, terms, t0 = [], [], time.perf_counter()
        for u in range(units):
            b = sample_batch(pair, prop, rows, cfg.max_new_tokens, [(unit_generator(7, sampler, u, "cpu"), rows)],
                             sampler=sampler)
            g = rao_blackwell_is_terms(b.kl_step, np.zeros_like(b.log_p), b.mask)
            est.append(g.mean())
            terms.append(g)
        var_units = rows * np.var(est, ddof=1)
        if var_iid is None:  # i.i.d. first: its per-sequence variance from all units × rows terms
            var_iid = float(np.var(np.concatenate(terms), ddof=1))
        print(f"default LM pair, T={cfg.max_new_tokens}, τ={cfg.temperature}, prompt {cfg.prompt!r}: {sampler:>10} "
              f"RB {np.mean(est):.4f}, n·Var over {units} randomizations of n={rows} / Var(i.i.d. RB) = "
              f"{var_units / var_iid:.3f} (±{var_units / var_iid * np.sqrt(2 / (units - 1)):.3f}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
