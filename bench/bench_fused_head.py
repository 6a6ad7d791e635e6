"""Forward + backward time and peak memory of per-token log-probs, entropy and the KL penalty computed from final
hidden states through the output heads (no (B, T, V) logits), against TRL's chunked head and the full-logits path.

    python bench/bench_fused_head.py                                   # CPU: B·T = 4096, V = 151,936, H = 896, bf16
    python bench/bench_fused_head.py --tokens 1024 --dtype float32
    python bench/bench_fused_head.py --device cuda

Inputs: the policy's hidden states (N, H) and head (V, H), both with requires_grad; the reference's (no gradient);
sampled tokens. Every method ends in loss.backward() into the policy's hidden states and head.

  trl policy          trl.kernels.chunked_logprob.ChunkedLogProbFunction (what GRPOTrainer 1.x runs through its
                      fused LM head): log π and entropy of the policy only
  trl policy+ref k3   the same plus the reference's log-probs through the same head without gradient and TRL's k3
                      from them: what TRL computes to get its KL penalty
  fused rb            kl_estimation.fused_head.fused_head_terms: log π, log π_ref, the exact KL_t (RB) and entropy
  full logits         h·Wᵀ for both models, log_softmax in float32, gather, exact KL and entropy (the naive way)
  liger jsd           liger_kernel's LigerFusedLinearJSD (β = 0: the forward KL) where it imports (needs Triton)

Each method runs in its own subprocess; peak memory is measured as in bench/bench_kl_loss.py (its Peak: the CUDA
allocator's peak, or VmHWM above the resident set once the inputs exist). Times: median of --repeats runs after one
warm-up run on a small slice, then the median over --rounds rounds that run the methods in turn (A, B, A, B: on a
shared machine each method sees the same load); the load average is printed beside each run.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ("trl policy", "trl policy+ref k3", "fused rb", "full logits", "liger jsd")
TRL_VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16


def make_inputs(args, torch, n):
    g = torch.Generator().manual_seed(0)
    dt, dev = getattr(torch, args.dtype), torch.device(args.device)
    H, V = args.hidden, args.vocab
    hp = torch.randn(n, H, generator=g)
    hq = hp + 0.3 * torch.randn(n, H, generator=g)
    wp = torch.randn(V, H, generator=g) / H ** 0.5 * 4
    wq = wp + 0.2 * torch.randn(V, H, generator=g) / H ** 0.5 * 4
    tok = torch.randint(0, V, (n,), generator=g)
    coef = torch.randn(3, n, generator=g)
    return (hp.to(dt).to(dev).requires_grad_(), wp.to(dt).to(dev).requires_grad_(), hq.to(dt).to(dev),
            wq.to(dt).to(dev), tok.to(dev), coef.to(dev))


def loss_of(method, hp, wp, hq, wq, tok, coef, torch):
    """A loss using every per-token output the method gives, with fixed random per-token weights."""
    if method.startswith("trl"):
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction as F

        lp, ent, *_ = F.apply(hp, wp, None, tok, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs", "entropy"))
        loss = (coef[0] * lp).sum() + (coef[2] * ent).sum()
        if method == "trl policy+ref k3":
            with torch.no_grad():
                lq = F.apply(hq, wq, None, tok, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ("log_probs",))[0]
            d = lq - lp
            loss = loss + (coef[1] * (torch.exp(d) - d - 1)).sum()
        return loss
    if method == "fused rb":
        from kl_estimation.fused_head import fused_head_terms

        o = fused_head_terms(hp, wp, hq, wq, tok)
        return (coef[0] * o.logp).sum() + (coef[1] * o.kl).sum() + (coef[2] * o.entropy).sum()
    if method == "full logits":
        lsp = torch.log_softmax((hp @ wp.t()).float(), -1)
        with torch.no_grad():
            lsq = torch.log_softmax((hq @ wq.t()).float(), -1)
        p = lsp.exp()
        lp = lsp.gather(-1, tok[:, None])[:, 0]
        return (coef[0] * lp).sum() + (coef[1] * (p * (lsp - lsq)).sum(-1)).sum() - (coef[2] * (p * lsp).sum(-1)).sum()
    if method == "liger jsd":
        from liger_kernel.transformers import LigerFusedLinearJSD

        # student = policy, teacher = reference; β = 0 is KL(teacher‖student) in Liger's convention: per-token
        # weights cannot be given, so the loss is its batch mean
        return LigerFusedLinearJSD(jsd_beta=0.0)(hp, wp, hq, wq, tok)
    raise ValueError(f"--methods: unknown {method!r}; allowed: {', '.join(METHODS)}")


def run_one(args, method):
    import torch
    from bench_kl_loss import Peak

    if args.threads:
        torch.set_num_threads(args.threads)
    if method == "liger jsd":
        try:
            import liger_kernel.transformers  # noqa: F401
        except (ImportError, RuntimeError) as e:  # not installed, or Triton failing on this device
            return {"method": method, "skipped": f"liger_kernel not usable here ({type(e).__name__}: {e})"[:200]}
    inputs = make_inputs(args, torch, args.tokens)
    hp, wp = inputs[:2]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    small = make_inputs(args, torch, min(args.tokens, 64))
    loss_of(method, *small, torch).backward()  # warm-up: imports, allocator, Triton compilation
    del small
    peak = Peak(args.device, torch)
    times, value = [], None
    for i in range(args.repeats):
        hp.grad = wp.grad = None
        if i == 0:
            peak.start()
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_of(method, *inputs, torch)
        loss.backward()
        sync()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
        if i == 0:
            mem = peak.stop()
        value = float(loss)
    return {"method": method, "total_s": statistics.median(t for t, _ in times),
            "cpu_s": statistics.median(c for _, c in times), "peak_bytes": mem, "loss": value}


def _median_row(rs):
    ok = [r for r in rs if "skipped" not in r]
    if not ok:
        return rs[-1]
    row = {k: statistics.median(r[k] for r in ok) for k in ("total_s", "cpu_s", "peak_bytes", "load")}
    return {**ok[0], **row, "loads": [round(r["load"], 1) for r in ok]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="B·T positions scored")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per subprocess")
    ap.add_argument("--rounds", type=int, default=1, help="subprocesses per method, the methods interleaved")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        print(json.dumps(run_one(args, args._one)))
        return
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        print(f"--methods: unknown {bad[0]!r}; allowed: {', '.join(METHODS)}", file=sys.stderr)
        sys.exit(2)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    base = [sys.executable, __file__, "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--hidden",
            str(args.hidden), "--dtype", args.dtype, "--device", args.device, "--repeats", str(args.repeats),
            "--threads", str(args.threads)]
    runs = {m: [] for m in args.methods.split(",")}
    for _ in range(args.rounds):
        for method in runs:
            load = os.getloadavg()[0]
            out = subprocess.run(base + ["--_one", method], env=env, capture_output=True, text=True, check=False)
            if out.returncode:
                why = (out.stderr.strip().splitlines() or [f"exit status {out.returncode} (killed: out of memory?)"])
                runs[method].append({"method": method, "skipped": why[-1][:200]})
            else:
                runs[method].append({**json.loads(out.stdout.strip().splitlines()[-1]), "load": load})
            print(json.dumps(runs[method][-1]), file=sys.stderr, flush=True)  # each run as it ends: it may be cut
    rows = [_median_row(rs) for rs in runs.values()]
    N, V, H = args.tokens, args.vocab, args.hidden
    mib = 2 ** 20
    print(f"B·T={N} V={V} H={H} {args.dtype} on {args.device}; one (B·T, V) float32 tensor = {N * V * 4 / mib:.0f} "
          f"MiB; median of {args.repeats} × {args.rounds} rounds; ratios against trl policy / trl policy+ref k3")
    refs = [next((r for r in rows if r["method"] == m and "skipped" not in r), None)
            for m in ("trl policy", "trl policy+ref k3")]

    def ratios(r, key):
        return " ".join(f"{r[key] / ref[key]:6.2f}" if ref and ref[key] else f"{'-':>6s}" for ref in refs)

    print(f"{'method':18s} {'total s':>8s} {'× trl':>13s} {'CPU s':>7s} {'× trl':>13s} {'peak MiB':>9s} {'× trl':>13s}"
          f" {'loss':>12s}  load")
    for r in rows:
        if "skipped" in r:
            print(f"{r['method']:18s} skipped: {r['skipped']}")
            continue
        print(f"{r['method']:18s} {r['total_s']:8.2f} {ratios(r, 'total_s')} {r['cpu_s']:7.2f} {ratios(r, 'cpu_s')} "
              f"{r['peak_bytes'] / mib:9.0f} {ratios(r, 'peak_bytes')} {r['loss']:12.4f}  {r['loads']}")


if __name__ == "__main__":
    main()
