"""Command lines of the top-level scripts: argparse, validation → one-line error and exit status 2."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from kl_estimation import runio

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the text states it already as "(default …" (a default that
    depends on other flags, or None, is written into the text); on/off flags are off unless given. Defaults are
    shown as they would be typed: names with spaces quoted."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS) \
                or not action.option_strings:
            return text
        d = action.default
        shown = " ".join(map(shlex.quote, map(str, d))) if isinstance(d, (list, tuple)) else shlex.quote(str(d))
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage block) with exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):  # noqa: D102 - argparse hook
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch system or `kill`), handled like Ctrl-C: files closed, temporary folders removed."""


@contextmanager
def _sigterm_as_interrupt():
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted(prog: str, message: str) -> int:
    """One line on stderr (after the ^C the terminal shows, on a line of its own) and exit status 130."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        print(file=sys.stderr)
    print(f"{prog}: interrupted: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _python() -> str:
    found = shutil.which("python")
    return "python" if found and os.path.realpath(found) == os.path.realpath(sys.executable) else sys.executable


def _command(prog: str, argv) -> list[str]:
    """The command line as the user gave it: the script as run, or `prog` when called as a function."""
    script = sys.argv[0] if argv is None and sys.argv and sys.argv[0].endswith(".py") else prog
    return [_python(), script, *(sys.argv[1:] if argv is None else argv)]


def as_flag_name(name: str) -> str:
    """A parameter's command-line flag: `n_samples` → `--n-samples`."""
    return "--" + name.replace("_", "-")


def flag_text(text: str) -> str:
    """Parameters written `like_this` in library text become their flags on the command line."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: as_flag_name(m[1]), text)


def as_flag(message: str) -> str:
    """Library errors name their parameter ('n_samples: …', other parameters `in backticks`); on the command line
    each is its flag ('--n-samples: …')."""
    head, sep, rest = message.partition(": ")
    if sep and head.isidentifier():
        return f"{as_flag_name(head)}: {flag_text(rest)}"
    return flag_text(message)


def fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {as_flag(message)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _names(values: list[str]) -> list[str]:
    """Accept `--families zipf mixture` and `--families zipf,mixture` alike."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# ---------------------------------------------------------------- Synthetic_tests.py

def _samplers() -> list[str]:
    from kl_estimation.toy.markov import (
        SAMPLERS,  # not draws.DRAWS: single-token runs never load torch
    )

    return list(SAMPLERS)


def synthetic_parser(prog: str, defaults: dict) -> Parser:
    from kl_estimation.synthetic.distributions import DIVERGENCES, FAMILIES
    from kl_estimation.synthetic.experiment import SyntheticConfig

    d = {**vars(SyntheticConfig()), **defaults}
    p = Parser(prog=prog, description="Synthetic KL(P‖Q) experiments: naive MC, Rao-Blackwellized MC and importance "
                                      "sampling with every registry proposal on long-tailed token distributions, "
                                      "against exact values.")
    from kl_estimation.toy.markov import SequenceConfig

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
                   help="write the run's files here (default: a new folder under results/synthetic/, or "
                        "results/sequence/ with --sequence)")
    p.add_argument("--no-plots", action="store_true", default=d.get("no_plots", False),
                   help="skip the figures (draw them later with visualize_proposals.py)")
    p.add_argument("--sequence", action="store_true",
                   help="the sequence experiment: toy Markov pairs with exact sequence KL and exact variances")
    p.add_argument("--order", type=int, default=sd.order, help="--sequence: Markov order, 1 or 2")
    p.add_argument("--max-new-tokens", "--horizon", type=int, default=sd.max_new_tokens,
                   help="--sequence: tokens per sequence T")
    p.add_argument("--threads", type=int, default=d.get("threads"),
                   help="--sequence: CPU threads for torch (default: torch's choice, one per core)")
    p.add_argument("--sampler", nargs="+", default=list(sd.samplers),
                   help="--sequence: how sequences are drawn; samplers other than iid add MC / RB / RB+CV rows "
                        "(variance over repeats, each repeat one randomization); one of " + ", ".join(_samplers()))
    return p


def synthetic_main(argv=None, prog: str = "Synthetic_tests.py", **defaults) -> int:
    args = synthetic_parser(prog, defaults).parse_args(argv)
    with _sigterm_as_interrupt():
        try:
            return _run_synthetic(args, prog, defaults)
        except KeyboardInterrupt:
            done = getattr(args, "written", None)
            if done is None:
                return interrupted(prog, "nothing was written (a synthetic run writes its folder when its "
                                         "computations are done); run the same command again")
            return interrupted(prog, f"the run folder {done} is complete but its figures are not; draw them with: "
                                     f"{shlex.join([_python(), 'visualize_proposals.py', str(done)])}")


def _run_synthetic(args, prog: str, defaults: dict) -> int:
    from kl_estimation import progress, report
    from kl_estimation.synthetic import experiment as synthetic
    from kl_estimation.toy import markov as sequences

    mode = sequences if args.sequence else synthetic
    base = sequences.SequenceConfig() if args.sequence else synthetic.SyntheticConfig(**{
        k: v for k, v in defaults.items() if k in vars(synthetic.SyntheticConfig())})
    sizes = {k: getattr(args, k) if getattr(args, k) is not None else getattr(base, k)
             for k in ("vocab_size", "n_samples", "n_repeats")}
    common = dict(**sizes, divergence=args.divergence, families=tuple(_names(args.families)),
                  alpha_values=tuple(args.alpha_values), seed=args.seed)
    if args.sequence:
        cfg = sequences.SequenceConfig(**common, order=args.order, max_new_tokens=args.max_new_tokens,
                                       samplers=tuple(_names(args.sampler)))
    else:
        cfg = synthetic.SyntheticConfig(**common, rb_top_k=args.rb_top_k)
    kind = "sequence" if args.sequence else "synthetic"
    try:
        cfg.validate()
        runio.check_output_dir(args.output_dir, "output_dir", default=Path("results") / kind)
        if args.sequence:
            from kl_estimation.core.resources import set_threads

            set_threads(args.threads)
        with progress.bar(total=mode.n_steps(cfg), desc=f"{kind} run", unit="step") as bar:
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

    out = runio.make_run_dir(args.output_dir, kind)
    config = {"kind": kind, **synthetic.config_dict(cfg), "versions": runio.versions(*(("torch",) * args.sequence))}
    results = {"config": config, "pairs": pairs}
    runio.write_npz(out / runio.ARRAYS, arrays)
    runio.write_csv(out / runio.SUMMARY, synthetic.summary_rows(pairs))
    runio.write_json(out / runio.RESULTS, results)
    args.written = out
    if not args.no_plots:
        from kl_estimation.figures import synthetic as plots
        print(f"figures: {plots.draw_all(out)}")
    print(f"run folder: {out}")
    return 0


# ---------------------------------------------------------------- visualize_proposals.py

def visualize_parser(prog: str, defaults: dict) -> Parser:
    from kl_estimation.figures import synthetic as plots

    p = Parser(prog=prog, description="Draw every figure of a run folder from its saved files into <run folder>/plots/, "
                                      "with an index.html: a synthetic or sequence run of Synthetic_tests.py "
                                      "(results.json + distributions.npz) or an LLM run of LLM_experiments.py "
                                      "(summary.json + one JSON file per proposal).")
    p.add_argument("run_folder", help="a folder written by Synthetic_tests.py or LLM_experiments.py")
    p.add_argument("--format", default=defaults.get("format", "png"), help=f"one of {', '.join(plots.FORMATS)}")
    p.add_argument("--pairs", nargs="+", help="synthetic runs: redraw only these pairs, e.g. zipf/medium "
                                              "mixture/high; the other pairs' figures are kept (default: every pair)")
    p.add_argument("--methods", nargs="+", help="only these proposals in per-proposal figures, names quoted "
                                                "(default: all)")
    return p


def visualize_main(argv=None, prog: str = "visualize_proposals.py", **defaults) -> int:
    args = visualize_parser(prog, defaults).parse_args(argv)
    with _sigterm_as_interrupt():
        try:
            index = draw_figures(args.run_folder, args.format, args.pairs and _names(args.pairs), args.methods)
        except ValueError as err:
            return fail(prog, str(err))
        except KeyboardInterrupt:
            return interrupted(prog, "no figure was half-written (each replaces its file only when complete); run the "
                                     "same command again to draw them all")
    print(f"figures: {index}")
    return 0


def draw_figures(folder, fmt: str = "png", pairs=None, methods=None):
    """Figures of any run folder: an LLM run (summary.json, per-proposal files) or a synthetic / sequence run."""
    from kl_estimation.figures import synthetic as plots

    folder = Path(folder)
    corpus_run = (folder / "tokens.npz").is_file() and (folder / "summary.json").is_file()
    if corpus_run or (folder / "comparison.json").is_file():  # a corpus run, or several candidates against one base
        return _corpus_figures(folder, fmt, pairs or methods)
    if (folder / "summary.json").is_file() and not (folder / runio.RESULTS).exists():
        from kl_estimation.figures import llm as plots_llm

        if pairs:
            raise ValueError("--pairs: an LLM run folder has no pairs (give --methods to narrow its proposals)")
        return plots_llm.draw_all(folder, fmt, methods)
    return plots.draw_all(folder, fmt, pairs, methods)


# ---------------------------------------------------------------- LLM_experiments.py

def llm_parser(prog: str, defaults: dict) -> Parser:
    """Every LLMConfig setting as `--name-with-dashes` (plus its aliases), with the same defaults as the API."""
    from kl_estimation.llm.run.config import LLMConfig

    p = Parser(prog=prog, description="KL(P‖Q) between two causal LMs: sequences sampled token by token from each "
                                      "proposal, every estimator (MC/IS, SNIS, RB/RB-IS, k3) from one sample set; "
                                      "figures at the end (see visualize_proposals.py). Corpus mode, teacher-forced "
                                      "KL over a text as llama.cpp's perplexity tool measures it: --corpus FILE (its "
                                      "flags: --corpus FILE --help).")
    big = p.add_argument_group("big models (pip install 'kl-estimation[scale]'); data parallel: torchrun "
                                "--nproc-per-node N LLM_experiments.py …")
    add_settings(p, big, LLMConfig, defaults)
    p.add_argument("--no-plots", action="store_true", default=defaults.get("no_plots", False),
                   help="skip the figures (draw them later with visualize_proposals.py)")
    return p


_BIG_MODELS = ("p_dtype", "q_dtype", "p_adapter", "q_adapter", "device_map", "offload")


def add_settings(parser, big, config_cls, defaults: dict) -> None:
    """Every setting of `config_cls` (its ``settings()`` with their metadata) as `--name-with-dashes` plus its
    aliases, with the config's default unless `defaults` (a script's __main__) overrides it."""
    for name, f in config_cls.settings().items():
        m = f.metadata
        if not m["flag"]:
            continue
        default = defaults.get(name, f.default)
        text = m["help"] if default is not None or "(default" in m["help"] else m["help"] + " (default: none)"
        kw = dict(dest=name, default=default, help=flag_text(text))
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            kw.update({k: m[k] for k in ("type", "nargs") if m[k]})
            if m["nargs"] and default is not None:
                kw["default"] = list(default)
        (big if name in _BIG_MODELS else parser).add_argument(as_flag_name(name), *m["aliases"], **kw)


LLM_RUNS = Path("tests2")  # the seed's output root: each run without --output-dir gets a new folder in it


def llm_main(argv=None, prog: str = "LLM_experiments.py", **defaults) -> int:
    from kl_estimation.llm.run.config import LLMConfig

    if corpus_requested(argv):  # --corpus FILE (or another corpus-only flag): a teacher-forced corpus run
        return corpus_main(argv, prog, **defaults)
    args = llm_parser(prog, defaults).parse_args(argv)
    settings = {k: getattr(args, k) for k in LLMConfig.settings() if hasattr(args, k)}
    settings["proposals"] = tuple(settings["proposals"])
    reserved = None
    if settings["output_dir"] is None and not settings["resume"]:
        reserved = runio.make_run_dir(None, "", root=LLM_RUNS)  # a new folder: runs never collide
        settings["output_dir"] = str(reserved)
    cfg = LLMConfig(**settings)
    folder_existed = reserved is None and Path(cfg.output_dir or ".").exists()
    with _sigterm_as_interrupt():
        try:
            return _run_llm(cfg, plots=not args.no_plots)
        except ValueError as err:
            _remove_if_empty(reserved)
            return fail(prog, str(err))
        except KeyboardInterrupt:
            return interrupted(prog, _kept(cfg, folder_existed, _command(prog, argv)))


def _remove_if_empty(folder) -> None:
    if folder is not None and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _kept(cfg, folder_existed: bool, command: list[str]) -> str:
    """What an interrupted LLM run kept, and the command that continues it."""
    from kl_estimation.llm.run.store import kept

    folder = Path(cfg.output_dir)
    parts_of_run = [(d, name) for d in cfg.directions for name in cfg.proposals]
    done, batches, sequences = kept(folder, parts_of_run)
    if not done and not batches:
        if not folder_existed:
            _remove_if_empty(folder)
        return f"no sequence was kept ({cfg.output_dir} holds nothing of this run); run the same command again"
    args = [a for a in command[2:] if a != "--overwrite"]
    if not any(a in ("--output-dir", "--output-folder") or a.startswith(("--output-dir=", "--output-folder="))
               for a in args):
        args += ["--output-dir", str(cfg.output_dir)]  # the folder this run chose for itself
    resume = shlex.join(command[:2] + args + ([] if "--resume" in args else ["--resume"]))
    unit = "proposals" if len(cfg.directions) == 1 else "proposals × directions"
    parts = [f"{len(done)} of {len(parts_of_run)} {unit} complete"] if done else []
    if batches:
        parts.append(f"{batches} finished batches ({sequences} sequences) of the next")
    return f"kept {' and '.join(parts)} in {cfg.output_dir}; continue with: {resume}"


def _run_llm(cfg, plots: bool = True) -> int:
    from kl_estimation import api, report
    from kl_estimation.llm.run import distributed
    from kl_estimation.llm.run.directions import direction_title, recommendation_scope

    result = api.run(cfg, progress=True)
    if distributed.current().rank != 0:  # under torchrun rank 0 alone reports
        return 0
    directions = cfg.directions
    for i, d in enumerate(directions):  # one table per direction, each ranked and judged on its own
        print(("\n" if i else "") + report.llm_table(
            [r.to_dict() for r in result.rows_for(d)],
            f"{direction_title(d)}, {cfg.n_samples} sequences × {len(cfg.proposals)} proposals"
            f"{f' × {len(cfg.prompt_set)} prompts' if len(cfg.prompt_set) > 1 else ''}, "
            f"T={cfg.max_new_tokens}, temperature {cfg.temperature}"))
    if "reverse" in directions:
        print("\nreverse: every proposal is built from Q (the sampling model) and P with the roles swapped, so "
              "plain Monte Carlo from Q is the row Q; the flags speak of the models by their names.")
    if result.per_prompt:
        print(f"\nOver {len(result.per_prompt)} prompts: the estimate is the mean of the per-prompt estimates; "
              f"'std err' is for this fixed prompt set (within-prompt noise only); the population SE (prompts as a "
              f"sample, their spread included) is std_error_population in summary.csv / summary.json.")
    if cfg.sampler != "iid":
        method = next(iter(result.docs[0]["estimates"].values())).get("std_error_method", "")
        print(f"\nsampler {cfg.sampler}: standard errors from the {method}")
    if plots:
        from kl_estimation.figures import llm as plots_llm

        print(f"\nfigures: {plots_llm.draw_all(cfg.output_dir)}")
    print(f"output folder: {cfg.output_dir}")
    for d in directions:  # what to report, per direction: one block (a line per prompt, one overall line)
        view = dict(per_prompt=[dict(p, recommended=p["recommended_by_direction"][d],
                                     advice=p["advice_by_direction"].get(d)) for p in result.per_prompt],
                    recommended=result.recommended_by_direction[d], advice=result.advice_by_direction.get(d))
        print(report.recommendation_block(view, max_new_tokens=cfg.max_new_tokens,
                                          scope=recommendation_scope(d, len(directions))))
    if result.jeffreys is not None:  # both directions: their sum last
        for p in result.per_prompt:
            print(report.jeffreys_line(p["jeffreys"].to_dict(), f"for prompt {p['prompt']}"))
        print(report.jeffreys_line(result.jeffreys.to_dict(), "over the prompt set" if result.per_prompt else ""))
    return 0


# ---------------------------------------------------------------- LLM_experiments.py --corpus

def _corpus_only_flags() -> set[str]:
    from kl_estimation.llm.corpus.config import CorpusConfig
    from kl_estimation.llm.run.config import LLMConfig

    return {as_flag_name(n) for n in CorpusConfig.settings() if n not in LLMConfig.settings()
            and CorpusConfig.settings()[n].metadata["flag"]}


def corpus_requested(argv) -> bool:
    """Whether a command line asks for a corpus run: `--corpus FILE`, or any flag only a corpus run has
    (`--text-field`, `--token-ids`, `--context`, …)."""
    args = sys.argv[1:] if argv is None else list(argv)
    only = _corpus_only_flags()
    return any(a.split("=", 1)[0] in only for a in args if a.startswith("--"))


def corpus_parser(prog: str, defaults: dict) -> Parser:
    """Every CorpusConfig setting as `--name-with-dashes`, built like llm_parser (the shared settings are
    LLMConfig's own, with the same names and defaults)."""
    from kl_estimation.llm.corpus.config import CorpusConfig

    p = Parser(prog=prog, description="Corpus mode (--corpus FILE, --dataset NAME --text-field F, or --token-ids "
                                      "FILE): teacher-forced KL(P‖Q) and KL(Q‖P) of every scored token of a text, "
                                      "both models on llama.cpp's windows in one pass; llama.cpp's "
                                      "--kl-divergence statistics one to one, with clustered standard errors. A "
                                      "corpus run never samples.")
    big = p.add_argument_group("big models (pip install 'kl-estimation[scale]')")
    add_settings(p, big, CorpusConfig, defaults)
    p.add_argument("--no-plots", action="store_true", default=defaults.get("no_plots", False),
                   help="skip the figures (draw them later with visualize_proposals.py RUN_FOLDER)")
    return p


def corpus_main(argv=None, prog: str = "LLM_experiments.py", **defaults) -> int:
    """A corpus run from the command line: one line and exit 2 on bad input, nothing written."""
    from kl_estimation.llm.corpus.config import CorpusConfig
    from kl_estimation.llm.corpus.run import run_corpus

    known = CorpusConfig.settings()
    args = corpus_parser(prog, {k: v for k, v in defaults.items() if k in known or k == "no_plots"}).parse_args(argv)
    cfg = CorpusConfig(**{k: getattr(args, k) for k in known if hasattr(args, k)})
    given = cfg.output_dir is not None
    if not given:
        cfg.output_dir = str(_new_corpus_folder())
    with _sigterm_as_interrupt():
        try:
            result = run_corpus(cfg, progress=True)
        except ValueError as err:
            return fail(prog, str(err))
        except KeyboardInterrupt:
            return interrupted(prog, "nothing was written (a corpus run writes its folder when every window is "
                                     "scored); run the same command again")
        if isinstance(result, Path):  # save_base alone: P's cache, no candidate
            print(f"base cache: {result}")
            return 0
        print(result.text)
        if not args.no_plots:
            try:
                print(f"figures: {_corpus_figures(result.folder, 'png')}")
            except KeyboardInterrupt:
                return interrupted(prog, f"the run folder {result.folder} is complete but its figures are not; draw "
                                         f"them with: {shlex.join([_python(), 'visualize_proposals.py', str(result.folder)])}")
    print(f"run folder: {result.folder}")
    return 0


def _new_corpus_folder() -> Path:
    """A folder name under tests2/corpus/ not taken yet; created only when the run writes (nothing on bad input)."""
    from datetime import datetime

    base = LLM_RUNS / "corpus"
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for i in range(1000):
        p = base / (stamp if i == 0 else f"{stamp}-{i}")
        if not p.exists():
            return p
    raise RuntimeError(f"could not find a free run folder name under {base}")


def _corpus_figures(folder, fmt: str = "png", selection=None):
    from kl_estimation.figures import corpus as corpus_figures

    if selection:
        raise ValueError("--pairs: a corpus run folder has no pairs or proposals to select")
    if (Path(folder) / "comparison.json").is_file():
        return corpus_figures.draw_comparison(folder, fmt)
    return corpus_figures.draw_all(folder, fmt)
