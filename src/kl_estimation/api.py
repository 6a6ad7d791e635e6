"""The Python API of an LLM run: estimate_kl(...) → KLResult. The command line (LLM_experiments.py) is a thin layer
over the same `run` function."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields

from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import load_pair, run_experiment
from kl_estimation.llm.run.store import check_folder


@dataclass(frozen=True)
class KLRow:
    """One (proposal, estimator) estimate of KL(P‖Q) in nats per sequence (averaged over the prompt set).

    ``std_error`` is over this fixed prompt set (within-prompt noise only); ``std_error_population`` treats the
    prompts as a sample from a population (NaN for one prompt); ``ci`` is the 95 % interval from ``std_error``;
    ``flags`` are the verdict's records (verdicts.Flag: a code and a message; empty when the estimate is trusted) and
    ``flag`` the short string of their codes; ``recommended`` marks the row to report; ``proposal_key`` is the
    proposal's stable identity (file names, random streams)."""

    proposal: str
    estimator: str
    estimate: float
    std_error: float
    ci: tuple[float, float]
    flag: str = ""
    std_error_population: float = math.nan
    flags: tuple = ()
    recommended: bool = False
    proposal_key: str = ""
    details: dict = field(default_factory=dict, repr=False)  # variance, ESS, max weight, k̂, n, diagnostics

    MAIN = ("proposal", "estimator", "estimate", "std_error", "flag", "flags", "std_error_population", "ci_low",
            "ci_high", "recommended", "proposal_key")

    @classmethod
    def from_row(cls, row: dict) -> "KLRow":
        from kl_estimation.verdicts import as_flags, codes

        flags = tuple(as_flags(row.get("flags")))
        return cls(row["proposal"], row["estimator"], row["estimate"], row["std_error"],
                   (row["ci_low"], row["ci_high"]), row.get("flag") or codes(flags),
                   row.get("std_error_population", math.nan), flags, bool(row.get("recommended", False)),
                   row.get("proposal_key", ""), {k: v for k, v in row.items() if k not in cls.MAIN})

    def to_dict(self, records: bool = True) -> dict:
        """Flat: the interval as ci_low / ci_high, the details as columns (as in summary.csv); with `records` the
        flag records as {code, message} dicts under ``flags`` (as in summary.json)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ci_low"], d["ci_high"] = d.pop("ci")
        d.update(d.pop("details"))
        flags = d.pop("flags")
        if records:
            d["flags"] = [f.to_dict() for f in flags]
        return d

    @property
    def messages(self) -> list[str]:
        """What went wrong, in words (one line per flag)."""
        return [str(f) for f in self.flags]


@dataclass
class KLResult:
    """The outcome of estimate_kl: ranked rows (trusted rows first, smallest standard error first), the row to
    report (``recommended``), per-prompt results, and the raw per-proposal documents (records included)."""

    rows: list[KLRow]
    recommended: KLRow | None
    per_prompt: list[dict]  # one per prompt: {"prompt": i, "text", "rows": [KLRow], "recommended": KLRow | None}
    config: dict = field(repr=False)
    docs: list[dict] = field(repr=False, default_factory=list)

    def to_dict(self) -> dict:
        return {"config": self.config, "recommended": self.recommended and self.recommended.to_dict(),
                "rows": [r.to_dict() for r in self.rows],
                "per_prompt": [dict(p, rows=[r.to_dict() for r in p["rows"]],
                                    recommended=p["recommended"] and p["recommended"].to_dict())
                               for p in self.per_prompt]}

    def to_pandas(self, per_prompt: bool = False):
        """The rows as a DataFrame (``per_prompt=True``: one row per prompt × proposal × estimator). Cells stay
        short: ``flag`` holds the codes; the messages are in each KLRow's ``flags`` (and ``messages``)."""
        import pandas as pd

        if not per_prompt:
            return pd.DataFrame([r.to_dict(records=False) for r in self.rows])
        return pd.DataFrame([dict(prompt=p["prompt"], text=p["text"], **r.to_dict(records=False))
                             for p in self.per_prompt for r in p["rows"]])

    def __str__(self) -> str:
        from kl_estimation.report import llm_table

        return llm_table(self.rows, "KL(P‖Q) per sequence")


def result_of(run: dict) -> KLResult:
    """A KLResult from run_experiment's output."""
    rows = run["rows"]
    per_prompt = []
    for p in run["per_prompt"]:
        rec = p["recommended"]
        per_prompt.append(dict(prompt=p["prompt"], text=p["text"], rows=[KLRow.from_row(r) for r in p["rows"]],
                               recommended=rec and KLRow.from_row(rec)))
    rec = run["recommended"]
    return KLResult([KLRow.from_row(r) for r in rows], rec and KLRow.from_row(rec), per_prompt,
                    run["meta"]["config"], run["docs"])


def run(cfg: LLMConfig, pair=None, models: dict | None = None, progress: bool = False) -> KLResult:
    """Validate cfg, load its pair (unless given), sample every proposal, write files when cfg.output_folder is
    set (resumable), and return the result."""
    cfg.validate()
    folder = cfg.output_folder
    if folder is not None:
        check_folder(cfg)
    if pair is None:
        pair, models = load_pair(cfg)
    bar = None
    if progress:
        from kl_estimation import progress as progress_bars

        def bar(**kw):
            return progress_bars.bar(unit="batch", **kw)

    return result_of(run_experiment(pair, cfg, models, folder, bar))


_FLAG_TO_PARAM = {"--n-reps": "n_samples", "--t-length": "max_new_tokens", "--prompt": "prompts",
                  "--prompts": "prompts", "--output-folder": "output_folder"}


def _as_param(message: str) -> str:
    """Config errors name command-line flags; here they name estimate_kl's parameters."""
    m = re.match(r"(--[a-z-]+)(:.*)", message, re.S)
    if not m:
        return message
    return _FLAG_TO_PARAM.get(m[1], m[1][2:].replace("-", "_")) + m[2]


def estimate_kl(p_model, q_model, prompts, *, n_samples: int = 256, max_new_tokens: int = 20,
                temperature: float = 1.0, proposals=("P",), seed: int = 0, device: str = "auto",
                dtype: str = "auto", batch_size: int = 64, tokenizer=None, ignore_eos: bool = False,
                chat_template: bool = False, output_folder=None, resume: bool = False, overwrite: bool = False,
                progress: bool = False) -> KLResult:
    """Estimate KL(P‖Q) between two causal LMs over a prompt set, with every estimator from the same samples.

    Parameters
    ----------
    p_model, q_model : str or transformers model
        Hub ids or local folders (loaded with from_pretrained), or already-loaded causal LMs sharing ``tokenizer``.
    prompts : str or list of str
        The prompt set; the target is the mean over prompts of the KL of the continuation after each prompt.
    n_samples : sequences drawn per prompt and proposal.
    max_new_tokens : T; the KL is that of the sequence process truncated at T tokens (or at EOS).
    temperature : applied to both models' logits (1.0: the models as they are).
    proposals : "P" (plain MC: the MC, RB, RB+CV, k3 and SNIS estimators) and/or registry proposals such as
        "Geometric (β=0.5)" (importance sampling), optionally + " [prefix-aware]".
    seed : every (prompt, proposal, batch) unit draws from its own stream derived from it.
    device, dtype : "auto" (CUDA if available; bfloat16 on CUDA) or explicit; ignored for loaded models.
    batch_size : sequences per forward batch (prompts are mixed, left-padded).
    tokenizer : needed when the models are passed loaded.
    output_folder : write resumable files there (nothing is written when None); resume / overwrite as on the CLI.
    progress : show a progress bar.

    Returns
    -------
    KLResult with ``rows`` (KLRow: estimate, std_error, ci, flag, …), ``recommended`` (the row to report),
    ``per_prompt``, ``to_pandas()`` and ``to_dict()``.
    """
    loaded = not isinstance(p_model, str)
    if loaded != (not isinstance(q_model, str)):
        raise ValueError("q_model: give both models as ids/paths or both as loaded models")
    if loaded and tokenizer is None:
        raise ValueError("tokenizer: needed when the models are passed as loaded models")
    texts = (prompts,) if isinstance(prompts, str) else tuple(prompts)
    cfg = LLMConfig(p_model=None if loaded else p_model, q_model=None if loaded else q_model, prompts=texts,
                        n_reps=n_samples, t_length=max_new_tokens, temperature=temperature,
                        proposals=tuple(proposals), batch_size=batch_size, device=device, dtype=dtype, seed=seed,
                        output_folder=output_folder, resume=resume, overwrite=overwrite, ignore_eos=ignore_eos,
                        chat_template=chat_template)
    try:
        if not loaded:
            return run(cfg, progress=progress)
        from kl_estimation.llm.loading import pair_from_models

        cfg.validate()
        pair = pair_from_models(p_model, q_model, tokenizer, prompts=texts, temperature=temperature,
                                ignore_eos=ignore_eos, chat_template=chat_template)
        models = {"p": type(p_model).__name__ + " (loaded)", "q": type(q_model).__name__ + " (loaded)"}
        return run(cfg, pair, models, progress)
    except ValueError as err:
        raise ValueError(_as_param(str(err))) from None
