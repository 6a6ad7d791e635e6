"""LLM sampler benchmark: R sequences of T tokens from two random models, our sampler against the usual ways.

    python bench/bench_llm.py                    # CPU: random GPT-2 pair (2 layers, d=128, V=2048), R=256, T=20
    python bench/bench_llm.py --device cuda      # GPU: random Qwen2-0.5B-shaped pair in bf16, R=256, T=128
    python bench/bench_llm.py --device cuda --static-cache --compile    # where they may pay on a GPU
    python bench/bench_llm.py --model smollm2 -R 32 -T 16 --threads 2   # the real SmolLM2-135M pair (Q4_1 → P,
                                 # Q4_0 → Q, bench/real_lm.py), chat prompt, τ = 1; add --device cuda on a GPU

Lines:
  ours       our sampler: batched, KV caches, both models every step, exact per-step KL (proposal P, Geometric β=0.5)
  floor      two KV-cached forwards per token (P and Q on fixed tokens, nothing else): what any sampler that scores
             both models per step pays; target: ours within 1.3× of it
  (a)        transformers' generate() sampling from P alone (no Q, no KL)
  (b)        what RLHF libraries do: generate() from P, then one teacher-forced forward of P and Q over the R × T
             tokens (micro-batches of --tf-batch rows) with the full-vocabulary KL per token; target: ours faster
  (loop)     CPU only: one sequence at a time, no KV cache, both models re-run over the whole prefix each step
With CUDA every line also prints its peak GPU memory (torch.cuda.max_memory_allocated, reset before each line); on
CPU the peak resident memory of the process during the line (RSS polled every 5 ms; models included) and its rise
over the RSS before the line.
--static-cache: generate() with a static KV cache (cache_implementation="static"); --compile: torch.compile of
every model's forward (dynamic shapes; on CUDA generate() then compiles its static-cache forward itself).
"""
import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from kl_estimation.llm.engine import (  # noqa: E402
    exact_step_kl,
    sample_batch,
    sequence_proposal,
    unit_generator,
)
from kl_estimation.llm.pair import TransformersPair, _forward_last, tempered_log_softmax  # noqa: E402

TEMPERATURE = 0.4


def models(qwen: bool, device, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    out = []
    for seed in (0, 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if qwen:
                cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                                  tie_word_embeddings=True)
                m = Qwen2ForCausalLM(cfg)
            else:
                m = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=256, n_embd=128, n_layer=2, n_head=4,
                                                      bos_token_id=0, eos_token_id=0))
        out.append(m.to(device=device, dtype=dtype).eval())
    return out


class _Tok:
    def __init__(self, V):
        self.V = V

    def __len__(self):
        return self.V

    def decode(self, ids):
        return ""


def plain_loop(p, q, prompt, R, T, V):
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for _ in range(R):
            ids = prompt[None]
            for _ in range(T):
                lp = tempered_log_softmax(p(ids).logits[:, -1], TEMPERATURE, V)
                lq = tempered_log_softmax(q(ids).logits[:, -1], TEMPERATURE, V)
                _ = (lp.exp() * (lp - lq)).sum()
                x = torch.multinomial(lp.exp(), 1, generator=g)
                ids = torch.cat([ids, x], dim=1)


@torch.inference_mode()
def two_forwards(p, q, prompt, R, T):
    """The floor: P and Q over the prompt, then T - 1 single-token steps on their KV caches; no sampling, no KL."""
    ids = prompt[None].expand(R, -1)
    mask = torch.ones_like(ids)
    pos = torch.arange(ids.shape[1], device=ids.device).expand(R, -1)
    _, cp = _forward_last(p, ids, mask, pos, None)
    _, cq = _forward_last(q, ids, mask, pos, None)
    tok = ids[:, -1:]
    for t in range(T - 1):
        mask = torch.cat([mask, mask[:, :1]], dim=1)
        step = pos[:, -1:] + 1 + t
        _, cp = _forward_last(p, tok, mask, step, cp)
        _, cq = _forward_last(q, tok, mask, step, cq)


def generate(p, prompt, R, T, static: bool):
    torch.manual_seed(0)  # generate() draws from the global RNG; the benchmark owns this process
    kw = {"cache_implementation": "static"} if static else {}
    with torch.inference_mode():
        return p.generate(prompt[None].expand(R, -1), do_sample=True, temperature=TEMPERATURE, top_k=0, top_p=1.0,
                          max_new_tokens=T, min_new_tokens=T, pad_token_id=0,
                          attention_mask=torch.ones(R, prompt.numel(), dtype=torch.long, device=prompt.device), **kw)


@torch.inference_mode()
def generate_then_score(p, q, prompt, R, T, V, static: bool, tf_batch: int):
    """(b): sample with generate(), then teacher-force P and Q over the sequences, full-vocabulary KL per token."""
    seqs = generate(p, prompt, R, T, static)
    L = prompt.numel()
    kl = torch.zeros(R, T, dtype=torch.float64, device=seqs.device)
    for i in range(0, R, tf_batch):
        chunk = seqs[i:i + tf_batch]
        lp = tempered_log_softmax(p(chunk).logits[:, L - 1:-1], TEMPERATURE, V)
        lq = tempered_log_softmax(q(chunk).logits[:, L - 1:-1], TEMPERATURE, V)
        kl[i:i + tf_batch] = exact_step_kl(lp, lq)
    return kl


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
    """Peak resident memory of this process while the block runs (polled every 5 ms; Linux)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss())

        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())


def timed(fn, device, repeats=1, warm=False):
    """Best wall time over `repeats` and the peak memory: GPU memory on CUDA, (peak RSS, its rise) in GiB on CPU;
    `warm`: one untimed call first (so that torch.compile's compilations are not timed)."""
    if warm:
        fn()
    best = float("inf")
    if device.type == "cpu" and os.path.exists("/proc/self/statm"):
        with RSSPeak() as m:
            for _ in range(repeats):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
        return best, (m.peak / 2 ** 30, (m.peak - m.start) / 2 ** 30)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None
    return best, peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--qwen05b", action="store_true", help="a random Qwen2-0.5B-shaped pair in bf16 (default on CUDA)")
    ap.add_argument("--gpt2", action="store_true", help="the small GPT-2 pair even on CUDA")
    ap.add_argument("-R", type=int, help="sequences (default 256)", default=256)
    ap.add_argument("-T", type=int, help="tokens per sequence (default 128 on CUDA, 20 on CPU)")
    ap.add_argument("--tf-batch", type=int, default=32, help="(b): rows per teacher-forced forward")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static-cache", action="store_true", help="generate() with a static KV cache")
    ap.add_argument("--compile", action="store_true", help="torch.compile every model's forward")
    ap.add_argument("--skip-loop", action="store_true", help="skip (loop), the slow per-sequence loop")
    ap.add_argument("--model", choices=["random", "smollm2"], default="random",
                    help="smollm2: the real pair of bench/real_lm.py (P = Q4_1 GGUF, Q = Q4_0), τ = 1, chat prompt")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--proposals", nargs="+", default=["P", "Geometric (β=0.5)", "Fixed mixture (λ=0.5)"],
                    help="our sampler's lines (the first two are the README's)")
    args = ap.parse_args()
    global TEMPERATURE
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    qwen = args.qwen05b or (device.type == "cuda" and not args.gpt2 and args.model == "random")
    T = args.T or (128 if device.type == "cuda" else 20)
    R = args.R
    dtype = torch.bfloat16 if qwen else torch.float32
    tok = None
    if args.model == "smollm2":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import real_lm

        from kl_estimation.llm.loading import tokenize_prompts

        TEMPERATURE = 1.0
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tok, p, q = real_lm.load_real("q4_0", dtype=dtype, device=device)
        chat, text = real_lm.PROMPTS["chat-story"]
        prompt_ids = tokenize_prompts(tok, [text], chat)[0]
    else:
        p, q = models(qwen, device, dtype)
    if args.compile:
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = 64  # prompt and step forwards, with and without caches
        for m in (p, q):
            m.forward = torch.compile(m.forward, dynamic=True)
    V = p.config.vocab_size
    prompt = torch.arange(1, 7, device=device) if tok is None else torch.tensor(prompt_ids, device=device)
    # EOS ignored: every line makes R·T tokens
    pair = TransformersPair(p, q, tok or _Tok(V), prompt[None], torch.ones_like(prompt)[None], TEMPERATURE, None)
    toks = R * T
    label = ("random Qwen2-0.5B-shaped pair, bf16" if qwen else "random GPT-2 pair (2 layers, d=128, V=2048), fp32")
    if tok is not None:
        label = (f"SmolLM2-135M-Instruct, P = Q4_1 GGUF, Q = Q4_0 GGUF, dequantized to {str(dtype)[6:]}, "
                 f"τ = {TEMPERATURE}, chat prompt of {prompt.numel()} tokens")
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{label}, R={R} sequences x T={T} tokens on {device} ({hw}); static cache {args.static_cache}, "
          f"compile {args.compile}")

    def ours(name):
        prop = sequence_proposal(name)
        return lambda: sample_batch(pair, prop, R, T, unit_generator(0, name, 0, device))

    sample_batch(pair, sequence_proposal("P"), 8, 4, unit_generator(0, "P", 0, device))  # warm-up
    generate(p, prompt, 8, 4, args.static_cache)
    rows = {f"ours, proposal {name}": timed(ours(name), device, args.repeats, args.compile)
            for name in args.proposals}
    rows.update({"floor: two KV-cached forwards": timed(lambda: two_forwards(p, q, prompt, R, T), device, args.repeats,
                                                         args.compile),
            "(a) generate() on P alone": timed(lambda: generate(p, prompt, R, T, args.static_cache), device,
                                               args.repeats, args.compile),
            "(b) generate() + teacher-forced P, Q, KL": timed(
                lambda: generate_then_score(p, q, prompt, R, T, V, args.static_cache, args.tf_batch), device,
                args.repeats, args.compile)})
    floor, rlhf = rows["floor: two KV-cached forwards"][0], rows["(b) generate() + teacher-forced P, Q, KL"][0]
    for name, (t, peak) in rows.items():
        mem = ("" if peak is None else f"   peak {peak:6.2f} GiB" if not isinstance(peak, tuple) else
               f"   peak RSS {peak[0]:5.2f} GiB (+{peak[1]:4.2f})")
        rel = f"   {t / floor:5.2f}x floor  {t / rlhf:5.2f}x (b)" if name.startswith("ours") else ""
        print(f"{name:42s} {t:8.3f} s  {toks / t:10.0f} tokens/s{mem}{rel}")
    if device.type == "cpu" and not args.skip_loop:
        t_loop, _ = timed(lambda: plain_loop(p, q, prompt, R, T, V), device)
        print(f"{'(loop) per sequence, no cache':42s} {t_loop:8.3f} s  {toks / t_loop:10.0f} tokens/s   "
              f"ours (P) is {t_loop / rows['ours, proposal P'][0]:.0f}x faster")
    print("targets: ours within 1.3x of the floor, and faster than (b)")


if __name__ == "__main__":
    main()
