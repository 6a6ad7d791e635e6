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
from dataclasses import replace
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


class _Interrupts:
    """The last signal seen (False: none) and whether an interruption was reported, during one command."""

    seen = reported = False


@contextmanager
def _signals_as_interrupts(prog: str):
    """SIGTERM raises Terminated and SIGINT KeyboardInterrupt, as Python's own handler does. Python drops an
    exception raised inside a finalizer or an at-fork hook ("Exception ignored in …", with a traceback): such a
    signal is delivered again, quietly, once the finalizer has returned, so the work stops where it would have.
    A signal seen but never reported still ends the command with status 130."""
    def handler(signum, frame):
        if signum != getattr(signal, "SIGALRM", None):
            _Interrupts.seen = signum
        raise Terminated() if _Interrupts.seen == signal.SIGTERM else KeyboardInterrupt()

    def unraisable(info):
        if isinstance(info.exc_value, KeyboardInterrupt) and _Interrupts.seen and redeliver:
            signal.setitimer(signal.ITIMER_REAL, 0.01)  # SIGALRM → handler, after the finalizer has returned
        else:
            previous_hook(info)

    _Interrupts.seen = _Interrupts.reported = False
    redeliver = hasattr(signal, "setitimer")  # not on Windows: there the status-130 line below remains
    caught = (signal.SIGINT, signal.SIGTERM, *([signal.SIGALRM] if redeliver else []))
    try:
        previous = {s: signal.signal(s, handler) for s in caught}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        if redeliver:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in previous.items():
            signal.signal(s, h)
    if _Interrupts.seen and not _Interrupts.reported:
        sys.exit(interrupted(prog, "the signal came as the work ended; every file written is complete"))


def interrupted(prog: str, message: str) -> int:
    """One line on stderr (after the ^C the terminal shows, on a line of its own) and exit status 130."""
    _Interrupts.reported = True
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


def _print_path(label: str, path) -> None:
    """A folder or file the run wrote, printed whole (report.path_line: on the label's line when it fits)."""
    from kl_estimation.report import path_line

    print(path_line(label, path))


def given_settings(parser, argv) -> list[tuple[str, str]]:
    """(flag as typed, setting) of every option of `parser` on the command line, in order: which settings a user
    gave, whatever alias or `--flag=value` form they used."""
    args = sys.argv[1:] if argv is None else list(argv)
    out = []
    for a in args:
        action = parser._option_string_actions.get(a.split("=", 1)[0]) if a.startswith("--") else None
        if action is not None:
            out.append((a.split("=", 1)[0], action.dest))
    return out


def _names(values: list[str]) -> list[str]:
    """Accept `--families zipf mixture` and `--families zipf,mixture` alike."""
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


# ---------------------------------------------------------------- Synthetic_tests.py

def synthetic_parser(prog: str, defaults: dict) -> Parser:
    """SyntheticConfig's settings, then the sequence run's own (SequenceConfig's, "--sequence: …"), as add_settings
    builds them; a size whose default differs in a sequence run states both and defaults to None."""
    from kl_estimation.synthetic.experiment import SyntheticConfig
    from kl_estimation.toy.markov import SequenceConfig

    d = {**vars(SyntheticConfig()), **defaults}
    p = Parser(prog=prog, description="Synthetic KL(P‖Q) experiments: naive MC, Rao-Blackwellized MC and importance "
                                      "sampling with every registry proposal on long-tailed token distributions, "
                                      "against exact values.")
    seq = SequenceConfig.settings()
    for name, f in SyntheticConfig.settings().items():
        if name in seq and seq[name].default != f.default:
            add_setting(p, name, f, None, f"{f.metadata['help']} (default {d[name]}; with --sequence "
                                          f"{seq[name].default})")
        else:
            add_setting(p, name, f, d[name])
    p.add_argument("--output-dir", default=d.get("output_dir"),
                   help="write the run's files here (default: a new folder under results/synthetic/, or "
                        "results/sequence/ with --sequence)")
    p.add_argument("--no-plots", action="store_true", default=d.get("no_plots", False),
                   help="skip the figures (draw them later with visualize_proposals.py)")
    p.add_argument("--sequence", action="store_true",
                   help="the sequence experiment: toy Markov pairs with exact sequence KL and exact variances")
    p.add_argument("--threads", type=int, default=d.get("threads"),
                   help="--sequence: CPU threads for torch (default: torch's choice, one per core)")
    for name, f in seq.items():
        if name not in d:
            add_setting(p, name, f, f.default, "--sequence: " + f.metadata["help"])
    return p


def synthetic_main(argv=None, prog: str = "Synthetic_tests.py", **defaults) -> int:
    with _signals_as_interrupts(prog):
        try:  # Ctrl-C while the parser's imports load is an interruption like any other
            parser = synthetic_parser(prog, defaults)
            args = parser.parse_args(argv)
            if (message := synthetic_mode_mixup(parser, argv, args.sequence)) is not None:
                return fail(prog, message)
            return _run_synthetic(args, prog, defaults)
        except KeyboardInterrupt:
            return interrupted(prog, "nothing was written (a synthetic run writes its folder when its computations "
                                     "are done); run the same command again")


def synthetic_mode_mixup(parser, argv, sequence: bool) -> str | None:
    """A flag of the other kind of synthetic run (`--order` without `--sequence`, `--rb-top-k` with it): the line
    that says so (settings.other_mode, as the configs define the two kinds), or None."""
    from kl_estimation.settings import other_mode
    from kl_estimation.synthetic.experiment import SyntheticConfig
    from kl_estimation.toy.markov import SequenceConfig

    run, other = (SequenceConfig, SyntheticConfig) if sequence else (SyntheticConfig, SequenceConfig)
    because = "`sequence` makes this a sequence run" if sequence else "without `sequence` this is a synthetic run"
    for _, name in given_settings(parser, argv):
        if name == "threads" and not sequence:  # torch's threads: only a sequence run uses torch
            return f"threads: a setting of {SequenceConfig.RUNS}; {because}{SyntheticConfig.NATURE}"
        if (message := other_mode(name, run, other, because)) is not None:
            return message
    return None


def _run_synthetic(args, prog: str, defaults: dict) -> int:
    from kl_estimation import report
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
                                       samplers=tuple(_names(args.samplers)))
    else:
        cfg = synthetic.SyntheticConfig(**common, rb_top_k=args.rb_top_k)
    kind = "sequence" if args.sequence else "synthetic"
    try:
        cfg.validate()
        runio.check_output_dir(args.output_dir, "output_dir", default=Path("results") / kind)
        given = args.output_dir is not None
        with runio.RunFolder(args.output_dir if given else runio.new_run_dir(kind), fresh=not given) as out:
            if args.sequence:
                from kl_estimation.core.resources import set_threads

                set_threads(args.threads)
            pairs, arrays = mode.run(cfg, progress=True)
            for pair in pairs:
                print(report.pair_report(pair, cfg.n_samples, cfg.n_repeats), end="\n\n")
                ratios = [m for m in pair["methods"] if m.get("variance_ratio_iid_rb") is not None]
                if ratios:  # rows of samplers with dependent sequences: variance over repeats (one randomization each)
                    print(report.prose("variance over repeats × n / exact variance of i.i.d. RB: " + ", ".join(
                        f"{m['name']} {m['variance_ratio_iid_rb']:.3f}" for m in ratios)), end="\n\n")
            print(report.cross_family_report(pairs))
            result = synthetic.SyntheticResult.of(cfg, kind, pairs, arrays,
                                                  runio.versions(*(("torch",) * args.sequence)))
            try:
                result.save(out)
            except KeyboardInterrupt:
                if result.path is None:
                    raise
                return _no_figures(prog, out)  # the signal came as the files landed
            return _figures(prog, out, None if args.no_plots else "synthetic")
    except ValueError as err:
        return fail(prog, str(err))


def _figures(prog: str, folder: Path, kind: str | None) -> int:
    """The end of a run whose folder is complete: its figures (`kind`: which module of kl_estimation.figures draws
    them; None: none), then the folder's name. Ctrl-C while they are drawn keeps the folder and names the command
    that draws them."""
    try:
        if kind is not None:
            from importlib import import_module

            _print_path("figures:", import_module(f"kl_estimation.figures.{kind}").draw_all(folder))
    except KeyboardInterrupt:
        return _no_figures(prog, folder)
    _print_path("run folder:", folder)
    return 0


def _no_figures(prog: str, folder: Path) -> int:
    return interrupted(prog, f"the run folder {folder} is complete but its figures are not; draw them with: "
                             f"{shlex.join([_python(), 'visualize_proposals.py', str(folder)])}")


# ---------------------------------------------------------------- visualize_proposals.py

def visualize_parser(prog: str, defaults: dict) -> Parser:
    from kl_estimation.figures import synthetic as plots

    p = Parser(prog=prog, description="Draw every figure of a run folder from its saved files into "
                                      "<run folder>/plots/, with an index.html: a synthetic or sequence run of "
                                      "Synthetic_tests.py (results.json + distributions.npz) or an LLM run of "
                                      "LLM_experiments.py "
                                      "(summary.json + one JSON file per proposal).")
    p.add_argument("run_folder", help="a folder written by Synthetic_tests.py or LLM_experiments.py")
    p.add_argument("--format", default=defaults.get("format", "png"), help=f"one of {', '.join(plots.FORMATS)}")
    p.add_argument("--pairs", nargs="+", help="synthetic runs: redraw only these pairs, e.g. zipf/medium "
                                              "mixture/high; the other pairs' figures are kept (default: every pair)")
    p.add_argument("--methods", nargs="+", help="only these proposals in per-proposal figures, names quoted "
                                                "(default: all)")
    return p


def visualize_main(argv=None, prog: str = "visualize_proposals.py", **defaults) -> int:
    with _signals_as_interrupts(prog):
        try:
            args = visualize_parser(prog, defaults).parse_args(argv)
            index = draw_figures(args.run_folder, args.format, args.pairs and _names(args.pairs), args.methods)
        except ValueError as err:
            return fail(prog, str(err))
        except KeyboardInterrupt:
            return interrupted(prog, "no figure was half-written (each replaces its file only when complete); run the "
                                     "same command again to draw them all")
    _print_path("figures:", index)
    return 0


def draw_figures(folder, fmt: str = "png", pairs=None, methods=None):
    """Figures of any run folder: an LLM run (summary.json, per-proposal files) or a synthetic / sequence run."""
    from kl_estimation.figures import synthetic as plots

    folder = Path(folder)
    corpus_run = (folder / "tokens.npz").is_file() and (folder / "summary.json").is_file()
    if (folder / "comparison.json").is_file() and '"llm-candidates"' in (folder / "comparison.json").read_text():
        from kl_estimation.figures import llm as plots_llm  # several candidates of a sampled run

        return plots_llm.candidates_figure(folder, folder / "plots" / f"candidates.{fmt}")
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
        if f.metadata["flag"]:
            add_setting(big if name in _BIG_MODELS else parser, name, f, defaults.get(name, f.default))


def add_setting(parser, name: str, f, default, help: str | None = None) -> None:
    """One config field as its flag (``--`` + the name with dashes, or the flag its metadata names) plus its
    aliases, read into `name`; `help` replaces the field's own."""
    m = f.metadata
    text = m["help"] if help is None else help
    text = text if default is not None or "(default" in text else text + " (default: none)"
    kw = dict(dest=name, default=default, help=flag_text(text))
    if isinstance(f.default, bool):
        kw["action"] = "store_true"
    else:
        kw.update({k: m[k] for k in ("type", "nargs") if m[k]})
        if m["nargs"] and default is not None:
            kw["default"] = list(default)
        if isinstance(m["flag"], str):  # the value is named after the flag (SAMPLER), not the field (SAMPLERS)
            kw["metavar"] = m["flag"].upper()
    parser.add_argument(as_flag_name(m["flag"] if isinstance(m["flag"], str) else name), *m["aliases"], **kw)


LLM_RUNS = Path("tests2")  # the seed's output root: each run without --output-dir gets a new folder in it


NOTHING_WRITTEN = "nothing was written; run the same command again"


def llm_main(argv=None, prog: str = "LLM_experiments.py", **defaults) -> int:
    cfg = reserved = None
    with _signals_as_interrupts(prog):
        try:  # from the first import on: Ctrl-C at any moment is one line and status 130
            from kl_estimation.llm.run.config import LLMConfig

            if corpus_requested(argv):  # --corpus FILE (or another corpus-only flag): a teacher-forced corpus run
                return corpus_main(argv, prog, **defaults)
            args = llm_parser(prog, defaults).parse_args(argv)
            settings = {k: getattr(args, k) for k in LLMConfig.settings() if hasattr(args, k)}
            settings["proposals"] = tuple(settings["proposals"])
            if settings["output_dir"] is None and not settings["resume"]:
                reserved = runio.new_run_dir("", root=LLM_RUNS)  # a new folder: runs never collide
                settings["output_dir"] = str(reserved)
            # validated: the prompt set and the proposals' labels, for what an interruption kept
            cfg = LLMConfig(**settings).validate()
            return _run_llm(cfg, plots=not args.no_plots)
        except ValueError as err:
            return fail(prog, str(err))
        except KeyboardInterrupt:
            return interrupted(prog, NOTHING_WRITTEN if cfg is None else _kept(cfg, _command(prog, argv)))
        finally:
            runio.remove_if_empty(reserved, parents=1)


def _kept(cfg, command: list[str]) -> str:
    """What an interrupted LLM run kept, and the command that continues it."""
    from kl_estimation.llm.run.store import kept

    folder = Path(cfg.output_dir)
    parts_of_run = [(d, name) for d in cfg.directions for name in cfg.proposals]
    done, batches, sequences = kept(folder, parts_of_run)
    if not done and not batches:
        return f"no sequence was kept ({cfg.output_dir} holds nothing of this run); run the same command again"
    args = [a for a in command[2:] if a != "--overwrite"]
    if not any(a in ("--output-dir", "--output-folder") or a.startswith(("--output-dir=", "--output-folder="))
               for a in args):
        args += ["--output-dir", str(cfg.output_dir)]  # the folder this run chose for itself
    resume = shlex.join(command[:2] + args + ([] if "--resume" in args else ["--resume"]))
    from kl_estimation.llm.engine import proposal_label

    unit = "proposals" if len(cfg.directions) == 1 else "proposals × directions"
    parts = [f"{len(done)} of {len(parts_of_run)} {unit} complete"] if done else []
    if batches:  # the part being drawn: the first one not complete (parts run in order)
        d, name = next(p for p in parts_of_run if p not in done)
        where = f"{d} " if len(cfg.directions) > 1 else ""
        parts.append(f"{sequences} sequences ({batches} batch{'es' * (batches != 1)}) of {where}"
                     f"{proposal_label(name, d)}")
    return f"kept in {cfg.output_dir}: {', '.join(parts)}; continue with: {resume}"


def _run_llm(cfg, plots: bool = True) -> int:
    from kl_estimation import api, report
    from kl_estimation.cost import say_on_stderr
    from kl_estimation.llm.run import distributed
    from kl_estimation.llm.run.directions import direction_title, recommendation_scope

    result = api.run(cfg, progress=True, say=say_on_stderr(flags=True))
    if distributed.current().rank != 0:  # under torchrun rank 0 alone reports
        return 0
    if cfg.several:  # several candidates against one P: their comparison (llm.run.candidates)
        from kl_estimation.llm.run.candidates import console

        print(console(result, plots))
        return 0
    directions = cfg.directions
    for i, d in enumerate(directions):  # one table per direction, each ranked and judged on its own
        print(("\n" if i else "") + report.llm_table(
            result.rows_for(d),
            f"{direction_title(d)}, {cfg.n_samples} sequences × {len(cfg.proposals)} proposals"
            f"{f' × {len(cfg.prompt_set)} prompts' if len(cfg.prompt_set) > 1 else ''}, "
            f"T={cfg.max_new_tokens}, temperature {cfg.temperature}"))
    if "reverse" in directions:
        print(report.prose("\nreverse: every proposal is built from Q (the sampling model) and P with the roles "
                           "swapped, so plain Monte Carlo from Q is the row Q; the flags speak of the models by "
                           "their names."))
    if result.per_prompt:
        print(report.prose(f"\nOver {len(result.per_prompt)} prompts: the estimate is the mean of the per-prompt "
                           f"estimates; 'std err' is for this fixed prompt set (within-prompt noise only); the "
                           f"population SE (prompts as a sample, their spread included) is std_error_population in "
                           f"summary.csv / summary.json."))
    if cfg.sampler != "iid":
        method = next(iter(result.docs[0]["estimates"].values())).get("std_error_method", "")
        print(report.prose(f"\nsampler {cfg.sampler}: standard errors from the {method}"))
    if plots:
        from kl_estimation.figures import llm as plots_llm

        print()
        _print_path("figures:", plots_llm.draw_all(cfg.output_dir))
    _print_path("output folder:", cfg.output_dir)
    for d in directions:  # what to report, per direction: one block (a line per prompt, one overall line)
        print(report.recommendation_block(result.view(d), max_new_tokens=cfg.max_new_tokens,
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


def corpus_mode_mixup(argv, prog: str) -> str | None:
    """A flag of sampled runs on a corpus command line: the line naming it and the flag that made this a corpus run
    (`--corpus`, or the first corpus-only flag), as the API says it (settings.other_mode); None if there is none."""
    from kl_estimation.llm.corpus.config import CorpusConfig
    from kl_estimation.llm.run.config import LLMConfig
    from kl_estimation.settings import other_mode

    given = given_settings(llm_parser(prog, {}), argv)
    only = _corpus_only_flags()
    chosen = [a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")
              and a.split("=", 1)[0] in only]
    selector = "--corpus" if "--corpus" in chosen else chosen[0] if chosen else "--corpus"
    because = f"`{selector[2:].replace('-', '_')}` makes this a corpus run"
    for _, name in given:
        if (message := other_mode(name, CorpusConfig, LLMConfig, because)) is not None:
            return message
    return None


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
    reserved = result = None
    with _signals_as_interrupts(prog):
        try:
            from kl_estimation.llm.corpus.config import CorpusConfig
            from kl_estimation.llm.corpus.run import run_corpus

            if (message := corpus_mode_mixup(argv, prog)) is not None:
                return fail(prog, message)
            known = CorpusConfig.settings()
            args = corpus_parser(prog, {k: v for k, v in defaults.items() if k in known or k == "no_plots"}
                                 ).parse_args(argv)
            cfg = CorpusConfig(**{k: getattr(args, k) for k in known if hasattr(args, k)})
            if cfg.output_dir is None:
                reserved = runio.new_run_dir("corpus", root=LLM_RUNS)  # a new folder: runs never collide
                cfg = replace(cfg, output_dir=str(reserved))
            from kl_estimation.cost import say_on_stderr

            result = run_corpus(cfg, progress=True, say=say_on_stderr(flags=True))
            if isinstance(result, Path):  # save_base alone: P's cache, no candidate
                from kl_estimation.llm.corpus.basecache import size_line

                _print_path("base cache:", result)
                print(f"  {size_line(result)}")
                return 0
            print(result.console())
            return _figures(prog, result.folder, None if args.no_plots else "corpus")
        except ValueError as err:
            return fail(prog, str(err))
        except KeyboardInterrupt:
            if result is not None:
                return interrupted(prog, f"the run folder {result.folder} is complete")
            return interrupted(prog, "nothing was written (a corpus run writes its folder when every window is "
                                     "scored); run the same command again")
        finally:
            runio.remove_if_empty(reserved, parents=2)


def _corpus_figures(folder, fmt: str = "png", selection=None):
    from kl_estimation.figures import corpus as corpus_figures

    if selection:
        raise ValueError("--pairs: a corpus run folder has no pairs or proposals to select")
    return corpus_figures.draw_all(folder, fmt)
