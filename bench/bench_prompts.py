"""Prompt-set benchmark: sequences/s for KL over a 64-prompt set of mixed lengths.

    python bench/bench_prompts.py [--reps 4] [-T 20] [--device cpu]

Random GPT-2 models of the default pair's shape (2 layers, d=128, V=2048), temperature 1, EOS ignored so every way
makes the same number of tokens:
(a) ours: one run over the prompt set — units of every prompt packed into mixed, left-padded forward batches;
(b) the same number of single-prompt runs, one per prompt (what a loop over prompts calling the sampler does);
(c) the straightforward way (what RLHF libraries do): generate() from P over the left-padded prompt set, then one
    teacher-forced forward of P and of Q over prompt + continuation and the full-vocabulary KL at every new position.
Target: (a) faster than (b) and (c).
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bench_llm import _Tok, models, timed  # noqa: E402  (the same pair and timer as bench_llm.py)

from kl_estimation.llm.pair import TransformersPair, pad_left  # noqa: E402
from kl_estimation.llm.run.config import LLMConfig  # noqa: E402
from kl_estimation.llm.run.runner import run_experiment  # noqa: E402
from kl_estimation.training import exact_token_kl  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--reps", type=int, default=4, help="sequences per prompt")
    ap.add_argument("-T", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    p, q = models(False, device, torch.float32)
    rng = np.random.default_rng(0)
    prompt_ids = [rng.integers(1, 2048, size=rng.integers(4, 33)).tolist() for _ in range(args.prompts)]
    ids, mask = pad_left(prompt_ids)
    pair = TransformersPair(p, q, _Tok(2048), ids.to(device), mask.to(device), 1.0, None)
    m, R, T = args.prompts, args.reps, args.T
    n_seq = m * R
    cfg = LLMConfig(p_model="x", q_model="y", prompts=tuple(map(str, range(m))), n_samples=R, max_new_tokens=T,
                        temperature=1.0, proposals=("P",), batch_size=n_seq)
    print(f"random GPT-2 pair (2 layers, d=128, V=2048) on {device} ({torch.get_num_threads()} threads): {m} prompts "
          f"of 4–32 tokens × {R} sequences × T={T}")

    def ours():
        run_experiment(pair, cfg, {"p": "x", "q": "y"})

    def one_by_one():
        for i in range(m):
            single = TransformersPair(p, q, _Tok(2048), ids[i:i + 1, -len(prompt_ids[i]):].to(device),
                                      mask[i:i + 1, -len(prompt_ids[i]):].to(device), 1.0, None)
            c = LLMConfig(p_model="x", q_model="y", prompt=str(i), n_samples=R, max_new_tokens=T, temperature=1.0,
                              proposals=("P",), batch_size=R)
            run_experiment(single, c, {"p": "x", "q": "y"})

    def straightforward():
        torch.manual_seed(0)  # generate() draws from the global RNG; the benchmark owns this process
        rows = torch.arange(m).repeat_interleave(R)
        x, am = ids[rows].to(device), mask[rows].to(device)
        with torch.inference_mode():
            out = p.generate(x, attention_mask=am, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=T, min_new_tokens=T, pad_token_id=0)
            full = torch.cat([am, torch.ones(am.shape[0], T, dtype=am.dtype, device=device)], 1)
            pos = (full.cumsum(-1) - 1).clamp(min=0)
            lp = p(input_ids=out, attention_mask=full, position_ids=pos).logits[:, -T - 1:-1]
            lq = q(input_ids=out, attention_mask=full, position_ids=pos).logits[:, -T - 1:-1]
            exact_token_kl(lp, lq).sum(-1).mean()

    ours()  # warm-up
    (t_a, _), (t_b, _), (t_c, _) = timed(ours, device, 3), timed(one_by_one, device), timed(straightforward, device, 3)
    print(f"(a) ours, one run over the prompt set:    {t_a:7.3f} s  {n_seq / t_a:8.1f} sequences/s")
    print(f"(b) {m} single-prompt runs:                {t_b:7.3f} s  {n_seq / t_b:8.1f} sequences/s   "
          f"(a) is {t_b / t_a:.1f}x faster")
    print(f"(c) generate() + teacher-forced P and Q:  {t_c:7.3f} s  {n_seq / t_c:8.1f} sequences/s   "
          f"(a) is {t_c / t_a:.2f}x faster")


if __name__ == "__main__":
    main()
