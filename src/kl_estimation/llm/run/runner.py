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

import shutil
from pathlib import Path

import numpy as np
import torch

from kl_estimation import runio
from kl_estimation.core.resources import check_memory
from kl_estimation.llm.engine import sequence_proposal
from kl_estimation.llm.run import distributed
from kl_estimation.llm.run.aggregate import prompt_set_estimates
from kl_estimation.llm.run.config import LLMConfig, resolve_device, resolve_dtype
from kl_estimation.llm.run.store import (
    _read_final,
    _read_partial,
    earlier_run_files,
    run_key,
    slug,
)
from kl_estimation.llm.run.units import (
    Unit,
    pack,
    plan_units,
    sample_units,
    split_by_unit,
    unit_groups,
)
from kl_estimation.verdicts import judge, table_rows


def load_pair(cfg: LLMConfig):
    """The pair of cfg (hub ids / local folders, or the offline default pair) with cfg's prompt set tokenized.
    Returns (pair, models), `models` being what the run records about where P and Q came from."""
    from transformers.utils import logging as hf_logging

    from kl_estimation.llm.loading import load_transformers_pair

    distributed.from_env(cfg.device)  # under torchrun: join the group, and pin this rank to its GPU before loading
    device = resolve_device(cfg.device)
    p_id, q_id = cfg.p_model, cfg.q_model
    if p_id is None:
        from kl_estimation.llm import default_pair

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
        bar = bar_factory(total=len(batches), desc=prop.label) if bar_factory and shard.writes_final else None
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
    doc = dict(meta, proposal=prop.label, proposal_key=prop.key, run_key=key, n_sequences=len(records),
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
        runio.write_csv(Path(folder) / "summary.csv", table_rows(verdict["rows"]))
        if verdict["per_prompt"]:
            runio.write_csv(Path(folder) / "summary_per_prompt.csv",
                            [r for p in verdict["per_prompt"] for r in table_rows(p["rows"], prompt=p["prompt"])])
    return dict(meta=meta, docs=docs, **verdict)


def _running(batches, is_p: bool) -> str:
    """The running MC / IS estimate shown on the progress bar (pooled over prompts)."""
    lw, f = np.array([(r["log_weight"], r["log_ratio"]) for b in batches for r in b]).T
    return f"{'MC' if is_p else 'IS'} {np.mean(np.exp(lw) * f):.4g} (n={lw.size})"
