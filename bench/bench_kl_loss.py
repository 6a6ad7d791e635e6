"""Forward + backward time and peak memory of a KL penalty over a 151,936-token vocabulary: the k3 loss the RL
libraries write against kl_loss(estimator="rb") with its exact per-token KL.

    python bench/bench_kl_loss.py                                  # CPU: B=4, T=256, bf16 logits
    python bench/bench_kl_loss.py --dtype float32 --batch 2
    python bench/bench_kl_loss.py --device cuda --batch 8 --seq 1024

Every method gets the same inputs: the policy's logits (B, T, V) with requires_grad, the reference's logits
(no gradient), sampled tokens and a padding mask, and ends in loss.backward() into the policy's logits.

  k3 (log_softmax)   log_softmax(logits.float()).gather for both models, k3 = e^{q−p} − (q−p) − 1, masked mean
                     (the reference under no_grad), as TRL / verl / OpenRLHF write it
  k3 (per-row lse)   the same k3 with log P from gather − logsumexp one sequence at a time (TRL's
                     selective_log_softmax for float32), the libraries' memory-saving variant
  k3 compiled        the first, through torch.compile (what a library gets by compiling its loss)
  rb fused           token_logprobs_and_kl → kl_loss(rb): log P, log Q and the exact KL_t in one chunked pass
  rb fused compiled  the same with token_logprobs_and_kl(..., compile=True)
  rb unfused         log_softmax.gather as in k3 plus exact_token_kl (the same chunked kernel, KL only) →
                     kl_loss(rb)

Each method runs in its own subprocess (so one's freed memory cannot hide another's peak). Peak memory is the
increase over the memory held once the inputs exist and one warm-up run (compilation included) is done: on CUDA
torch.cuda.max_memory_allocated; on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) with glibc's mmap threshold fixed at 1 MiB so freed buffers leave the resident set. It
includes the (B, T, V) gradient of the policy's logits, which every method writes.
Times: median of --repeats runs after the warm-up, wall clock and the process's CPU time (on a shared machine the
CPU time with --threads 1 is the steadier of the two).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

METHODS = ("k3 (log_softmax)", "k3 (per-row lse)", "k3 compiled", "rb fused", "rb fused compiled", "rb unfused")


def make_inputs(args, torch):
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, args.dtype)
    B, T, V = args.batch, args.seq, args.vocab
    zp = (torch.randn(B, T, V, generator=g) * 2).to(dt)
    zq = (zp.float() + torch.randn(B, T, V, generator=g)).to(dt)
    tok = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    dev = torch.device(args.device)
    return zp.to(dev).requires_grad_(), zq.to(dev), tok.to(dev), mask.to(dev)


def gather_logp(z, tok, torch):
    return torch.log_softmax(z.float(), -1).gather(-1, tok[..., None])[..., 0]


def per_row_logp(z, tok, torch):
    picked = z.gather(-1, tok[..., None])[..., 0].float()
    lse = torch.stack([torch.logsumexp(row.float(), -1) for row in z])
    return picked - lse


def k3_loss(zp, zq, tok, mask):
    import torch

    logp = gather_logp(zp, tok, torch)
    with torch.no_grad():
        logq = gather_logp(zq, tok, torch)
    d = logq - logp
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum()


_K3_COMPILED = None


def forward(method, zp, zq, tok, mask, torch, kle):
    global _K3_COMPILED
    n = mask.sum()
    if method == "k3 compiled":
        _K3_COMPILED = _K3_COMPILED or torch.compile(k3_loss)
        return _K3_COMPILED(zp, zq, tok, mask)
    if method.startswith("k3"):
        logp_fn = gather_logp if method == "k3 (log_softmax)" else per_row_logp
        logp = logp_fn(zp, tok, torch)
        with torch.no_grad():
            logq = logp_fn(zq, tok, torch)
        d = logq - logp
        return ((torch.exp(d) - d - 1) * mask).sum() / n
    if method.startswith("rb fused"):
        logp, logq, kl = kle.token_logprobs_and_kl(zp, zq, tok, mask, compile=method.endswith("compiled"))
    else:
        logp = gather_logp(zp, tok, torch)
        with torch.no_grad():
            logq = gather_logp(zq, tok, torch)
        kl = kle.exact_token_kl(zp, zq, mask, chunk_size=kle.core.exact.default_chunk(zp.shape[-1]))
    return kle.kl_loss(logp, logq, mask, token_kl=kl).sum() / n


class Peak:
    """Peak memory above the current level: CUDA allocator statistics, or the process's resident-set high-water mark."""

    def __init__(self, device, torch):
        self.cuda, self.torch = device.startswith("cuda"), torch

    def _rss(self, field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = self._rss("VmRSS:")

    def stop(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return self._rss("VmHWM:") - self.base


def run_one(args, method):
    import torch

    import kl_estimation as kle

    if args.threads:
        torch.set_num_threads(args.threads)
    zp, zq, tok, mask = make_inputs(args, torch)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    peak = Peak(args.device, torch)
    t0 = time.perf_counter()
    forward(method, zp, zq, tok, mask, torch, kle).backward()  # warm-up: compiles where there is compiling
    warm = time.perf_counter() - t0
    zp.grad = None
    peak.start()
    forward(method, zp, zq, tok, mask, torch, kle).backward()
    mem = peak.stop()
    zp.grad = None
    fwd, bwd, cpu, value = [], [], [], None
    for _ in range(args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = forward(method, zp, zq, tok, mask, torch, kle)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2, c2 = time.perf_counter(), time.process_time()
        value = float(loss)
        zp.grad = None
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        cpu.append(c2 - c0)
    return {"method": method, "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "total_s": statistics.median([a + b for a, b in zip(fwd, bwd)]), "cpu_s": statistics.median(cpu),
            "peak_bytes": mem, "loss": value, "warmup_s": warm}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(args, args._one)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    base = [sys.executable, __file__, "--batch", str(args.batch), "--seq", str(args.seq), "--vocab",
            str(args.vocab), "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats),
            "--threads", str(args.threads)]
    rows = []
    for method in args.methods.split(","):
        out = subprocess.run(base + ["--_one", method], env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    B, T, V = args.batch, args.seq, args.vocab
    mib = 2 ** 20
    print(f"B={B} T={T} V={V} logits {args.dtype} on {args.device}; one (B,T,V) float32 tensor = "
          f"{B * T * V * 4 / mib:.0f} MiB, the inputs' = {B * T * V * (4 if args.dtype == 'float32' else 2) / mib:.0f}"
          f" MiB each; peak = {'torch.cuda.max_memory_allocated' if args.device.startswith('cuda') else 'VmHWM'}"
          f" above the inputs; median of {args.repeats}")
    ref = next((r for r in rows if r["method"] == "k3 (log_softmax)"), rows[0])
    print(f"{'method':18s} {'forward s':>10s} {'backward s':>10s} {'total s':>8s} {'× k3':>6s} {'CPU s':>7s} "
          f"{'× k3':>6s} {'peak MiB':>9s} {'× k3':>6s} {'peak / BTV·4':>12s} {'loss':>10s} {'warm-up s':>9s}")
    def ratio(a, b):
        return a / b if b else float("nan")  # tiny sizes: below the resolution of the peak

    for r in rows:
        print(f"{r['method']:18s} {r['forward_s']:10.3f} {r['backward_s']:10.3f} {r['total_s']:8.3f} "
              f"{ratio(r['total_s'], ref['total_s']):6.2f} {r['cpu_s']:7.3f} {ratio(r['cpu_s'], ref['cpu_s']):6.2f} "
              f"{r['peak_bytes'] / mib:9.0f} "
              f"{ratio(r['peak_bytes'], ref['peak_bytes']):6.2f} {r['peak_bytes'] / (B * T * V * 4):12.2f} "
              f"{r['loss']:10.4f} {r['warmup_s']:9.1f}")


if __name__ == "__main__":
    main()
