"""LLM sampler benchmark: R sequences of T tokens from two random GPT-2 models of the default pair's shape.

    python bench/bench_llm.py                          # CPU: (a) plain loop, (b) our sampler, (c) generate()
    python bench/bench_llm.py --device cuda --qwen05b  # GPU: tokens/s for a random Qwen2-0.5B-shaped pair in bf16

(a) the straightforward way: one sequence at a time, no KV cache, both models re-run over the whole prefix each step;
(b) our sampler: batched, KV-cached, both models every step, exact per-step KL, for proposal P and Geometric β=0.5;
(c) transformers' generate() sampling from P alone (no Q, no KL): the floor for any sampler.
Targets: (b) ≥ 30× faster than (a); (b) ≤ 2.5× (c).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.engine import sample_batch, sequence_proposal, unit_generator as batch_generator  # noqa: E402
from kl_estimation.models import TransformersPair, tempered_log_softmax  # noqa: E402


def models(qwen: bool, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    out = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if qwen:
                cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048)
                m = Qwen2ForCausalLM(cfg)
            else:
                m = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=128, n_embd=128, n_layer=2, n_head=4))
        out.append(m.to(device=device, dtype=dtype).eval())
    return out


class _Tok:
    def __init__(self, V):
        self.V = V

    def __len__(self):
        return self.V

    def decode(self, ids):
        return ""


def plain_loop(p, q, prompt, R, T, temperature, V):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(R):
            ids = prompt[None]
            for _ in range(T):
                lp = tempered_log_softmax(p(ids).logits[:, -1], temperature, V)
                lq = tempered_log_softmax(q(ids).logits[:, -1], temperature, V)
                _ = (lp.exp() * (lp - lq)).sum()
                x = torch.multinomial(lp.exp(), 1, generator=g)
                ids = torch.cat([ids, x], dim=1)


def timed(fn, device, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qwen05b", action="store_true", help="a random Qwen2-0.5B-shaped pair in bf16 (GPU)")
    ap.add_argument("-R", type=int, default=256)
    ap.add_argument("-T", type=int, default=20)
    ap.add_argument("--skip-loop", action="store_true", help="skip (a), the slow per-sequence loop")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.qwen05b else torch.float32
    p, q = models(args.qwen05b, device, dtype)
    V = p.config.vocab_size
    prompt = torch.arange(1, 7, device=device)
    pair = TransformersPair(p, q, _Tok(V), prompt[None], torch.ones_like(prompt)[None], 0.4, None)  # EOS ignored: every run makes R·T tokens
    R, T = args.R, args.T
    toks = R * T
    label = "random Qwen2-0.5B-shaped pair, bf16" if args.qwen05b else "random GPT-2 pair (2 layers, d=128, V=2048)"
    print(f"{label}, R={R} sequences x T={T} tokens on {device} ({torch.get_num_threads()} CPU threads)")

    sample_batch(pair, sequence_proposal("P"), 8, 4, batch_generator(0, "P", 0, device))  # warm-up
    t_p = timed(lambda: sample_batch(pair, sequence_proposal("P"), R, T, batch_generator(0, "P", 0, device)), device, 3)
    geo = sequence_proposal("Geometric (β=0.5)")
    t_geo = timed(lambda: sample_batch(pair, geo, R, T, batch_generator(0, geo.name, 0, device)), device, 3)

    def generate():
        torch.manual_seed(0)  # generate() draws from the global RNG; the benchmark owns this process
        with torch.inference_mode():
            p.generate(prompt[None].expand(R, -1), do_sample=True, temperature=0.4, top_k=0, top_p=1.0,
                       max_new_tokens=T, min_new_tokens=T, pad_token_id=0, attention_mask=torch.ones(
                           R, prompt.numel(), dtype=torch.long, device=device))
    t_gen = timed(generate, device, 3)
    print(f"(b) our sampler, proposal P:            {t_p:7.3f} s  {toks / t_p:10.0f} tokens/s   "
          f"{t_p / t_gen:.2f}x generate()")
    print(f"(b) our sampler, Geometric (β=0.5):     {t_geo:7.3f} s  {toks / t_geo:10.0f} tokens/s   "
          f"{t_geo / t_gen:.2f}x generate()")
    print(f"(c) generate() on P alone:              {t_gen:7.3f} s  {toks / t_gen:10.0f} tokens/s")
    if not args.skip_loop:
        t_loop = timed(lambda: plain_loop(p, q, prompt, R, T, 0.4, V), device)
        print(f"(a) plain per-sequence loop, no cache:  {t_loop:7.3f} s  {toks / t_loop:10.0f} tokens/s   "
              f"(b, P) is {t_loop / t_p:.0f}x faster, (b, Geometric) {t_loop / t_geo:.0f}x")


if __name__ == "__main__":
    main()
