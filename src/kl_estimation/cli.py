"""Command lines of the top-level scripts: argparse, validation → one-line error and exit status 2."""
from __future__ import annotations

import argparse
import sys

from . import runio

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage block) with exit status 2."""

    def error(self, message):  # noqa: D102 - argparse hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def as_flag(message: str) -> str:
    """Library errors name their parameter ('n_reps: …'); on the command line that is the flag ('--n-reps: …')."""
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier():
        return f"--{head.replace('_', '-')}: {rest}"
    return message


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {as_flag(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _names(values: list[str]) -> list[str]:
    """Accept `--families zipf mixture` and `--families zipf,mixture` alike."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# ---------------------------------------------------------------- Synthetic_tests.py

def _samplers() -> list[str]:
    from .sequences import SAMPLERS  # not draws.DRAWS: single-token runs never load torch

    return list(SAMPLERS)


def synthetic_parser(prog: str, defaults: dict) -> Parser:
    from .distributions import DIVERGENCES, FAMILIES
    from .synthetic import SyntheticConfig

    d = {**vars(SyntheticConfig()), **defaults}
    p = Parser(prog=prog, description="Synthetic KL(P‖Q) experiments: naive MC, Rao-Blackwellized MC and importance "
                                      "sampling with every registry proposal on long-tailed token distributions, "
                                      "against exact values.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .sequences import SequenceConfig

    sd = SequenceConfig()
    p.add_argument("--vocab-size", type=int, help=f"vocabulary size V (default {d['vocab_size']}; with --sequence "
                                                  f"{sd.vocab_size})")
    p.add_argument("--n-samples", type=int, help=f"samples (sequences) per method and repeat (default "
                                                 f"{d['n_samples']}; with --sequence {sd.n_samples})")
    p.add_argument("--n-repeats", type=int, help=f"independent repeats per method (default {d['n_repeats']}; with "
                                                 f"--sequence {sd.n_repeats})")
    p.add_argument("--divergence", default=d["divergence"], help=f"one of {', '.join(DIVERGENCES)}, all")
    p.add_argument("--families", nargs="+", default=list(d["families"]), help=f"any of {', '.join(FAMILIES)}")
    p.add_argument("--alpha-values", nargs="+", type=float, default=list(d["alpha_values"]),
                   help="grid in [0, 1] for the α / β / λ / t of the mixture, geometric, chi-square and "
                        "cross-entropy proposals")
    p.add_argument("--rb-top-k", type=int, default=d["rb_top_k"],
                   help="Rao-Blackwell: top-k tokens of P summed exactly, the rest sampled (0 = naive MC)")
    p.add_argument("--seed", type=int, default=d["seed"], help="seed of every random stream")
    p.add_argument("--output-dir", default=d.get("output_dir"),
                   help="write the run's files here (default: a new folder under results/synthetic/)")
    p.add_argument("--no-plots", action="store_true", default=d.get("no_plots", False), help="skip the figures")
    p.add_argument("--sequence", action="store_true",
                   help="the sequence experiment: toy Markov pairs with exact sequence KL and exact variances")
    p.add_argument("--order", type=int, default=sd.order, help="--sequence: Markov order, 1 or 2")
    p.add_argument("--horizon", type=int, default=sd.horizon, help="--sequence: tokens per sequence T")
    p.add_argument("--sampler", nargs="+", default=list(sd.samplers),
                   help="--sequence: how sequences are drawn; samplers other than iid add MC / RB / RB+CV rows "
                        "(variance over repeats, each repeat one randomization); one of " + ", ".join(_samplers()))
    return p


def synthetic_main(argv=None, prog: str = "Synthetic_tests.py", **defaults) -> int:
    from tqdm import tqdm

    from . import report, sequences, synthetic

    args = synthetic_parser(prog, defaults).parse_args(argv)
    mode = sequences if args.sequence else synthetic
    base = sequences.SequenceConfig() if args.sequence else synthetic.SyntheticConfig(**{
        k: v for k, v in defaults.items() if k in vars(synthetic.SyntheticConfig())})
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else getattr(base, k)
             for k in ("vocab_size", "n_samples", "n_repeats")}
    common = dict(**sizes, divergence=args.divergence, families=tuple(_names(args.families)),
                  alpha_values=tuple(args.alpha_values), seed=args.seed)
    if args.sequence:
        cfg = sequences.SequenceConfig(**common, order=args.order, horizon=args.horizon,
                                       samplers=tuple(_names(args.sampler)))
    else:
        cfg = synthetic.SyntheticConfig(**common, rb_top_k=args.rb_top_k)
    try:
        cfg.validate()
        runio.check_output_dir(args.output_dir)
        with tqdm(total=mode.n_steps(cfg), desc=mode.__name__.rsplit(".", 1)[-1], disable=None, leave=False) as bar:
            pairs, arrays = mode.run(cfg, progress=bar.update)
    except ValueError as err:
        return fail(prog, str(err))

    for pair in pairs:
        print(report.pair_report(pair, cfg.n_samples, cfg.n_repeats), end="\n\n")
        ratios = [m for m in pair["methods"] if m.get("variance_ratio_iid_rb") is not None]
        if ratios:  # rows of samplers with dependent sequences: variance over repeats (one randomization each)
            print("variance over repeats × n / exact variance of i.i.d. RB: " + ", ".join(
                f"{m['name']} {m['variance_ratio_iid_rb']:.3f}" for m in ratios), end="\n\n")
    print(report.cross_family_report(pairs))

    kind = "sequence" if args.sequence else "synthetic"
    out = runio.make_run_dir(args.output_dir, kind)
    config = {"kind": kind, **synthetic.config_dict(cfg), "versions": runio.versions(*(("torch",) * args.sequence))}
    results = {"config": config, "pairs": pairs}
    runio.write_npz(out / runio.ARRAYS, arrays)
    runio.write_csv(out / runio.SUMMARY, synthetic.summary_rows(pairs))
    runio.write_json(out / runio.RESULTS, results)
    if not args.no_plots:
        from . import plots
        print(f"figures: {plots.draw_all(out)}")
    print(f"run folder: {out}")
    return 0


# ---------------------------------------------------------------- visualize_proposals.py

def visualize_main(argv=None, prog: str = "visualize_proposals.py", **defaults) -> int:
    from . import plots

    p = Parser(prog=prog, description="Draw every figure of a synthetic run folder from its saved files "
                                      "(results.json + distributions.npz) into <run folder>/plots/, with an "
                                      "index.html.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_folder", help="a folder written by Synthetic_tests.py")
    p.add_argument("--format", default=defaults.get("format", "png"), help=f"one of {', '.join(plots.FORMATS)}")
    p.add_argument("--pairs", nargs="+", help="only these pairs, e.g. zipf/medium mixture/high")
    p.add_argument("--methods", nargs="+", help="only these proposals in per-proposal figures (quote names)")
    args = p.parse_args(argv)
    try:
        index = plots.draw_all(args.run_folder, args.format, args.pairs and _names(args.pairs), args.methods)
    except ValueError as err:
        return fail(prog, str(err))
    print(f"figures: {index}")
    return 0


# ---------------------------------------------------------------- LLM_experiments.py

def llm_main(argv=None, prog: str = "LLM_experiments.py", **defaults) -> int:
    from .llm import LLMConfig

    d = {**vars(LLMConfig()), **defaults}
    p = Parser(prog=prog, description="KL(P‖Q) between two causal LMs: sequences sampled token by token from each "
                                      "proposal, every estimator (MC/IS, SNIS, RB/RB-IS, k3) from one sample set.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--p-model", default=d["p_model"], help="base model P: transformers id or local folder "
                                                           "(default with --q-model unset: the offline default pair)")
    p.add_argument("--q-model", default=d["q_model"], help="fine-tuned model Q: transformers id or local folder")
    p.add_argument("--prompt", default=d["prompt"])
    p.add_argument("--n-reps", type=int, default=d["n_reps"], help="sequences per proposal")
    p.add_argument("--t-length", type=int, default=d["t_length"], help="new tokens per sequence (the KL is of the "
                                                                      "process truncated there)")
    p.add_argument("--temperature", type=float, default=d["temperature"], help="applied to both P and Q")
    p.add_argument("--proposals", nargs="+", default=list(d["proposals"]),
                   help="'P' (plain MC), registry names such as 'Geometric (β=0.5)', optionally + ' [prefix-aware]'")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--device", default=d["device"], help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=d["dtype"], help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, "
                                                       "float16; log-softmax is float32 whatever this is")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--output-folder", default=d["output_folder"])
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-folder")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --output-folder")
    p.add_argument("--ignore-eos", action="store_true", help="keep sampling after EOS (always t-length tokens)")
    p.add_argument("--sampler", default=d["sampler"], help="how sequences are drawn: " + ", ".join(_samplers()) +
                   " (other than iid: each batch of --batch-size sequences is one randomization; standard errors "
                   "come from the spread between batches)")
    args = p.parse_args(argv)
    cfg = LLMConfig(**{k: getattr(args, k) for k in vars(LLMConfig()) if hasattr(args, k)})
    try:
        return _run_llm(cfg)
    except ValueError as err:
        return fail(prog, str(err))


def _run_llm(cfg) -> int:
    from tqdm import tqdm

    from . import llm, report

    cfg.validate()
    runio.check_output_dir(cfg.output_folder, "--output-folder")
    earlier = llm.existing_outputs(cfg.output_folder, cfg.proposals)
    if earlier and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--output-folder: {cfg.output_folder} already holds results ({earlier[0].name}); pass "
                         f"--resume to continue or reuse them, --overwrite to replace them, or choose another folder")
    pair, models = llm.load_pair(cfg)

    def bar(**kw):
        return tqdm(unit="batch", leave=False, disable=None, **kw)

    run = llm.run_experiment(pair, cfg, models, cfg.output_folder, bar)
    rows = run["rows"]
    print(report.llm_table(rows, f"KL(P‖Q) per sequence, {cfg.n_reps} sequences × {len(run['docs'])} proposals, "
                                 f"T={cfg.t_length}, temperature {cfg.temperature}"))
    print("\nNo exact KL exists for real LMs: RB (exact per-step KL along sequences from P) is the low-variance "
          "reference; IS rows with large k̂ or tiny ESS are not to be trusted.")
    if cfg.sampler != "iid":
        method = next(iter(run["docs"][0]["estimates"].values())).get("std_error_method", "")
        print(f"sampler {cfg.sampler}: standard errors from the {method}")
    print(f"output folder: {cfg.output_folder}")
    return 0
