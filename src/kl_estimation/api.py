"""The Python API of an LLM run: estimate_kl(...) → KLResult. The command line (LLM_experiments.py) is a thin layer
over the same `run` function."""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from kl_estimation import runio
from kl_estimation.core.resources import set_threads
from kl_estimation.core.results import Row
from kl_estimation.cost import CostEstimate
from kl_estimation.llm.run import distributed
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import load_pair, run_experiment
from kl_estimation.llm.run.store import check_folder, drop_unfinished

KLRow = Row  # one (proposal, estimator) estimate, typed: core.results.Row (its fields and to_dict are documented there)


@dataclass
class KLResult:
    """The outcome of estimate_kl: ranked rows (trusted rows first, smallest standard error first), the row to
    report (``recommended``), per-prompt results, and the raw per-proposal documents (records included).

    Directions: ``rows`` holds every direction's rows (forward first), each ranked on its own and carrying its
    ``direction``; ``recommended`` is the first direction's recommendation (forward, unless the run is reverse only),
    ``recommended_by_direction`` every direction's, ``jeffreys`` (runs of both directions) the row of
    KL(P‖Q) + KL(Q‖P) in nats per sequence; :meth:`rows_for` selects one direction's rows.

    ``cost_estimate`` (a cost.CostEstimate, or None where nothing was drawn or the result was loaded from a folder):
    what the run's first decoding steps said the whole would take on this machine — ``seconds``, the ``plan``, the
    cheapest ``reduction`` and its ``line()``, the one a run over cost.COST_LINE_SECONDS prints before its first
    batch is done."""

    rows: list[KLRow]
    recommended: KLRow | None
    per_prompt: list[dict]  # one per prompt: {"prompt": i, "text", "rows": [KLRow], "recommended": KLRow | None,
    #                         "recommended_by_direction": {direction: KLRow | None}, "jeffreys": KLRow (both)}
    config: dict = field(repr=False)
    docs: list[dict] = field(repr=False, default_factory=list)
    recommended_by_direction: dict = field(default_factory=dict)  # {"forward" / "reverse": KLRow | None}
    jeffreys: KLRow | None = None
    advice_by_direction: dict = field(default_factory=dict)  # {direction: what to change} where none is recommended
    cost_estimate: CostEstimate | None = field(default=None, repr=False)

    @property
    def directions(self) -> tuple:
        """The directions of the run, in run order."""
        return tuple(self.recommended_by_direction) or ("forward",)

    def rows_for(self, direction: str) -> list[KLRow]:
        """The ranked rows of one direction ("forward" or "reverse")."""
        return [r for r in self.rows if r.direction == direction]

    def view(self, direction: str | None = None) -> dict:
        """One direction's verdict (default: the first), as report.recommendation_block reads it: its
        recommendation and advice, overall and per prompt (with the prompt's text)."""
        d = direction or self.directions[0]
        return {"recommended": self.recommended_by_direction.get(d, self.recommended),
                "advice": self.advice_by_direction.get(d),
                "per_prompt": [dict(p, recommended=p.get("recommended_by_direction", {}).get(d, p["recommended"]),
                                    advice=p.get("advice_by_direction", {}).get(d)) for p in self.per_prompt]}

    def to_dict(self) -> dict:
        """As summary.json holds it: rows flat with their flag records, the advice in words."""
        def one(r):
            return r and r.to_dict()

        def words(a):
            return None if a is None else str(a)

        return {"config": self.config, "recommended": one(self.recommended),
                "rows": [r.to_dict() for r in self.rows],
                "recommended_by_direction": {d: one(r) for d, r in self.recommended_by_direction.items()},
                "advice_by_direction": {d: words(a) for d, a in self.advice_by_direction.items()},
                **({"jeffreys": one(self.jeffreys)} if self.jeffreys is not None else {}),
                "per_prompt": [dict(p, rows=[r.to_dict() for r in p["rows"]], recommended=one(p["recommended"]),
                                    recommended_by_direction={d: one(r) for d, r in
                                                              p.get("recommended_by_direction", {}).items()},
                                    advice_by_direction={d: words(a) for d, a in
                                                         p.get("advice_by_direction", {}).items()},
                                    **({"jeffreys": one(p["jeffreys"])} if "jeffreys" in p else {}))
                               for p in self.per_prompt]}

    @classmethod
    def load(cls, folder) -> KLResult:
        """The result of an LLM run from its folder (summary.json and the per-proposal files), as the run returned
        it — the same rows, records in ``docs``; numbers that were NaN read back as None (strict JSON)."""
        from kl_estimation.llm.run.store import load_run

        return result_of(load_run(folder))

    def to_pandas(self, per_prompt: bool = False):
        """The rows as a DataFrame (``per_prompt=True``: one row per prompt × proposal × estimator). Cells stay
        short: ``flag`` holds the codes; the messages are in each KLRow's ``flags`` (and ``messages``)."""
        import pandas as pd

        if not per_prompt:
            return pd.DataFrame([r.to_dict(records=False) for r in self.rows])
        return pd.DataFrame([dict(prompt=p["prompt"], text=p["text"], **r.to_dict(records=False))
                             for p in self.per_prompt for r in p["rows"]])

    def __str__(self) -> str:
        from kl_estimation.llm.run.directions import direction_title
        from kl_estimation.report import jeffreys_line, llm_table

        tables = [llm_table(self.rows_for(d), f"{direction_title(d)} (per sequence)") for d in self.directions]
        return "\n\n".join(tables + ([jeffreys_line(self.jeffreys.to_dict())] if self.jeffreys else []))


def _row(r) -> Row | None:
    """A Row as it is; a row read back from summary.json, or the Jeffreys row (a dict: a sum of two directions'
    rows), as a Row."""
    return r if r is None or isinstance(r, Row) else Row.from_dict(r)


def result_of(run: dict) -> KLResult:
    """A KLResult from run_experiment's output, or from a run folder read back (store.load_run: rows as dicts)."""
    rows = [_row(r) for r in run["rows"]]
    per_prompt = []
    for p in run["per_prompt"]:
        per_prompt.append(dict(prompt=p["prompt"], text=p["text"], rows=[_row(r) for r in p["rows"]],
                               recommended=_row(p["recommended"]),
                               recommended_by_direction={d: _row(r) for d, r in
                                                         p.get("recommended_by_direction", {}).items()},
                               advice_by_direction=p.get("advice_by_direction", {}),
                               **({"jeffreys": _row(p["jeffreys"])} if "jeffreys" in p else {})))
    return KLResult(list(rows), _row(run["recommended"]), per_prompt,
                    run["meta"]["config"], run["docs"],
                    {d: _row(r) for d, r in run.get("recommended_by_direction", {}).items()},
                    _row(run.get("jeffreys")), run.get("advice_by_direction", {}), run.get("cost_estimate"))


def run(cfg: LLMConfig, pair=None, models: dict | None = None, progress: bool = False, say=None) -> KLResult:
    """Validate cfg, load its pair (unless given), sample every proposal, write files when cfg.output_dir is
    set (resumable), and return the result. The command line and estimate_kl both run through here. `say`: who
    is told the cost of a long run (runner.run_experiment; default with `progress`: a line on stderr)."""
    if cfg.several and pair is None:  # several candidates: one P pass, the candidates one at a time
        from kl_estimation.llm.run.candidates import run_candidates

        return run_candidates(cfg, progress)
    cfg = cfg.validate()
    cfg = replace(cfg, threads=set_threads(cfg.threads))  # the number used, recorded in the run
    if cfg.output_dir is None:
        return _run(cfg, pair, models, progress, say)
    writer = distributed.launched_rank() == 0
    with runio.RunFolder(cfg.output_dir, resume=cfg.resume, hold=writer):  # one run at a time on a folder
        check_folder(cfg)
        try:
            return _run(cfg, pair, models, progress, say)
        except BaseException:  # Ctrl-C or an error: what holds no sequence goes (the folder too, if it was new)
            if writer:
                drop_unfinished(cfg.output_dir, [(d, name) for d in cfg.directions for name in cfg.proposals])
            raise


def _run(cfg: LLMConfig, pair, models: dict | None, progress: bool, say=None) -> KLResult:
    if pair is None:
        pair, models = load_pair(cfg)
    return result_of(run_experiment(pair, cfg, models, cfg.output_dir, progress, say=say))


def default_pair() -> tuple[str, str]:
    """The folders of the offline default pair (P, Q), built on first use (a minute or two on 2 CPU cores):
    what estimate_kl and LLM_experiments.py compare when no models are given."""
    from kl_estimation.llm import default_pair as dp

    return dp.ensure()


def _is_model_id(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def estimate_kl(p_model=None, q_model=None, prompts=None, *, tokenizer=None, progress: bool = True,
                **settings) -> KLResult:
    """Estimate KL(P‖Q) between two causal LMs over a prompt set, with every estimator from the same samples.

    The same call as ``LLM_experiments.py`` with the same settings gives the same numbers: both run
    :func:`run` on an :class:`~kl_estimation.llm.run.config.LLMConfig` with one set of defaults.

    Parameters
    ----------
    p_model, q_model : str, os.PathLike or transformers model, optional
        Hub ids or local folders (loaded with from_pretrained), or already-loaded causal LMs sharing ``tokenizer``.
        Both None: the offline default pair (:func:`default_pair`).
    prompts : str, sequence of str or os.PathLike, optional
        One prompt, a prompt set, or a prompt file (.txt/.jsonl/.csv); the target is the mean over prompts of the KL
        of the continuation after each prompt. None: the default prompt (or ``prompts_file`` / ``dataset``).
    tokenizer : needed when the models are passed loaded.
    progress : one progress bar over the whole run, with the time left from its first seconds, and for a run expected
        to take over a few minutes one line first: its cost on this machine and the cheapest reduction (False:
        silent; the estimate is on the result either way, ``cost_estimate``).
    **settings
        Any setting of an LLM run, under the same name as the command line's flag without dashes: e.g.
        ``n_samples`` (1000), ``max_new_tokens`` (20), ``temperature`` (0.4), ``direction`` ("forward": KL(P‖Q)
        from sequences of P; "reverse": KL(Q‖P) from sequences of Q; "both": the two and their sum), ``proposals``,
        ``sampler``, ``head`` (None: an exact head where P's draws would be nearly all one sequence; docs/head.md),
        ``batch_size``, ``seed``, ``device``, ``dtype``, ``p_dtype``/``q_dtype``, ``p_adapter``/``q_adapter``,
        ``device_map``, ``offload``, ``chat_template``, ``ignore_eos``, ``threads``, ``output_dir`` (None: nothing
        is written), ``resume``, ``overwrite``. ``help(kl_estimation.LLMConfig)`` and ``LLM_experiments.py --help``
        list them all with their defaults.

    ``q_model`` may be a list (a quant ladder, a checkpoint series): one set of sequences from P is scored by every
    candidate (loaded one at a time; proposals built from P and Q, and the reverse direction, still draw per
    candidate) and a :class:`~kl_estimation.llm.run.candidates.KLComparison` is returned: ``results`` (each
    candidate's KLResult, what its one-candidate run gives), ``table``, ``paired(a, b)`` (paired differences on
    the same sequences), ``series()``, ``text`` (docs/llm.md).

    Returns
    -------
    KLResult with ``rows`` (KLRow: estimate, std_error, ci, flag, direction, …), ``recommended`` (the row to
    report; with ``direction="both"`` the forward one), ``recommended_by_direction``, ``jeffreys`` (both directions:
    KL(P‖Q) + KL(Q‖P) with SE √(SE_f² + SE_r²)), ``rows_for(direction)``, ``per_prompt``, ``to_pandas()`` and
    ``to_dict()``.

    Raises
    ------
    ValueError
        For bad input, naming the parameter first (``n_samples: must be an integer ≥ 2 (got 1)``).
    """
    if isinstance(settings.get("proposals"), str):
        settings["proposals"] = (settings["proposals"],)  # one name, not its letters
    elif settings.get("proposals") is not None:
        settings["proposals"] = tuple(settings["proposals"])
    if prompts is not None:
        if isinstance(prompts, os.PathLike):
            settings["prompts_file"] = os.fspath(prompts)
        elif isinstance(prompts, str):
            settings["prompts"] = (prompts,)
        elif isinstance(prompts, (list, tuple)):
            settings["prompts"] = tuple(prompts)
        else:
            raise ValueError(f"prompts: a string, a list of strings or a path to a prompt file (got "
                             f"{type(prompts).__name__})")
    if isinstance(q_model, list):
        q_model = tuple(q_model)
    if isinstance(q_model, tuple):  # several candidates: names only (each is loaded in turn, after P)
        if not all(_is_model_id(q) for q in q_model) or not _is_model_id(p_model):
            raise ValueError("q_model: several candidates are given as ids/paths (each is loaded in turn), with "
                             "`p_model` an id/path")
        q_model = tuple(os.fspath(q) for q in q_model)
        if len(q_model) == 1:
            q_model = q_model[0]
    given = [m is not None for m in (p_model, q_model)]
    named = [m is None or _is_model_id(m) or isinstance(m, tuple) for m in (p_model, q_model)]
    loaded = not all(named)
    if loaded and any(m is None or n for m, n in zip((p_model, q_model), named)):
        raise ValueError("q_model: give both models as ids/paths or both as loaded models")
    if loaded:
        if tokenizer is None:
            raise ValueError("tokenizer: needed when the models are passed as loaded models")
        cfg = LLMConfig.from_settings(**settings).validate()
        from kl_estimation.llm.loading import pair_from_models
        from kl_estimation.llm.loading import text_start as pair_text_start

        pair = pair_from_models(p_model, q_model, tokenizer, prompts=cfg.prompt_set, temperature=cfg.temperature,
                                ignore_eos=cfg.ignore_eos, chat_template=cfg.chat_template)
        models = {"p": type(p_model).__name__ + " (loaded)", "q": type(q_model).__name__ + " (loaded)",
                  "text_start": pair_text_start(tokenizer, cfg.chat_template)}
        return run(cfg, pair, models, progress)
    if any(given) and not settings.get("q_adapter"):
        if not all(given):
            raise ValueError("q_model: give both `p_model` and `q_model`, or neither for the offline default pair")
    cfg = LLMConfig.from_settings(p_model=p_model and os.fspath(p_model),
                                  q_model=q_model if isinstance(q_model, tuple) else q_model and os.fspath(q_model),
                                  **settings)
    return run(cfg, progress=progress)


def corpus_kl(p_model=None, q_model=None, corpus=None, *, context: int = 512, tokenizer=None, progress: bool = True,
              **settings):
    """Teacher-forced KL(P‖Q) over a text corpus, as llama.cpp's ``llama-perplexity --kl-divergence`` measures it
    (its windows, its scored half, its statistics), in one pass over both models, plus KL(Q‖P), Jeffreys and
    clustered standard errors. The same call as ``LLM_experiments.py --corpus FILE`` with the same settings.

    Parameters
    ----------
    p_model, q_model : str, os.PathLike or transformers model
        Hub ids (``p_revision`` / ``q_revision``), local folders or ``.gguf`` files; or already-loaded causal LMs
        sharing ``tokenizer``.
        ``q_model`` may be a list (a quant ladder, a checkpoint series): P's pass is done once, the candidates are
        loaded one at a time and compared in one table (a CorpusComparison).
    corpus : str, os.PathLike, or a sequence of str
        A .txt file (one document) or .jsonl file (one document per line, under ``text_field``), or the documents as
        texts. Or give ``dataset=`` (with ``split``, ``text_field``) or ``token_ids=`` (llama.cpp's base file).
    context : tokens per window (llama.cpp's -c), default 512.
    **settings
        Any setting of a corpus run (``help(kl_estimation.CorpusConfig)``, ``LLM_experiments.py --corpus x --help``):
        ``score`` ("second-half" = llama.cpp's, or "all"), ``cluster_by`` ("window" or "document"), ``n_windows``,
        ``base_storage``, ``batch_size`` (windows per forward), ``device``, ``dtype``, ``p_dtype``/``q_dtype``,
        ``threads``, ``output_dir`` (None: nothing is written), ``overwrite``, …

    Returns
    -------
    CorpusResult: ``.summary`` (``["llama"]``: llama.cpp's numbers; ``["means"]``: every mean with ``se_cluster``,
    ``se_iid`` and 95 % CIs), ``.mean("kl_forward")``, ``.tokens`` (per-token arrays), ``.windows``, ``.worst``,
    ``.text`` (llama.cpp's blocks and ours, as printed).
    With a list of candidates, a CorpusComparison: ``.results`` (one CorpusResult per candidate, each what its
    one-candidate run gives), ``.table`` (mean, 99 % and 99.9 % KLD, same top-1, ln PPL ratio with 95 % CIs, file
    size and bits per weight for GGUF files, rank, paired difference from the closest candidate), ``.paired(a, b)``,
    ``.text``.

    Raises
    ------
    ValueError
        For bad input, naming the parameter first (``context: 9000 tokens per window, but the models take …``).
    """
    from kl_estimation.llm.corpus.config import CorpusConfig
    from kl_estimation.llm.corpus.run import run_corpus

    if corpus is not None:
        if isinstance(corpus, (str, os.PathLike)):
            settings["corpus"] = os.fspath(corpus)
        elif isinstance(corpus, (list, tuple)):
            settings["texts"] = tuple(corpus)
        else:
            raise ValueError(f"corpus: a file path or a list of texts (got {type(corpus).__name__})")
    several = isinstance(q_model, (list, tuple))
    qs = list(q_model) if several else [q_model]
    loaded = [m is not None and not _is_model_id(m) for m in (p_model, *qs)]
    if any(loaded) and not all(loaded):
        raise ValueError("q_model: give every model as an id/path or every one as a loaded model")
    if all(loaded):
        if tokenizer is None:
            raise ValueError("tokenizer: needed when the models are passed as loaded models")
        names = tuple(f"(loaded {i + 1})" for i in range(len(qs))) if several else "(loaded)"
        cfg = CorpusConfig.from_settings(p_model="(loaded)", q_model=names, context=context, **settings)
        return run_corpus(cfg, models=(p_model, qs if several else q_model), tokenizer=tokenizer, progress=progress)
    names = tuple(os.fspath(q) for q in qs) if several else (q_model and os.fspath(q_model))
    cfg = CorpusConfig.from_settings(p_model=p_model and os.fspath(p_model), q_model=names, context=context,
                                     **settings)
    return run_corpus(cfg, progress=progress)
