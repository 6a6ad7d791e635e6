r"""The run layer for LLM pairs: prompts × proposals × batches of sequences → resumable files and a summary.

A run estimates, for each proposal, KL(P‖Q) of the sequence process truncated at T tokens (or at EOS) after each
prompt of a prompt set, and their average over the prompts (a set of one prompt is the plain case). The work is cut
into *units* — (prompt, proposal, batch index), each with its own random stream (engine.unit_generator) — and the
units of a proposal are packed into forward batches of at most ``batch_size`` sequences, mixing prompts; so the
records do not depend on the packing, and a resumed run redraws nothing it kept.

Files per proposal: ``<slug>.partial.jsonl`` while running (a header line with the run key, then one line per finished
forward batch: its units and records, fsynced), then ``<slug>.json`` written atomically: records, estimates per
prompt and overall. The two-level design gives two standard errors for the overall estimate (the mean over prompts):
``std_error`` over this fixed prompt set, √(Σ_i SE_i²)/m (within-prompt noise only), and ``std_error_population``,
the spread of the per-prompt estimates over prompts, √(s²/m), for the prompt population the set was drawn from.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runio
from .diagnostics import KHAT_LIMIT
from .engine import P_NAME, PREFIX_SUFFIX, sample_batch, sequence_proposal, unit_generator
from .estimators import Z95, randomization_estimates, sequence_estimates
from .models import DTYPES
from .synthetic import check_int

DEFAULT_PROPOSALS = (P_NAME, "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)",
                     "Exponential family (β=0.5)", "Adaptive", "Adaptive" + PREFIX_SUFFIX)


def batch_records(b, decode, prompt_rows=None) -> list[dict]:
    """One JSON-ready record per sequence, per-step lists cut at EOS (only the steps that count)."""
    out = []
    for i in range(b.token_ids.shape[0]):
        n = int(b.mask[i].sum())
        lp, lq, lr = b.log_p[i, :n], b.log_q[i, :n], b.log_r[i, :n]
        ids = b.token_ids[i, :n].tolist()
        rec = dict(text=decode(ids), token_ids=ids, log_p=lp.tolist(), log_q=lq.tolist(), log_r=lr.tolist(),
                   kl_step=b.kl_step[i, :n].tolist(), log_weight=float(np.sum(lp - lr)),
                   log_ratio=float(np.sum(lp - lq)), uncovered_mass=float(b.uncovered[i, :n].max(initial=0.0)))
        if prompt_rows is not None:
            rec["prompt"] = int(prompt_rows[i])
        out.append(rec)
    return out


def records_to_arrays(records: list[dict], t_length: int) -> dict[str, np.ndarray]:
    """Saved records back to padded (N, T) arrays plus mask: what the estimators take."""
    lengths = np.array([len(r["log_p"]) for r in records])
    mask = np.arange(t_length) < lengths[:, None]
    out = {"mask": mask}
    for k in ("log_p", "log_q", "log_r", "kl_step"):
        out[k] = np.zeros(mask.shape)
        out[k][mask] = np.concatenate([r[k] for r in records])  # row-major fill matches the records' order
    return out


# ------------------------------------------------------------------------------------------------ runs

ESTIMATOR_ORDER = ("RB", "MC", "SNIS", "k3", "RB-IS", "IS", "k3-IS")


@dataclass
class LLMConfig:
    p_model: str | None = None  # None (with q_model None): the offline default pair
    q_model: str | None = None
    prompt: str = "An interesting fact is that"
    n_reps: int = 1000
    t_length: int = 20
    temperature: float = 0.4
    proposals: tuple = DEFAULT_PROPOSALS
    batch_size: int = 64
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    output_folder: str = "tests2/"
    resume: bool = False
    overwrite: bool = False
    ignore_eos: bool = False
    prompts: tuple | None = None  # a prompt set (texts); None: the single `prompt`
    sampler: str = "iid"  # draws.DRAWS: how sequences are drawn (non-i.i.d.: SEs from independent units)

    @property
    def prompt_set(self) -> tuple:
        return tuple(self.prompts) if self.prompts is not None else (self.prompt,)

    def validate(self) -> "LLMConfig":
        check_int("--n-reps", self.n_reps, 1)
        check_int("--t-length", self.t_length, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"--temperature: must be a number > 0 (got {self.temperature!r})")
        if self.prompts is not None and not self.prompts:
            raise ValueError("--prompts: the prompt set is empty")
        for i, text in enumerate(self.prompt_set):
            if not isinstance(text, str) or not text.strip():
                raise ValueError("--prompt: must not be empty" if self.prompts is None else
                                 f"--prompts: prompt {i} is empty")
        if (self.p_model is None) != (self.q_model is None):
            raise ValueError("--q-model: give both --p-model and --q-model, or neither for the offline default pair")
        if not self.proposals:
            raise ValueError("--proposals: give at least one proposal (P is plain Monte Carlo)")
        if len(set(self.proposals)) != len(self.proposals):
            raise ValueError("--proposals: a proposal is listed twice")
        for name in self.proposals:
            try:
                sequence_proposal(name)
            except ValueError as err:
                raise ValueError(f"--{err}") from None
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"--dtype: unknown dtype {self.dtype!r}; allowed: auto, {', '.join(DTYPES)}")
        resolve_device(self.device)
        if self.resume and self.overwrite:
            raise ValueError("--resume: cannot be combined with --overwrite")
        check_sampler(self.sampler, self.n_reps, self.batch_size)
        return self


def check_sampler(name: str, n_reps: int, batch_size: int) -> None:
    from .draws import DRAWS

    if name not in DRAWS:
        raise ValueError(f"--sampler: unknown sampler {name!r}; allowed: {', '.join(DRAWS)}")
    if not DRAWS[name].independent_rows and math.ceil(n_reps / batch_size) < 2:
        raise ValueError(f"--batch-size: with --sampler {name} each batch is one randomization and the standard "
                         f"error needs at least 2 per prompt; use --batch-size ≤ {max(1, n_reps // 2)} for --n-reps "
                         f"{n_reps}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: unknown device {name!r}; allowed: auto, cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {name} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device: {name} requested but MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def load_pair(cfg: LLMConfig):
    """The pair of cfg (hub ids / local folders, or the offline default pair) with cfg's prompt set tokenized.
    Returns (pair, models), `models` being what the run records about where P and Q came from."""
    from transformers.utils import logging as hf_logging

    from .models import load_transformers_pair

    device = resolve_device(cfg.device)
    p_id, q_id = cfg.p_model, cfg.q_model
    if p_id is None:
        from . import default_pair

        p_id, q_id = default_pair.ensure(cfg.seed)
    hf_logging.disable_progress_bar()
    pair = load_transformers_pair(p_id, q_id, prompts=cfg.prompt_set, temperature=cfg.temperature, device=device,
                                  dtype=resolve_dtype(cfg.dtype, device), ignore_eos=cfg.ignore_eos)
    models = {"p": cfg.p_model or "offline default pair (P)", "q": cfg.q_model or "offline default pair (Q)",
              "p_path": p_id, "q_path": q_id, "dtype": resolve_dtype(cfg.dtype, device)}
    return pair, models


def slug(name: str) -> str:
    """File name of a proposal: 'Alpha-mixture (α=0.5) [prefix-aware]' → 'alpha-mixture_alpha-0.5_prefix-aware'."""
    s = name.lower()
    for greek, latin in (("α", "alpha"), ("β", "beta"), ("λ", "lambda")):
        s = s.replace(greek, latin)
    out = []
    for part in s.replace("[", " ").replace("]", " ").replace("(", " ").replace(")", " ").split():
        out.append("".join(c if c.isalnum() or c in ".-" else "-" for c in part.replace("=", "-")))
    return "_".join(out)


def existing_outputs(folder, proposals) -> list:
    folder = Path(folder)
    names = [f"{slug(p)}{ext}" for p in proposals for ext in (".json", ".partial.jsonl")] + ["summary.json"]
    return [folder / n for n in names if (folder / n).exists()]


def prompt_set_digest(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def run_key(cfg: LLMConfig, proposal: str, models: dict) -> dict:
    """Everything that fixes the records of a unit: a resumed run must match it exactly."""
    prompts = cfg.prompt_set
    return dict(models=models, prompts=prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts, sha256 "
                f"{prompt_set_digest(prompts)}", t_length=cfg.t_length, temperature=cfg.temperature, seed=cfg.seed,
                batch_size=cfg.batch_size, ignore_eos=cfg.ignore_eos, proposal=proposal,
                **({} if cfg.sampler == "iid" else {"sampler": cfg.sampler}))  # i.i.d. runs keep their old keys


@dataclass(frozen=True)
class Unit:
    """Sequences `rows` of batch `batch` after prompt `prompt`, for one proposal: one random stream."""

    prompt: int
    batch: int
    rows: int


def plan_units(n_prompts: int, n_reps: int, batch_size: int) -> list[Unit]:
    """Every unit of one proposal, in record order: per prompt, ⌈n_reps / batch_size⌉ batches."""
    return [Unit(i, j, min(batch_size, n_reps - j * batch_size))
            for i in range(n_prompts) for j in range(math.ceil(n_reps / batch_size))]


def pack(units: list[Unit], batch_size: int) -> list[list[Unit]]:
    """Consecutive units into forward batches of at most batch_size sequences."""
    out, rows = [], batch_size
    for u in units:
        if rows + u.rows > batch_size:
            out.append([])
            rows = 0
        out[-1].append(u)
        rows += u.rows
    return out


def sample_units(pair, prop, units: list[Unit], cfg, sampler: str = "iid") -> list[dict]:
    """One forward batch of units → their records (each tagged with its prompt)."""
    streams = [(unit_generator(cfg.seed, prop.name, u.batch, pair.device, u.prompt), u.rows) for u in units]
    rows = np.repeat([u.prompt for u in units], [u.rows for u in units])
    b = sample_batch(pair, prop, len(rows), cfg.t_length, streams, prompt_rows=torch.as_tensor(rows),
                     sampler=sampler)
    return batch_records(b, pair.decode, rows)


def _read_partial(partial: Path, key: dict) -> dict:
    lines = runio.read_jsonl(partial)
    if not lines or lines[0].get("run_key") != key:
        raise ValueError(f"--resume: {partial} was written with other settings "
                         f"({_diff(lines[0].get('run_key') if lines else None, key)})")
    done = {}
    for ln in lines[1:]:
        recs = iter(ln["sequences"])
        for prompt, batch, rows in ln["units"]:
            done[Unit(prompt, batch, rows)] = [next(recs) for _ in range(rows)]
    return done


def _read_final(final: Path, key: dict, units: list[Unit]) -> dict:
    doc = json.loads(final.read_text())
    if doc.get("run_key") != key:
        raise ValueError(f"--resume: {final} was written with other settings ({_diff(doc.get('run_key'), key)})")
    done, by_unit = {}, {}
    for rec in doc["sequences"]:
        by_unit.setdefault((rec.get("prompt", 0), rec.get("batch", 0)), []).append(rec)
    for u in units:
        recs = by_unit.get((u.prompt, u.batch), [])
        if len(recs) >= u.rows:  # a unit of a run with more --n-reps ends in the same records
            done[u] = recs[: u.rows]
    return done


def run_proposal(pair, cfg: LLMConfig, name: str, folder, meta: dict, bar_factory=None) -> dict:
    """Sample cfg.n_reps sequences per prompt from proposal `name` and return its document (records, estimates).

    With a `folder`, finished forward batches go to <slug>.partial.jsonl as they come (resuming finished units when
    cfg.resume) and the document to <slug>.json, atomically; with folder None nothing is written."""
    prop = sequence_proposal(name)
    key = run_key(cfg, name, meta["models"])
    units = plan_units(len(cfg.prompt_set), cfg.n_reps, cfg.batch_size)
    done: dict[Unit, list[dict]] = {}
    final = partial = None
    if folder is not None:
        final, partial = Path(folder) / f"{slug(name)}.json", Path(folder) / f"{slug(name)}.partial.jsonl"
        if cfg.resume and final.exists():
            done = _read_final(final, key, units)
        elif cfg.resume and partial.exists():
            done = _read_partial(partial, key)
    todo = [u for u in units if u not in done]
    if todo:
        if partial is not None and not (cfg.resume and partial.exists()):
            partial.unlink(missing_ok=True)
            runio.append_jsonl(partial, {"run_key": key})
            if done:  # units carried over from a finished run with fewer --n-reps
                runio.append_jsonl(partial, {"units": [[u.prompt, u.batch, u.rows] for u in done],
                                             "sequences": [r for recs in done.values() for r in recs]})
        batches = pack(todo, cfg.batch_size)
        bar = bar_factory(total=len(batches), desc=name) if bar_factory else None
        for group in batches:
            recs = sample_units(pair, prop, group, cfg, cfg.sampler)
            if partial is not None:
                runio.append_jsonl(partial, {"units": [[u.prompt, u.batch, u.rows] for u in group],
                                             "sequences": recs})
            it = iter(recs)
            for u in group:
                done[u] = [next(it) for _ in range(u.rows)]
            if bar:
                bar.update(1)
                bar.set_postfix_str(_running(done.values(), prop.base is None))
        if bar:
            bar.close()
    records = [r for u in units for r in done[u]]
    doc = dict(meta, proposal=name, run_key=key, n_sequences=len(records),
               max_uncovered_mass=max(r.get("uncovered_mass", 0.0) for r in records),
               **prompt_set_estimates(records, cfg.t_length, len(cfg.prompt_set), prop.base is None,
                                      unit_groups(units, cfg.sampler)),
               sequences=records)
    if final is not None:
        runio.write_json(final, doc)
        partial.unlink(missing_ok=True)
    return doc


def run_experiment(pair, cfg: LLMConfig, models: dict, folder=None, bar_factory=None) -> dict:
    """Every proposal of cfg on a loaded pair → {"meta", "docs" (one per proposal), "rows" (ranked summary)}.
    With a `folder`: resumable per-proposal files plus summary.json and summary.csv (the caller checked it)."""
    config = {**vars(cfg), "proposals": list(cfg.proposals), "prompts": list(cfg.prompt_set),
              "device": str(pair.device)}
    meta = dict(config=config, models=models, versions=runio.versions("torch", "transformers", "tokenizers"),
                seed=cfg.seed, truncation=f"KL of the sequence process truncated at {cfg.t_length} tokens"
                                          + ("" if pair.eos_token_id is None else " or at EOS"))
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    docs = [run_proposal(pair, cfg, name, folder, meta, bar_factory) for name in cfg.proposals]
    rows = summary_rows(docs)
    if folder is not None:
        runio.write_json(Path(folder) / "summary.json", dict(meta, rows=rows))
        runio.write_csv(Path(folder) / "summary.csv", rows)
    return dict(meta=meta, docs=docs, rows=rows)


def unit_groups(units: list[Unit], sampler: str):
    """Each record's unit index when the sampler's rows are dependent (their SE must come from units), else None."""
    from .draws import DRAWS

    return None if DRAWS[sampler].independent_rows else np.repeat(np.arange(len(units)), [u.rows for u in units])


def prompt_set_estimates(records: list[dict], t_length: int, n_prompts: int, proposal_is_p: bool,
                         groups=None) -> dict:
    """Every estimator per prompt and over the prompt set (the mean of the per-prompt estimates).

    Returns ``estimates`` (overall; with one prompt exactly that prompt's) and, for several prompts, ``per_prompt``
    (a list of {prompt, n_sequences, estimates}). Overall ``std_error`` is over this fixed prompt set,
    ``std_error_population`` over prompts drawn from a population (between-prompt spread included; NaN for m = 1).
    `groups` (one unit index per record, for samplers with dependent rows): per-prompt SEs from the spread between
    units (estimators.randomization_estimates), never from the spread of the sequences.
    """
    by_prompt = [[r for r in records if r.get("prompt", 0) == i] for i in range(n_prompts)]
    prompt_of = np.array([r.get("prompt", 0) for r in records])
    per = []
    for i, recs in enumerate(by_prompt):
        a = records_to_arrays(recs, t_length)
        args = (a["log_p"], a["log_q"], a["log_r"], a["kl_step"], a["mask"], proposal_is_p)
        per.append(sequence_estimates(*args) if groups is None else
                   randomization_estimates(*args, np.asarray(groups)[prompt_of == i]))
    if n_prompts == 1:
        only = {k: dict(v, std_error_population=math.nan) for k, v in per[0].items()}
        return {"estimates": only}
    overall = {}
    m = n_prompts
    for est in per[0]:
        e = np.array([p[est]["estimate"] for p in per])
        se = np.array([p[est]["std_error"] for p in per])
        mean, se_fixed = float(e.mean()), float(np.sqrt(np.sum(se ** 2)) / m)
        se_pop = float(e.std(ddof=1) / math.sqrt(m))
        overall[est] = dict(estimate=mean, std_error=se_fixed, std_error_population=se_pop,
                            variance=float(np.mean([p[est]["variance"] for p in per])),
                            ess=float(np.sum([p[est]["ess"] for p in per])),
                            max_weight=float(np.max([p[est]["max_weight"] for p in per])),
                            khat=float(np.nanmax([p[est]["khat"] for p in per])) if not proposal_is_p else math.nan,
                            ci_low=mean - Z95 * se_fixed, ci_high=mean + Z95 * se_fixed, n=len(records))
    if groups is not None:
        for est in overall:
            overall[est]["std_error_method"] = per[0][est]["std_error_method"] + ", per prompt, combined over prompts"
    return {"estimates": overall,
            "per_prompt": [dict(prompt=i, n_sequences=len(recs), estimates=p)
                           for i, (recs, p) in enumerate(zip(by_prompt, per))]}


def _running(batches, is_p: bool) -> str:
    """The running MC / IS estimate shown on the progress bar (pooled over prompts)."""
    lw, f = np.array([(r["log_weight"], r["log_ratio"]) for b in batches for r in b]).T
    return f"{'MC' if is_p else 'IS'} {np.mean(np.exp(lw) * f):.4g} (n={lw.size})"


def _diff(old, new) -> str:
    if not isinstance(old, dict):
        return "no settings recorded"
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new[k]!r} now" for k in keys) or "unknown difference"


def summary_rows(docs: list[dict]) -> list[dict]:
    """One row per (proposal, estimator), best standard error first among trustworthy rows."""
    rows = []
    for d in docs:
        for est_name, e in d["estimates"].items():
            flag = ""
            if d.get("max_uncovered_mass", 0.0) > 0:
                flag = (f"biased: the proposal gives r = 0 to tokens with P > 0 (up to {d['max_uncovered_mass']:.2g} "
                        f"of P's mass at a step): sequences through them are never drawn")
            elif e["khat"] is not None and np.isfinite(e["khat"]) and e["khat"] > KHAT_LIMIT:
                flag = f"k̂ {e['khat']:.2f} > {KHAT_LIMIT}: weights too heavy-tailed to trust"
            elif est_name == "SNIS" and d["proposal"] != P_NAME:
                flag = "self-normalised: biased at O(1/n)"
            rows.append(dict(proposal=d["proposal"], estimator=est_name, **e, flag=flag))
    rows.sort(key=lambda r: (bool(r["flag"]), r["std_error"] if np.isfinite(r["std_error"]) else math.inf))
    return rows



