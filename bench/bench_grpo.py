"""GRPO steps with kl_estimator="rb" (kl_estimation.integrations.trl) against TRL's own k3: time per step, peak memory,
loss and grad-norm, on- and off-policy (num_iterations 1 and 2). Needs the [trl] extra.

    python bench/bench_grpo.py --model /tmp/smollm2                      # a normal HF folder (docs/training.md)
    python bench/bench_grpo.py --model /tmp/smollm2 --estimators rb,mc,k3 --steps 5 --completion 32

Each run is its own subprocess; peak memory is the process's peak resident set (ru_maxrss); the time per step is TRL's
own `step_time` metric (generation, reference pass and optimiser step included), median over the steps after the
first; CPU s/step is the process's CPU time over the whole of train() divided by the steps (steadier on a shared
machine; use --threads 1 there, since idle OpenMP threads spinning on a busy machine count as CPU time), and
"excl. gen" the same without the CPU time of TRL's `_generate` (sampling: the same work whatever the KL).
--rounds runs the estimators in turn (rb, k3, rb, k3, ...) and reports medians, with the load average of each run.
Estimator "rb-refloss" is "rb" with the reference's backbone run in the loss instead of its hidden states kept at
rollout (GRPOTrainer.ref_hidden_at_rollout = False).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

PROMPTS = ["Write a haiku about the sea.", "Name three prime numbers.", "What is the capital of France?",
           "Describe a cat in one sentence.", "Count from one to five.", "Give a synonym of happy.",
           "What colour is the sky?", "Say hello in Spanish."]


def _reward(completions, **kwargs):
    # shorter answers with a vowel-rich vocabulary: any cheap, non-constant reward does for timing
    return [sum(ch in "aeiou" for ch in c) / (1 + len(c)) for c in completions]


def run_one(args, estimator, iterations):
    import torch
    import trl
    from datasets import Dataset
    from trl import GRPOConfig

    from kl_estimation.integrations.trl import GRPOTrainer

    gen_cpu = [0.0]
    generate = trl.GRPOTrainer._generate

    def timed_generate(self, *a, **k):
        c = time.process_time()
        try:
            return generate(self, *a, **k)
        finally:
            gen_cpu[0] += time.process_time() - c

    trl.GRPOTrainer._generate = timed_generate
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=args.batch, num_generations=args.batch,
                         max_completion_length=args.completion, max_steps=args.steps, beta=args.beta,
                         num_iterations=iterations, learning_rate=args.lr, logging_steps=1, report_to="none",
                         use_cpu=args.device == "cpu", save_strategy="no", seed=0, disable_tqdm=True)
        trainer = GRPOTrainer(model=args.model, reward_funcs=_reward, args=cfg,
                              train_dataset=Dataset.from_dict({"prompt": PROMPTS * args.steps}),
                              kl_estimator=estimator.split("-")[0])
        trainer.ref_hidden_at_rollout = estimator != "rb-refloss"
        c0 = time.process_time()
        trainer.train()
        cpu = (time.process_time() - c0) / args.steps
    logs = [h for h in trainer.state.log_history if "loss" in h and "step_time" in h]
    keep = ("loss", "grad_norm", "kl", "kl/rb", "kl/k3", "kl/se", "kl/prefix_ess", "kl/max_ratio", "step_time")
    return {"estimator": estimator, "num_iterations": iterations,
            "step_s": statistics.median(h["step_time"] for h in logs[1:]) if len(logs) > 1 else logs[0]["step_time"],
            "cpu_s": cpu, "cpu_nogen_s": cpu - gen_cpu[0] / args.steps,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "steps": [{k: h[k] for k in keep if k in h} for h in logs]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a Hugging Face model folder")
    ap.add_argument("--estimators", default="rb,k3")
    ap.add_argument("--iterations", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4, help="completions per step (one group)")
    ap.add_argument("--completion", type=int, default=32, help="max_completion_length")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=1, help="runs per estimator, the estimators interleaved")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._one:
        est, it = args._one.split(":")
        print(json.dumps(run_one(args, est, int(it))))
        return
    flags = sys.argv[1:]
    rows = []
    for it in args.iterations.split(","):
        runs = {est: [] for est in args.estimators.split(",")}
        for _ in range(args.rounds):
            for est in runs:
                load = os.getloadavg()[0]
                out = subprocess.run([sys.executable, __file__, *flags, "--_one", f"{est}:{it}"], capture_output=True,
                                     text=True, check=False)
                if out.returncode:
                    print(f"{est} num_iterations={it}: failed: {out.stderr.strip().splitlines()[-1]}")
                    continue
                runs[est].append({**json.loads(out.stdout.strip().splitlines()[-1]), "load": load})
                print(json.dumps(runs[est][-1]), file=sys.stderr, flush=True)  # each run as it ends: it may be cut
        for rs in runs.values():
            if rs:
                med = {k: statistics.median(r[k] for r in rs) for k in ("step_s", "cpu_s", "cpu_nogen_s", "peak_rss")}
                steps = [s for r in rs for s in r["steps"]]
                rows.append({**rs[0], **med, "steps": steps, "loads": [round(r["load"], 1) for r in rs]})
    print(f"GRPO on {args.model}: {args.steps} steps, {args.batch} completions × ≤{args.completion} tokens, "
          f"beta={args.beta}, {args.device}, threads={args.threads or 'default'}; medians of {args.rounds} "
          "interleaved runs; step time = median of TRL's step_time after step 1")
    print(f"{'estimator':10s} {'iters':>5s} {'s/step':>7s} {'× k3':>5s} {'CPU s/step':>10s} {'× k3':>5s} "
          f"{'excl. gen':>9s} {'× k3':>5s} {'peak MiB':>9s} {'× k3':>5s} {'max |loss|':>10s} {'max grad':>9s} "
          f"{'kl (TRL)':>9s} {'kl/rb':>8s}  load")
    for r in rows:
        ref = next((x for x in rows if x["estimator"] == "k3" and x["num_iterations"] == r["num_iterations"]), None)

        def ratio(key, r=r, ref=ref):
            return r[key] / ref[key] if ref else float("nan")

        loss = max(abs(s["loss"]) for s in r["steps"])
        grad = max(s["grad_norm"] for s in r["steps"])
        last = r["steps"][-1]
        print(f"{r['estimator']:10s} {r['num_iterations']:5d} {r['step_s']:7.2f} {ratio('step_s'):5.2f} "
              f"{r['cpu_s']:10.2f} {ratio('cpu_s'):5.2f} {r['cpu_nogen_s']:9.2f} {ratio('cpu_nogen_s'):5.2f} "
              f"{r['peak_rss'] / 2 ** 20:9.0f} {ratio('peak_rss'):5.2f} {loss:10.4g} {grad:9.4g} "
              f"{last.get('kl', float('nan')):9.4g} {last.get('kl/rb', float('nan')):8.4g}  {r['loads']}")

if __name__ == "__main__":
    main()
