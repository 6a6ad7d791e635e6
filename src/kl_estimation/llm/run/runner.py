r"""The run layer for LLM pairs: prompts × proposals × batches of sequences → resumable files and a summary.

A run estimates, for each proposal, KL(P‖Q) of the sequence process truncated at T tokens (or at EOS) after each
prompt of a prompt set, and their average over the prompts (a set of one prompt is the plain case). The work is cut
into *units* — (prompt, proposal, batch index), each with its own random stream (engine.unit_generator) — and the
units of a proposal are packed into forward batches of at most ``batch_size`` sequences, mixing prompts; so the
records do not depend on the packing, and a resumed run redraws nothing it kept.

Directions (cfg.direction): forward estimates KL(P‖Q) from sequences of P, reverse KL(Q‖P) from sequences of Q on
the swapped pair (engine.SwappedPair: the same engine, proposals, estimators and verdicts), both does the two in one
run on one loaded pair — first every forward unit, then every reverse one — and adds their sum, the Jeffreys row
(llm.run.directions). A reverse unit's stream and run key carry the direction; its files sit in ``reverse/``.

Files per proposal: ``<slug>.partial.jsonl`` while running (a header line with the run key, then one line per finished
forward batch: its units and records, fsynced), then ``<slug>.json`` written atomically: records, estimates per
prompt and overall. The two-level design gives two standard errors for the overall estimate (the mean over prompts):
``std_error`` over this fixed prompt set, √(Σ_i SE_i²)/m (within-prompt noise only), and ``std_error_population``,
the spread of the per-prompt estimates over prompts, √(s²/m), for the prompt population the set was drawn from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kl_estimation import runio
from kl_estimation.core.resources import check_memory
from kl_estimation.cost import COST_LINE_SECONDS, PROBE_STEPS, CostEstimate, Meter, say_on_stderr
from kl_estimation.llm.engine import (
    FORWARD,
    REVERSE,
    SAMPLED_FROM,
    TARGET,
    pair_view,
    proposal_label,
    sequence_proposal,
)
from kl_estimation.llm.head import heads_for
from kl_estimation.llm.run import directions as dirs
from kl_estimation.llm.run import distributed
from kl_estimation.llm.run.aggregate import prompt_set_estimates
from kl_estimation.llm.run.config import LLMConfig, resolve_device, resolve_dtype
from kl_estimation.llm.run.store import (
    ProposalFiles,
    direction_folder,
    earlier_run_files,
    proposal_slug,
    run_key,
    write_summary,
)
from kl_estimation.llm.run.units import (
    Unit,
    pack,
    plan_units,
    sample_units,
    split_by_unit,
    unit_groups,
)
from kl_estimation.progress import bar as progress_bar
from kl_estimation.verdicts import judge


def load_pair(cfg: LLMConfig):
    """The pair of cfg (hub ids / local folders, or the offline default pair) with cfg's prompt set tokenized.
    Returns (pair, models), `models` being what the run records about where P and Q came from."""
    from kl_estimation.llm.loading import load_transformers_pair, text_start

    distributed.from_env(cfg.device)  # under torchrun: join the group, and pin this rank to its GPU before loading
    device = resolve_device(cfg.device)
    p_id, q_id = cfg.p_model, cfg.q_model
    if p_id is None:
        from kl_estimation.llm import default_pair

        p_id, q_id = default_pair.ensure()  # one pair for everyone, trained with its own fixed seed
    scale = loading_options(cfg, device)
    pair = load_transformers_pair(p_id, q_id, prompts=cfg.prompt_set, temperature=cfg.temperature, device=device,
                                  dtype=resolve_dtype(cfg.dtype, device), ignore_eos=cfg.ignore_eos,
                                  chat_template=cfg.chat_template, **scale)
    models = models_record(cfg, p_id, q_id, device, scale)
    models["text_start"] = text_start(pair.tokenizer, cfg.chat_template)  # what each prompt starts with
    if cfg.p_model is None:
        from kl_estimation.llm import default_pair

        models["default_pair"] = default_pair.info()
    return pair, models


def loading_options(cfg: LLMConfig, device) -> dict:
    """The loading settings cfg gives (adapters, sharding, revisions, per-model dtypes resolved for `device`)."""
    scale = {k: getattr(cfg, k) for k in ("p_adapter", "q_adapter", "device_map", "offload", "p_revision", "q_revision",
                                          "trust_remote_code") if getattr(cfg, k)}
    scale.update({k: resolve_dtype(getattr(cfg, k), device) for k in ("p_dtype", "q_dtype") if getattr(cfg, k)})
    return scale


def models_record(cfg: LLMConfig, p_id: str, q_id: str, device, scale: dict) -> dict:
    """What a run records about where P and Q came from (part of every run key): the names as given, the paths
    loaded and the settings that change the records."""
    return {"p": cfg.p_model or "offline default pair (P)", "q": cfg.q_model or "offline default pair (Q)",
            "p_path": p_id, "q_path": q_id, "dtype": resolve_dtype(cfg.dtype, device),
            **{k: v for k, v in scale.items() if k not in ("device_map", "offload")}}


def check_fits(pair, cfg: "LLMConfig") -> None:
    """Before any sampling: every prompt + T within the models' context, and one forward batch within memory."""
    limit = getattr(pair, "context_length", None)
    if limit is not None:
        longest = max(pair.prompt_lengths)
        if longest >= limit:
            i = pair.prompt_lengths.index(longest)
            raise ValueError(f"prompts: prompt {i} alone is {longest} tokens; the models take {limit} positions, so "
                             f"no token can follow it — shorten it")
        used = longest + cfg.max_new_tokens - 1  # the last token drawn is never fed back to the models
        if used > limit:
            raise ValueError(f"max_new_tokens: {cfg.max_new_tokens} new tokens after a prompt of {longest} tokens "
                             f"need {used} positions but the models take {limit}; allowed here: `max_new_tokens` ≤ "
                             f"{limit - longest + 1}")
    if hasattr(pair, "batch_bytes"):
        free = torch.cuda.mem_get_info(pair.device)[0] if pair.device.type == "cuda" else None
        check_memory(pair.batch_bytes(cfg.batch_size, cfg.max_new_tokens), "batch_size",
                     f"a forward batch of {cfg.batch_size} sequences (vocabulary {pair.vocab_size})", free)


@dataclass
class ProposalRun:
    """One proposal's part of a run in one direction: its units, those already done (resumed), this rank's forward
    batches still to draw, and its files (None: nothing is written). `name` is the proposal as configured (its
    formula in the sampling frame: "P" is the sampling model), `label` its name in the direction's outputs."""

    name: str
    key: dict
    units: list[Unit]
    done: dict
    batches: list
    files: ProposalFiles | None
    direction: str = FORWARD
    heads: dict = field(default_factory=dict)  # {prompt: head.Head}: prompts whose draws are a head's remainder

    @property
    def proposal(self):
        return sequence_proposal(self.name)

    @property
    def label(self) -> str:
        return proposal_label(self.name, self.direction)


def plan_proposal(cfg: LLMConfig, name: str, models: dict, folder, shard: distributed.Shard,
                  direction: str = FORWARD) -> ProposalRun:
    """The units of proposal `name` in `direction`, what an earlier run kept of them (cfg.resume), and this rank's
    share of the forward batches left to draw."""
    key = run_key(cfg, name, models, direction)
    units = plan_units(len(cfg.prompt_set), cfg.n_samples, cfg.batch_size)
    files = None if folder is None else ProposalFiles(direction_folder(folder, direction),
                                                      proposal_slug(name, direction), shard)
    done = {} if files is None else files.read_done(key, units, cfg.resume)
    todo = [u for u in units if u not in done]
    return ProposalRun(name, key, units, done, shard.mine(pack(todo, cfg.batch_size)), files, direction)


def draw(pair, cfg: LLMConfig, run: ProposalRun, shard: distributed.Shard, meter: Meter | None = None) -> None:
    """Draw this rank's batches of `run` (each appended to the partial file as it finishes), then gather every
    rank's into run.done. `pair` is the loaded pair; the run's direction decides how it is sampled. `meter`: the
    run's work counter (its progress bar and cost probe), told of every decoding step."""
    if run.files is not None:
        run.files.start(run.key, run.done, cfg.resume)
    prop, new, view = run.proposal, {}, pair_view(pair, run.direction)
    run.heads = heads_for(view, prop, cfg.max_new_tokens, cfg.n_samples, len(cfg.prompt_set), cfg.head) \
        if cfg.sampler == "iid" else {}
    bar = None if meter is None else meter.bar
    if meter is not None and run.batches:
        meter.begin()
    for group in run.batches:
        # several candidates (llm.run.candidates): P's side of shared draws comes from one pass of P
        bound = pair.bind(run, group) if hasattr(pair, "bind") else None
        recs = sample_units(view if bound is None else bound, prop, group, cfg, run.direction, run.heads,
                            None if meter is None else meter.update)
        for r in recs:
            r["rank"] = shard.rank
        if run.files is not None:
            run.files.append(group, recs)
        drawn = split_by_unit(group, recs)
        new.update(drawn)
        run.done.update(drawn)
        if bar is not None:
            bar.set_postfix_str(_running(run.done.values(), prop.base is None))
    run.done.update(shard.gather(new))


ROLES_REVERSE = {"log_p": "log Q(x_t): the sampling model's", "log_q": "log P(x_t)", "kl_step": "KL(Q_t‖P_t)",
                 "log_weight": "log Q(x)/r(x)", "log_ratio": "log Q(x)/P(x)",
                 "estimates": "of KL(Q‖P); diagnostics named after P and Q (q_over_r_mean, …) mean the sampling "
                              "model and the other one: in reverse Q and P"}


def proposal_document(cfg: LLMConfig, run: ProposalRun, meta: dict) -> dict:
    """The proposal's document: its records in unit order and every estimator per prompt and overall. A reverse
    document's records are in the sampling frame (`roles` says what each field holds)."""
    records = [r for u in run.units for r in run.done[u]]
    d = run.direction
    where = dict(direction=d, target=TARGET[d], sampled_from=SAMPLED_FROM[d],
                 **({"roles": ROLES_REVERSE} if d == REVERSE else {}))
    heads = {"heads": [dict(prompt=i, **h.record()) for i, h in run.heads.items()]} if run.heads else {}
    return dict(meta, proposal=run.label, proposal_key=run.proposal.key, **where, run_key=run.key, **heads,
                n_sequences=len(records),
                max_uncovered_mass=max(r.get("uncovered_mass", 0.0) for r in records),
                **prompt_set_estimates(records, cfg.max_new_tokens, len(cfg.prompt_set), run.proposal.base is None,
                                       unit_groups(run.units, cfg.sampler), run.heads),
                sequences=records)


def run_experiment(pair, cfg: LLMConfig, models: dict, folder=None, progress: bool = False, shard=None,
                   exact_kl: float | dict | None = None, say=None) -> dict:
    """Every proposal of cfg in every direction of cfg on a loaded pair → {"meta", "docs" (one per direction and
    proposal), "rows" (every direction's rows, each ranked with flagged rows last, forward first; each row has its
    `direction`), "recommended" (the first direction's: forward unless the run is reverse only),
    "recommended_by_direction", "by_direction" ({direction: {rows, recommended, per_prompt}}), "per_prompt"
    ([{prompt, text, rows, recommended, recommended_by_direction}] for a set of several prompts) and, for both
    directions, "jeffreys" (the Jeffreys row; per prompt too)}. With a `folder`: resumable per-proposal files
    plus summary.json, summary.csv and summary_per_prompt.csv (the caller checked the folder); with cfg.overwrite,
    every file of an earlier run there is removed first. `progress`: one bar over the whole run in sequence-tokens
    (progress.bar, as every area's run takes it), with the time left from the first steps; "cost_estimate" is what
    the run's first steps said it would take (cost.py: a run over COST_LINE_SECONDS says so, through `say`, before
    its first batch is done; `say` default: the line on stderr when `progress`). Under torchrun the ranks share the
    work (`shard`, default distributed.from_env) and rank 0 writes the files. `exact_kl`: the exact KL over the
    prompt set where one is known (tiny enumerable pairs), recorded for the figures: a number (forward runs) or
    {direction: number}."""
    check_fits(pair, cfg)
    shard = distributed.from_env(cfg.device) if shard is None else shard
    config = {**vars(cfg), "proposals": list(cfg.proposals), "prompts": list(cfg.prompt_set),
              "device": str(pair.device), "world_size": shard.world_size}
    meta = dict(config=config, models=models, versions=runio.versions("torch", "transformers", "tokenizers"),
                seed=cfg.seed, truncation=f"KL of the sequence process truncated at {cfg.max_new_tokens} tokens"
                                          + ("" if pair.eos_token_id is None else " or at EOS"))
    if exact_kl is not None:
        meta["exact_kl"] = ({d: float(v) for d, v in exact_kl.items()} if isinstance(exact_kl, dict)
                            else float(exact_kl))
    if folder is not None:
        if cfg.overwrite and shard.writes_final:
            runio.remove(earlier_run_files(folder))
        for d in cfg.directions:
            direction_folder(folder, d).mkdir(parents=True, exist_ok=True)
        shard.barrier()
    runs = [plan_proposal(cfg, name, models, folder, shard, d) for d in cfg.directions for name in cfg.proposals]
    meter = work_meter(cfg, runs, progress and shard.writes_final, say if shard.writes_final else None)
    bar = meter.bar
    docs = []
    try:  # one bar over every proposal's batches: the time left is the whole run's
        for i, run in enumerate(runs, 1):
            if bar is not None:
                where = f"{run.direction} " if len(cfg.directions) > 1 else ""
                bar.set_description_str(f"{where}proposal {i}/{len(runs)}: {run.label}")
            draw(pair, cfg, run, shard, meter)
            docs.append(proposal_document(cfg, run, meta))
            if run.files is not None:
                run.files.finish(docs[-1])
    finally:  # an interrupted run's bar ends before its one-line report
        if bar is not None:
            bar.close()
    verdict = judge_directions(cfg, runs, docs)
    if folder is not None and shard.writes_final:
        write_summary(folder, meta, verdict)
    return dict(meta=meta, docs=docs, cost_estimate=meter.estimate, **verdict)


def work_meter(cfg: LLMConfig, runs: list[ProposalRun], progress: bool, say=None) -> Meter:
    """The run's work in sequence-tokens (a row of a forward batch for one decoding step: about one unit of time
    each, whatever the proposal or direction) on one bar, and the probe: PROBE_STEPS steps of the first forward batch
    after its first (which reads the prompts and pays for every first call), scaled by the plan (cost.py). The
    reduction named: plain Monte Carlo alone (--proposals P), else one direction, else fewer sequences."""
    T = cfg.max_new_tokens
    work = sum(u.rows for r in runs for g in r.batches for u in g) * T
    first = next((g for r in runs for g in r.batches), [])
    bar = progress_bar(total=work, desc="sampling", unit="token") if progress and work else None
    plan = tuple((n, what) for n, what in ((len(cfg.proposals), "proposals"), (len(cfg.directions), "directions"),
                                           (len(cfg.prompt_set), "prompts")) if n > 1 or what == "proposals") \
        + ((cfg.n_samples, "sequences"),)

    def make(per_unit: float, done: int, spent: float) -> CostEstimate:
        seconds = per_unit * work
        if len(cfg.proposals) > 1:
            reduction = ("proposals", "P", seconds / len(cfg.proposals))
        elif len(cfg.directions) > 1:
            reduction = ("direction", "forward", seconds / 2)
        else:
            n = max(2, int(cfg.n_samples * COST_LINE_SECONDS / seconds))
            reduction = ("n_samples", str(n), seconds * n / cfg.n_samples) if n < cfg.n_samples else None
        return CostEstimate(seconds, plan, work, "sequence-tokens", done, spent, reduction)

    rows = sum(u.rows for u in first)
    return Meter(bar, work, rows * min(max(T - 1, 1), PROBE_STEPS), make,
                 (say or say_on_stderr(flags=False)) if progress else say, warmup=rows if T > 1 else 0)


def judge_directions(cfg: LLMConfig, runs: list[ProposalRun], docs: list[dict]) -> dict:
    """Each direction judged on its own (verdicts.judge, in the sampling frame; its rows carry the direction, so they
    are said in its names where they are rendered), merged into one verdict; the Jeffreys rows for both directions."""
    by_direction = {}
    for d in cfg.directions:
        mine = [dict(doc, proposal=run.name) for run, doc in zip(runs, docs) if run.direction == d]
        v = judge(mine, d)  # rows with flags, ranked; the recommendation (overall and per prompt)
        for p, text in zip(v["per_prompt"], cfg.prompt_set):
            p["text"] = text
        by_direction[d] = v
    first = by_direction[cfg.directions[0]]
    per_prompt = [dict(prompt=p["prompt"], text=p["text"],
                       rows=[r for v in by_direction.values() for r in v["per_prompt"][i]["rows"]],
                       recommended=p["recommended"],
                       recommended_by_direction={d: v["per_prompt"][i]["recommended"] for d, v in by_direction.items()},
                       advice_by_direction={d: v["per_prompt"][i].get("advice") for d, v in by_direction.items()})
                  for i, p in enumerate(first["per_prompt"])]
    out = dict(rows=[r for v in by_direction.values() for r in v["rows"]], recommended=first["recommended"],
               recommended_by_direction={d: v["recommended"] for d, v in by_direction.items()},
               per_prompt=per_prompt, by_direction=by_direction, proposals=first["proposals"], unit=first["unit"],
               advice=first.get("advice"), advice_by_direction={d: v.get("advice") for d, v in by_direction.items()})
    if len(by_direction) > 1:
        out["jeffreys"], per_prompt_j = dirs.jeffreys(by_direction)
        for p, j in zip(per_prompt, per_prompt_j):
            p["jeffreys"] = j
    return out


def _running(batches, is_p: bool) -> str:
    """The running MC / IS estimate shown on the progress bar (pooled over prompts)."""
    lw, f = np.array([(r["log_weight"], r["log_ratio"]) for b in batches for r in b]).T
    return f"{'MC' if is_p else 'IS'} {np.mean(np.exp(lw) * f):.4g} (n={lw.size})"
