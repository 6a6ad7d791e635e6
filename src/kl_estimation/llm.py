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
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, runio
from .engine import P_NAME, PREFIX_SUFFIX, sample_batch, sequence_proposal, unit_generator
from .estimators import Z95, randomization_estimates, sequence_estimates, t95
from .models import DTYPES, check_loading_options
from .resources import check_memory
from .synthetic import check_int
from .verdicts import judge

DEFAULT_PROPOSALS = (P_NAME, "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5)",
                     "Exponential family (β=0.5)", "Adaptive", "Adaptive" + PREFIX_SUFFIX)


def batch_records(b, decode, **tags) -> list[dict]:
    """One JSON-ready record per sequence, per-step lists cut at EOS (only the steps that count); `tags`: arrays of
    one integer per sequence stored under their names (the unit: prompt, batch)."""
    out = []
    for i in range(b.token_ids.shape[0]):
        n = int(b.mask[i].sum())
        lp, lq, lr = b.log_p[i, :n], b.log_q[i, :n], b.log_r[i, :n]
        ids = b.token_ids[i, :n].tolist()
        rec = dict(text=decode(ids), token_ids=ids, log_p=lp.tolist(), log_q=lq.tolist(), log_r=lr.tolist(),
                   kl_step=b.kl_step[i, :n].tolist(), log_weight=float(np.sum(lp - lr)),
                   log_ratio=float(np.sum(lp - lq)), uncovered_mass=float(b.uncovered[i, :n].max(initial=0.0)))
        rec.update({k: int(v[i]) for k, v in tags.items()})
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
    prompts: tuple | None = None  # a prompt set (texts); None: read from prompts_file / dataset, else `prompt`
    prompts_file: str | None = None
    dataset: str | None = None
    split: str = "train"
    prompt_field: str = "prompt"
    n_prompts: int | None = None
    chat_template: bool = False
    sampler: str = "iid"  # draws.DRAWS: how sequences are drawn (non-i.i.d.: SEs from independent units)
    # loading big models (models.py): per-model dtypes, PEFT adapters, sharding over GPUs with accelerate
    p_dtype: str | None = None
    q_dtype: str | None = None
    p_adapter: str | None = None
    q_adapter: str | None = None
    device_map: str | None = None
    offload: bool = False

    @property
    def prompt_set(self) -> tuple:
        return tuple(self.prompts) if self.prompts is not None else (self.prompt,)

    def validate(self) -> "LLMConfig":
        """Check every setting (errors name the flag) and read the prompt set from its file or dataset."""
        check_int("--n-reps", self.n_reps, 1)
        check_int("--t-length", self.t_length, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("--seed", self.seed, 0)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
            raise ValueError(f"--temperature: must be a number > 0 (got {self.temperature!r})")
        if self.prompts is None and (self.prompts_file or self.dataset or self.n_prompts is not None):
            from .prompts import load_prompts

            self.prompts = tuple(load_prompts(prompt=self.prompt, prompts_file=self.prompts_file,
                                              dataset=self.dataset, split=self.split, prompt_field=self.prompt_field,
                                              n_prompts=self.n_prompts))
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
        check_loading_options(self)
        check_sampler(self.sampler, self.n_reps, self.batch_size)
        check_memory(records_bytes(self), "--n-reps", f"keeping {self.n_reps} sequences × {len(self.prompt_set)} "
                     f"prompts × {len(self.proposals)} proposals of up to {self.t_length} tokens (--t-length)")
        return self


def check_sampler(name: str, n_reps: int, batch_size: int) -> None:
    from .draws import DRAWS

    if name not in DRAWS:
        raise ValueError(f"--sampler: unknown sampler {name!r}; allowed: {', '.join(DRAWS)}")
    if not DRAWS[name].independent_rows and math.ceil(n_reps / batch_size) < 2:
        raise ValueError(f"--batch-size: with --sampler {name} each batch is one randomization and the standard "
                         f"error needs at least 2 per prompt; use --batch-size ≤ {max(1, n_reps // 2)} for --n-reps "
                         f"{n_reps}")


def records_bytes(cfg: "LLMConfig") -> int:
    """Memory the records of a run take while it runs: every proposal's records stay in memory as Python lists (about
    200 bytes per token and 1.5 kB per sequence), and writing one document copies it twice more."""
    per_sequence = 200 * cfg.t_length + 1500
    n = cfg.n_reps * len(cfg.prompt_set)
    return n * per_sequence * (len(cfg.proposals) + 2)


def check_fits(pair, cfg: "LLMConfig") -> None:
    """Before any sampling: every prompt + T within the models' context, and one forward batch within memory."""
    limit = getattr(pair, "context_length", None)
    if limit is not None:
        longest = max(pair.prompt_lengths)
        used = longest + cfg.t_length - 1  # the last token drawn is never fed back to the models
        if used > limit:
            raise ValueError(f"--t-length: {cfg.t_length} new tokens after a prompt of {longest} tokens need {used} "
                             f"positions but the models take {limit}; allowed here: --t-length ≤ "
                             f"{max(limit - longest + 1, 0)}")
    if hasattr(pair, "batch_bytes"):
        free = torch.cuda.mem_get_info(pair.device)[0] if pair.device.type == "cuda" else None
        check_memory(pair.batch_bytes(cfg.batch_size, cfg.t_length), "--batch-size",
                     f"a forward batch of {cfg.batch_size} sequences (vocabulary {pair.vocab_size})", free)


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

    distributed.from_env(cfg.device)  # under torchrun: join the group, and pin this rank to its GPU before loading
    device = resolve_device(cfg.device)
    p_id, q_id = cfg.p_model, cfg.q_model
    if p_id is None:
        from . import default_pair

        p_id, q_id = default_pair.ensure()  # one pair for everyone, trained with its own fixed seed
    hf_logging.disable_progress_bar()
    scale = {k: getattr(cfg, k) for k in ("p_adapter", "q_adapter", "device_map", "offload") if getattr(cfg, k)}
    scale.update({k: resolve_dtype(getattr(cfg, k), device) for k in ("p_dtype", "q_dtype") if getattr(cfg, k)})
    pair = load_transformers_pair(p_id, q_id, prompts=cfg.prompt_set, temperature=cfg.temperature, device=device,
                                  dtype=resolve_dtype(cfg.dtype, device), ignore_eos=cfg.ignore_eos,
                                  chat_template=cfg.chat_template, **scale)
    models = {"p": cfg.p_model or "offline default pair (P)", "q": cfg.q_model or "offline default pair (Q)",
              "p_path": p_id, "q_path": q_id, "dtype": resolve_dtype(cfg.dtype, device),
              **{k: v for k, v in scale.items() if k not in ("device_map", "offload")}}  # what changes the records
    if cfg.p_model is None:
        models["default_pair"] = default_pair.info()
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


def check_folder(cfg: LLMConfig) -> None:
    """Before any work: the output folder can be written, and holds no results unless resuming or overwriting."""
    runio.check_output_dir(cfg.output_folder, "--output-folder")
    earlier = existing_outputs(cfg.output_folder, cfg.proposals)
    if earlier and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--output-folder: {cfg.output_folder} already holds results ({earlier[0].name}); pass "
                         f"--resume to continue or reuse them, --overwrite to replace them, or choose another folder")


def existing_outputs(folder, proposals) -> list:
    folder = Path(folder)
    names = [f"{slug(p)}.json" for p in proposals] + ["summary.json"]
    return [folder / n for n in names if (folder / n).exists()] + [
        f for p in proposals for f in distributed.partial_files(folder, slug(p))]


def earlier_run_files(folder) -> list[Path]:
    """Every file an earlier run left in `folder`, whatever its proposals: summary files, figures, partial files and
    the per-proposal documents (JSON files holding a run_key); a user's other files are not touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = [folder / n for n in ("summary.json", "summary.csv", "summary_per_prompt.csv", "plots")
           if (folder / n).exists()]
    out += sorted(folder.glob("*.partial.jsonl"))
    for f in sorted(folder.glob("*.json")):
        if f.name != "summary.json":
            try:
                with open(f, encoding="utf-8") as fh:
                    if '"run_key"' in fh.read():
                        out.append(f)
            except (OSError, UnicodeDecodeError):
                pass
    return out


def prompt_set_digest(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode()).hexdigest()[:16]


def run_key(cfg: LLMConfig, proposal: str, models: dict) -> dict:
    """Everything that fixes the records of a unit: a resumed run must match it exactly."""
    prompts = cfg.prompt_set
    return dict(models=models, prompts=prompts[0] if len(prompts) == 1 else f"{len(prompts)} prompts, sha256 "
                f"{prompt_set_digest(prompts)}", chat_template=cfg.chat_template, t_length=cfg.t_length,
                temperature=cfg.temperature, seed=cfg.seed, batch_size=cfg.batch_size, ignore_eos=cfg.ignore_eos,
                proposal=proposal, **({} if cfg.sampler == "iid" else {"sampler": cfg.sampler}))


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


def sample_units(pair, prop, units: list[Unit], cfg) -> list[dict]:
    """One forward batch of units (drawn with cfg.sampler) → their records, each tagged with its unit (prompt and
    batch index)."""
    streams = [(unit_generator(cfg.seed, prop.name, u.batch, pair.device, u.prompt), u.rows) for u in units]
    sizes = [u.rows for u in units]
    rows, batch = np.repeat([u.prompt for u in units], sizes), np.repeat([u.batch for u in units], sizes)
    b = sample_batch(pair, prop, len(rows), cfg.t_length, streams, prompt_rows=torch.as_tensor(rows),
                     sampler=cfg.sampler)
    return batch_records(b, pair.decode, prompt=rows, batch=batch)


def split_by_unit(units: list[Unit], records: list[dict]) -> dict[Unit, list[dict]]:
    """A forward batch's (or a partial line's) records, in unit order, back to their units."""
    it = iter(records)
    return {u: [next(it) for _ in range(u.rows)] for u in units}


def _read_partial(partial: Path, key: dict) -> dict:
    lines = runio.read_jsonl(partial)
    if not lines or lines[0].get("run_key") != key:
        raise ValueError(f"--resume: {partial} was written with other settings "
                         f"({_diff(lines[0].get('run_key') if lines else None, key)})")
    done = {}
    for ln in lines[1:]:
        done.update(split_by_unit([Unit(*u) for u in ln["units"]], ln["sequences"]))
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


def run_proposal(pair, cfg: LLMConfig, name: str, folder, meta: dict, bar_factory=None,
                 shard: distributed.Shard = distributed.ONE) -> dict:
    """Sample cfg.n_reps sequences per prompt from proposal `name` and return its document (records, estimates).

    With a `folder`, finished forward batches go to <slug>.partial.jsonl as they come (resuming finished units when
    cfg.resume) and the document to <slug>.json, atomically; with folder None nothing is written.
    `shard`: under torchrun, this rank's share of the forward batches (distributed.py): its batches go to
    <slug>.rank<k>.partial.jsonl, rank 0 writes <slug>.json, and every rank returns the whole document."""
    prop = sequence_proposal(name)
    key = run_key(cfg, name, meta["models"])
    units = plan_units(len(cfg.prompt_set), cfg.n_reps, cfg.batch_size)
    done: dict[Unit, list[dict]] = {}
    final = partial = None
    if folder is not None:
        final, partial = Path(folder) / f"{slug(name)}.json", shard.partial(folder, slug(name))
        earlier = distributed.partial_files(folder, slug(name))  # any earlier world size's
        if cfg.resume and final.exists():
            done = _read_final(final, key, units)
        elif cfg.resume and earlier:
            for f in earlier:
                done.update(_read_partial(f, key))
        shard.barrier()  # every rank has read the files before any appends to them
    todo = [u for u in units if u not in done]
    if todo:
        fresh = partial is not None and not (cfg.resume and partial.exists())
        if partial is not None and not cfg.resume and shard.writes_final:
            for f in earlier:  # every rank's file of an earlier run, whatever its world size
                f.unlink(missing_ok=True)
        shard.barrier()
        if fresh:
            partial.unlink(missing_ok=True)
            runio.append_jsonl(partial, {"run_key": key})
            if done and shard.writes_final:  # units carried over from a finished run with fewer --n-reps
                runio.append_jsonl(partial, {"units": [[u.prompt, u.batch, u.rows] for u in done],
                                             "sequences": [r for recs in done.values() for r in recs]})
        batches = shard.mine(pack(todo, cfg.batch_size))
        bar = bar_factory(total=len(batches), desc=name) if bar_factory and shard.writes_final else None
        new: dict[Unit, list[dict]] = {}
        try:
            for group in batches:
                recs = sample_units(pair, prop, group, cfg)
                for r in recs:
                    r["rank"] = shard.rank
                if partial is not None:
                    runio.append_jsonl(partial, {"units": [[u.prompt, u.batch, u.rows] for u in group],
                                                 "sequences": recs})
                drawn = split_by_unit(group, recs)
                new.update(drawn)
                done.update(drawn)
                if bar:
                    bar.update(1)
                    bar.set_postfix_str(_running(done.values(), prop.base is None))
        finally:  # an interrupted run's bar ends before its one-line report
            if bar:
                bar.close()
        done.update(shard.gather(new))
    records = [r for u in units for r in done[u]]
    doc = dict(meta, proposal=name, run_key=key, n_sequences=len(records),
               max_uncovered_mass=max(r.get("uncovered_mass", 0.0) for r in records),
               **prompt_set_estimates(records, cfg.t_length, len(cfg.prompt_set), prop.base is None,
                                      unit_groups(units, cfg.sampler)),
               sequences=records)
    if final is not None and shard.writes_final:
        runio.write_json(final, doc)
        for f in distributed.partial_files(folder, slug(name)):
            f.unlink(missing_ok=True)
    return doc


def run_experiment(pair, cfg: LLMConfig, models: dict, folder=None, bar_factory=None, shard=None,
                   exact_kl: float | None = None) -> dict:
    """Every proposal of cfg on a loaded pair → {"meta", "docs" (one per proposal), "rows" (ranked, flagged rows
    last), "recommended", "per_prompt" ([{prompt, text, rows, recommended}] for a set of several prompts)}. With a
    `folder`: resumable per-proposal files plus summary.json, summary.csv and summary_per_prompt.csv (the caller
    checked the folder); with cfg.overwrite, every file of an earlier run there is removed first. Under torchrun the
    ranks share the work (`shard`, default distributed.from_env) and rank 0 writes the files. `exact_kl`: the exact
    KL over the prompt set where one is known (tiny enumerable pairs), recorded for the figures."""
    check_fits(pair, cfg)
    shard = distributed.from_env(cfg.device) if shard is None else shard
    config = {**vars(cfg), "proposals": list(cfg.proposals), "prompts": list(cfg.prompt_set),
              "device": str(pair.device), "world_size": shard.world_size}
    meta = dict(config=config, models=models, versions=runio.versions("torch", "transformers", "tokenizers"),
                seed=cfg.seed, truncation=f"KL of the sequence process truncated at {cfg.t_length} tokens"
                                          + ("" if pair.eos_token_id is None else " or at EOS"))
    if exact_kl is not None:
        meta["exact_kl"] = float(exact_kl)
    if folder is not None:
        if cfg.overwrite and shard.writes_final:
            for f in earlier_run_files(folder):
                shutil.rmtree(f) if f.is_dir() else f.unlink()
        Path(folder).mkdir(parents=True, exist_ok=True)
        shard.barrier()
    docs = [run_proposal(pair, cfg, name, folder, meta, bar_factory, shard) for name in cfg.proposals]
    verdict = judge(docs)  # rows with flags, ranked; the recommendation (overall and per prompt)
    for p, text in zip(verdict["per_prompt"], cfg.prompt_set):
        p["text"] = text
    if folder is not None and shard.writes_final:
        runio.write_json(Path(folder) / "summary.json", dict(meta, **verdict))
        runio.write_csv(Path(folder) / "summary.csv", verdict["rows"])
        if verdict["per_prompt"]:
            runio.write_csv(Path(folder) / "summary_per_prompt.csv",
                            [dict(prompt=p["prompt"], **r) for p in verdict["per_prompt"] for r in p["rows"]])
    return dict(meta=meta, docs=docs, **verdict)


def unit_groups(units: list[Unit], sampler: str):
    """Each record's unit index when the sampler's rows are dependent (their SE must come from units), else None."""
    from .draws import DRAWS

    return None if DRAWS[sampler].independent_rows else np.repeat(np.arange(len(units)), [u.rows for u in units])


def prompt_set_estimates(records: list[dict], t_length: int, n_prompts: int, proposal_is_p: bool,
                         groups=None) -> dict:
    """Every estimator per prompt and over the prompt set (the mean of the per-prompt estimates).

    Returns ``estimates`` (overall; with one prompt exactly that prompt's) and, for several prompts, ``per_prompt``
    (a list of {prompt, n_sequences, estimates}). Overall ``std_error`` (and ``ci_low``/``ci_high``) is over this
    fixed prompt set, ``std_error_population`` over prompts drawn i.i.d. from a population (between-prompt spread
    included; NaN for m = 1), with a Student-t interval ``ci_population_low``/``ci_population_high`` on m − 1 degrees
    of freedom (a normal one covers about 0.89 at m = 8).
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
        half = t95(m - 1)  # the population SE rests on m per-prompt estimates
        overall[est] = dict(estimate=mean, std_error=se_fixed, std_error_population=se_pop,
                            ci_population_low=mean - half * se_pop, ci_population_high=mean + half * se_pop,
                            variance=float(np.mean([p[est]["variance"] for p in per])),
                            ess=float(np.sum([p[est]["ess"] for p in per])),
                            max_weight=float(np.max([p[est]["max_weight"] for p in per])),
                            khat=max((k for p in per if np.isfinite(k := p[est]["khat"])), default=math.nan),
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
