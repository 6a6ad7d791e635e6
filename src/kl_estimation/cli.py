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


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _names(values: list[str]) -> list[str]:
    """Accept `--families zipf mixture` and `--families zipf,mixture` alike."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# ---------------------------------------------------------------- Synthetic_tests.py

def synthetic_parser(prog: str, defaults: dict) -> Parser:
    from .distributions import DIVERGENCES, FAMILIES
    from .synthetic import SyntheticConfig

    d = {**vars(SyntheticConfig()), **defaults}
    p = Parser(prog=prog, description="Synthetic KL(P‖Q) experiments: naive MC, Rao-Blackwellized MC and importance "
                                      "sampling with every registry proposal on long-tailed token distributions, "
                                      "against exact values.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--vocab-size", type=int, default=d["vocab_size"], help="vocabulary size V")
    p.add_argument("--n-samples", type=int, default=d["n_samples"], help="samples per method and repeat")
    p.add_argument("--n-repeats", type=int, default=d["n_repeats"], help="independent repeats per method")
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
    return p


def synthetic_main(argv=None, prog: str = "Synthetic_tests.py", **defaults) -> int:
    from tqdm import tqdm

    from . import report, synthetic

    args = synthetic_parser(prog, defaults).parse_args(argv)
    cfg = synthetic.SyntheticConfig(
        vocab_size=args.vocab_size, n_samples=args.n_samples, n_repeats=args.n_repeats, divergence=args.divergence,
        families=tuple(_names(args.families)), alpha_values=tuple(args.alpha_values), rb_top_k=args.rb_top_k,
        seed=args.seed)
    try:
        cfg.validate()
        runio.check_output_dir(args.output_dir)
        total = len(cfg.divergences) * len(cfg.families) * synthetic.n_methods(cfg)
        with tqdm(total=total, desc="synthetic", unit="method", disable=None, leave=False) as bar:
            pairs, arrays = synthetic.run(cfg, progress=bar.update)
    except ValueError as err:
        return fail(prog, str(err))

    for pair in pairs:
        print(report.pair_report(pair, cfg.n_samples, cfg.n_repeats), end="\n\n")
    print(report.cross_family_report(pairs))

    out = runio.make_run_dir(args.output_dir, "synthetic")
    results = {"config": {**synthetic.config_dict(cfg), "versions": runio.versions()}, "pairs": pairs}
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
                                      "(results.json + distributions.npz) into <run folder>/plots/, with an index.html.",
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


def not_implemented_main(prog: str) -> int:
    print(f"{prog}: not implemented yet", file=sys.stderr)
    return 1
