r"""Several candidates Q against one P in a sampled run (a quant ladder, a checkpoint series): one set of sequences
from P, every candidate scored on it, paired differences by common random numbers.

    res = estimate_kl(p, ["ckpt-100", "ckpt-200", "ckpt-300"], prompts)    # → KLComparison
    res.results[i]          # candidate i's KLResult: what its one-candidate run gives
    res.table               # per candidate its row of plain Monte Carlo from P (RB+CV; RB on too few sequences)
    res.paired(a, b)        # a − b per estimator (MC, RB, RB+CV): core.results.Row, SE from the paired sequences
    res.series()            # KL against position in the series, with CIs (figures.llm.candidates_figure)

*What is shared.* Forward draws whose proposal is P itself (plain Monte Carlo, with any sampler that does not read
the KL) depend on P alone: their random streams (engine.unit_generator) are named by the proposal, the batch and
the prompt — never by Q — and each token is drawn from P's row. So P is run once over those draws (P's pass), and
what its output head received at every step (the final hidden states, in P's dtype: hidden size × 4 bytes per token
in float32 instead of the vocabulary's) is kept; each candidate then runs its own forward on the same tokens with
its KV cache (its full next-token distribution at every step: MC, RB and RB+CV all work) while P's rows are the
head applied again to the kept input — the same operation on the same values, hence the same bits (checked on the
first step; where it fails, e.g. a head followed by soft-capping, P runs again for every candidate). The draws are
then redrawn from the same streams and P's same rows: the same tokens as P's pass and as a one-candidate run.
Every candidate's records, estimates and verdicts are therefore those of its one-candidate run with the same
settings, bit for bit where the candidate's forward is deterministic (CPU; tests/test_candidates.py).

*What is not shared.* Proposals built from P and Q (every registry proposal) and the reverse direction (sequences
drawn from Q) draw per candidate: their draws depend on the candidate. Exact heads (docs/head.md) are searched per
candidate (their tree is P's; their sums need Q), a few hundred forwards.

*Paired differences.* Candidates A and B scored on the same sequences x_1 … x_n of P: each estimator is a mean of
per-sequence terms, a_i − b_i is a per-sequence difference, and the SE of A − B is that of the mean of the
differences, √(Var(a − b)/n) — far below √(SE_A² + SE_B²) when the terms of the two candidates move together (a
sequence that is hard for A is hard for B). Over a prompt set the per-prompt differences are pooled as the estimates
are (core.results.pool_prompts). A difference whose CI covers 0 is *indistinguishable* on these draws.

Memory is flat in the number of candidates: P stays loaded, one candidate at a time beside it, and P's kept hidden
states (n × prompts × T × hidden size).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kl_estimation import runio
from kl_estimation.core.estimators import clustered_se, rb_control_variate_terms
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.results import Row, pool_prompts
from kl_estimation.llm.engine import FORWARD, sequence_proposal
from kl_estimation.llm.run.config import LLMConfig

SHARED_ESTIMATORS = (Estimator.MC, Estimator.RB, Estimator.RB_CV)
COMPARED = Estimator.RB_CV  # the estimator of the table and of the differences from the best
CANDIDATES = "candidates"


def shares_draws(cfg: LLMConfig, name: str, direction: str) -> bool:
    """Whether the draws of proposal `name` in `direction` depend on P alone (so every candidate gets them)."""
    from kl_estimation.core.draws import DRAWS

    return direction == FORWARD and sequence_proposal(name).is_p and not getattr(DRAWS[cfg.sampler], "uses_kl",
                                                                                    False)


# ------------------------------------------------------------------------------------------------ P's pass, kept

class SharedDraws:
    """What P's output head received at every step of the shared draws: {(proposal key, units): [call]} — a call
    being one engine.sample_batch (a forward batch, or one prompt's part of it when an exact head splits it), a
    list of (rows, 1, hidden) tensors, one per step. ``exact`` False: the head applied again did not reproduce P's
    logits; candidates then run P again."""

    def __init__(self, head: torch.nn.Module):
        self.head, self.calls, self.exact, self.seen = head, {}, None, None
        self._hook = head.register_forward_hook(self._see)

    def _see(self, module, args, out):
        self.seen = args[0]

    def close(self) -> None:
        """P's pass is over: stop watching the head."""
        self._hook.remove()

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for calls in self.calls.values() for c in calls for h in c)

    @torch.inference_mode()
    def logits(self, h: torch.Tensor, device) -> torch.Tensor:
        return self.head(h.to(device))[:, -1]


def _key(run, group) -> tuple:
    return run.proposal.key, tuple(group)


class RecordingPair:
    """P alone (its rows stand in for Q's: nothing of Q is needed to draw from P); bound to a forward batch of shared
    draws (runner.draw binds it), it keeps what P's head receives at every step."""

    def __init__(self, pair, store: SharedDraws, cfg: LLMConfig, calls: list | None = None):
        self.pair, self.store, self.cfg, self._calls = pair, store, cfg, calls

    def bind(self, run, group):
        if not shares_draws(self.cfg, run.name, run.direction):
            return None
        return RecordingPair(self.pair, self.store, self.cfg, self.store.calls.setdefault(_key(run, group), []))

    def _keep(self, logits: torch.Tensor, new_call: bool):
        x, self.store.seen = self.store.seen, None
        if self._calls is None or self.store.exact is False:
            return
        if x is None:  # the logits did not come from P's output head module: nothing to apply again
            self.store.exact = False
            return
        h = x[:, -1:].to("cpu", copy=True).contiguous()
        if self.store.exact is None:  # the head applied again must give P's logits bit for bit
            again = self.store.logits(h, x.device)
            self.store.exact = bool(torch.equal(again.to(logits.dtype), logits))  # a cast to float32 is exact
        if new_call:
            self._calls.append([])
        self._calls[-1].append(h)

    @torch.inference_mode()
    def start(self, prompt_rows):
        from kl_estimation.llm.pair import _forward_last

        ids, mask, pos = self.pair.prompt_inputs(prompt_rows)
        lp, cp = _forward_last(self.pair.p_model, ids, mask, pos, None)
        self._keep(lp, True)
        out = self.pair._lp(lp)
        return out, out, (cp, mask, pos[:, -1])

    @torch.inference_mode()
    def step(self, state, tokens):
        from kl_estimation.llm.pair import _forward_last

        cp, mask, pos = state
        mask, pos = self.pair.next_inputs(mask, pos)
        lp, cp = _forward_last(self.pair.p_model, tokens[:, None], mask, pos[:, None], cp)
        self._keep(lp, False)
        out = self.pair._lp(lp)
        return out, out, (cp, mask, pos)

    def __getattr__(self, name):
        if name == "pair":
            raise AttributeError(name)
        return getattr(self.pair, name)


class ReplayPair:
    """One forward batch of shared draws for one candidate: P's rows from the kept head inputs, Q's from its own
    forward with its KV cache."""

    def __init__(self, pair, store: SharedDraws, calls: list):
        self.pair, self.store, self.calls, self.i = pair, store, calls, 0

    @torch.inference_mode()
    def start(self, prompt_rows):
        from kl_estimation.llm.pair import _forward_last

        call = self.calls[self.i]
        self.i += 1
        ids, mask, pos = self.pair.prompt_inputs(prompt_rows)
        lq, cq = _forward_last(self.pair.q_model, ids, mask, pos, None)
        lp = self.store.logits(call[0], self.pair.device)
        return self.pair._lp(lp), self.pair._lp(lq), (call, 1, cq, mask, pos[:, -1])

    @torch.inference_mode()
    def step(self, state, tokens):
        from kl_estimation.llm.pair import _forward_last

        call, t, cq, mask, pos = state
        mask, pos = self.pair.next_inputs(mask, pos)
        lq, cq = _forward_last(self.pair.q_model, tokens[:, None], mask, pos[:, None], cq)
        lp = self.store.logits(call[t], self.pair.device)
        return self.pair._lp(lp), self.pair._lp(lq), (call, t + 1, cq, mask, pos)

    def __getattr__(self, name):
        if name == "pair":
            raise AttributeError(name)
        return getattr(self.pair, name)


class CandidatePair:
    """P and one candidate (a TransformersPair) whose shared draws take P's side from `store`."""

    def __init__(self, pair, store: SharedDraws, cfg: LLMConfig):
        self.pair, self.store, self.cfg = pair, store, cfg

    def bind(self, run, group):
        calls = self.store.calls.get(_key(run, group))
        if not self.store.exact or calls is None or not shares_draws(self.cfg, run.name, run.direction):
            return None
        return ReplayPair(self.pair, self.store, calls)

    def __getattr__(self, name):
        if name == "pair":
            raise AttributeError(name)
        return getattr(self.pair, name)


# ------------------------------------------------------------------------------------------------ paired statistics

def _terms(a: dict, estimator: Estimator, head_cv_mean: float | None = None) -> np.ndarray:
    """Per-sequence terms of `estimator` (plain Monte Carlo from P) from records_to_arrays' arrays: the estimate is
    a constant (an exact head's sums; else 0) plus their mean."""
    from kl_estimation.llm.head import _cv_terms

    m = a["mask"]
    f_step = np.where(m, a["log_p"] - a["log_q"], 0.0)
    lw_step = np.where(m, a["log_p"] - a["log_r"], 0.0)
    f, g = f_step.sum(-1), np.where(m, a["kl_step"], 0.0).sum(-1)
    if "log_p_cond" in a:  # a head's remainder (head.head_estimates): weights P/r′ = the remainder's mass
        w = np.exp(lw_step.sum(-1))
        if estimator is Estimator.RB_CV:
            return _cv_terms(w * g, w * (f - g), head_cv_mean)
        return w * (f if estimator is Estimator.MC else g)
    if estimator is Estimator.MC:
        return f
    if estimator is Estimator.RB:
        return g
    return rb_control_variate_terms(a["kl_step"], f_step, lw_step, m)


def _p_doc(result) -> dict:
    doc = next((d for d in result.docs if d.get("proposal_key") == "p" and d.get("direction", FORWARD) == FORWARD),
               None)
    if doc is None:
        raise ValueError("proposals: a comparison of candidates needs proposal P (plain Monte Carlo from P), whose "
                         "sequences every candidate shares")
    return doc


def _prompt_rows(result, n_prompts: int) -> list[list[Row]]:
    return [result.rows] if n_prompts == 1 else [p["rows"] for p in result.per_prompt]


def _find(rows, estimator: Estimator) -> Row | None:
    return next((r for r in rows if r.is_p and r.direction == FORWARD and r.kind is estimator), None)


def paired_difference(a, b, estimator: Estimator = COMPARED, names: tuple = ("A", "B")) -> Row:
    """KLResult `a` minus KLResult `b` for `estimator` of plain Monte Carlo from P, both scored on the same sequences
    of P: the difference of their estimates (per prompt, pooled over the prompt set as the estimates are) with the
    SE of the mean per-sequence difference (clustered by unit for samplers whose rows are dependent). A Row named
    "A − B" (identity None), its details: candidate, minus, indistinguishable (the CI covers 0), se_unpaired."""
    from kl_estimation.llm.run.store import records_to_arrays

    da, db = _p_doc(a), _p_doc(b)
    T = a.config["max_new_tokens"]
    if [r["token_ids"] for r in da["sequences"]] != [r["token_ids"] for r in db["sequences"]]:
        raise ValueError("results: the two candidates were not scored on the same sequences of P")
    n_prompts = len(a.config["prompts"])
    heads = {h["prompt"] for h in da.get("heads", [])}
    dependent = a.config.get("sampler", "iid") != "iid"
    ests, ses, se_unpaired, n = [], [], [], 0
    for i, (ra, rb) in enumerate(zip(_prompt_rows(a, n_prompts), _prompt_rows(b, n_prompts))):
        xa, xb = _find(ra, estimator), _find(rb, estimator)
        if xa is None or xb is None:
            raise ValueError(f"estimator: {estimator} is not among the rows of plain Monte Carlo from P")
        recs = [[r for r in d["sequences"] if r.get("prompt", 0) == i] for d in (da, db)]
        arr = [records_to_arrays(r, T) for r in recs]
        cv_mean = []
        for res_rows, ar in zip((ra, rb), arr):  # a head's known mean of the control: −(Σ_H P·f − Σ_H P·g)
            if i in heads:
                mc_c = _find(res_rows, Estimator.MC).estimate - float(np.mean(_terms(ar, Estimator.MC)))
                rb_c = _find(res_rows, Estimator.RB).estimate - float(np.mean(_terms(ar, Estimator.RB)))
                cv_mean.append(-(mc_c - rb_c))
            else:
                cv_mean.append(None)
        d = _terms(arr[0], estimator, cv_mean[0]) - _terms(arr[1], estimator, cv_mean[1])
        n += d.size
        est = xa.estimate - xb.estimate
        if dependent:
            units = np.array([r["batch"] for r in recs[0]])
            se = clustered_se(d, units, float(d.mean()))
        else:
            se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
        ests.append(est)
        ses.append(se)
        se_unpaired.append(math.hypot(xa.std_error, xb.std_error))
    pooled = pool_prompts(ests, ses)
    if n_prompts == 1:
        pooled.update(std_error_population=math.nan, ci_population_low=math.nan, ci_population_high=math.nan)
    lo, hi = pooled["ci_low"], pooled["ci_high"]
    detail = {"candidate": names[0], "minus": names[1], "indistinguishable": bool(lo <= 0 <= hi),
              "se_unpaired": float(np.sqrt(np.sum(np.square(se_unpaired)))) / len(ses),
              "se_method": "paired: the same sequences of P, SE of the mean per-sequence difference"
                           + (" (clustered by unit)" if dependent else "")}
    return Row(None, estimator, pooled["estimate"], pooled["std_error"], (lo, hi), FORWARD,
               pooled["std_error_population"], (pooled["ci_population_low"], pooled["ci_population_high"]), n,
               details=detail, name=f"{names[0]} − {names[1]}")


# ------------------------------------------------------------------------------------------------ the result

@dataclass
class KLComparison:
    """Several candidates against one P on the same sequences of P: ``results`` (each candidate's KLResult, what its
    one-candidate run gives), ``names`` (short labels), ``table`` (per candidate its row of plain Monte Carlo from
    P with the compared estimator — RB+CV, or RB where RB+CV cannot be fitted: core.results.Row, in the given
    order), ``ranks`` (1 = closest to P),
    ``vs_best`` (each other candidate minus the closest: paired-difference Rows), ``shared`` (what was shared:
    proposals, P's kept bytes, whether P's rows were reproduced bit for bit), ``timing``."""

    results: list
    names: list[str]
    config: dict = field(repr=False)
    shared: dict = field(default_factory=dict)
    timing: dict = field(default_factory=dict, repr=False)
    folder: Path | None = None

    def __getitem__(self, name_or_index):
        return self.results[self._index(name_or_index)]

    def _index(self, x) -> int:
        return self.names.index(x) if isinstance(x, str) else int(x)

    @property
    def estimator(self) -> Estimator:
        """The estimator the table compares: RB+CV, or RB where RB+CV's control variate cannot be fitted on so few
        sequences (CV_TOO_FEW at some candidate: the verdicts then recommend RB too)."""
        from kl_estimation.core.results import Code

        cv = [_find(r.rows, COMPARED) for r in self.results]
        return Estimator.RB if any(r is None or r.has(Code.CV_TOO_FEW) for r in cv) else COMPARED

    def row(self, i, estimator: Estimator | str | None = None) -> Row:
        """Candidate i's row of plain Monte Carlo from P (over the prompt set); `estimator` MC, RB or RB+CV
        (default: the compared one)."""
        from kl_estimation.core.kinds import kind

        return _find(self[i].rows, self.estimator if estimator is None else kind(estimator) or estimator)

    @property
    def table(self) -> list[Row]:
        return [self.row(i) for i in range(len(self.results))]

    @property
    def ranks(self) -> list[int]:
        order = np.argsort([r.estimate for r in self.table], kind="stable")
        rank = np.empty(len(order), dtype=int)
        rank[order] = np.arange(1, len(order) + 1)
        return rank.tolist()

    @property
    def best(self) -> int:
        return self.ranks.index(1)

    def paired(self, a, b, estimator: Estimator | str | None = None) -> Row:
        """Candidate `a` minus candidate `b` (names or positions) for `estimator` (MC, RB or RB+CV; default: the
        compared one)."""
        from kl_estimation.core.kinds import kind

        ia, ib = self._index(a), self._index(b)
        est = self.estimator if estimator is None else kind(estimator) or estimator
        return paired_difference(self.results[ia], self.results[ib], est,
                                 (self.names[ia], self.names[ib]))

    @property
    def vs_best(self) -> list[Row | None]:
        b = self.best
        return [None if i == b else self.paired(i, b) for i in range(len(self.results))]

    def series(self, estimator: Estimator | str | None = None) -> list[Row]:
        """KL against position in the series (the candidates in the order given), each with its CI."""
        return [self.row(i, estimator) for i in range(len(self.results))]

    @property
    def text(self) -> str:
        rows, ranks, vs = self.table, self.ranks, self.vs_best
        width = max(9, *(len(n) for n in self.names))
        out = [f"====== {len(rows)} candidates against one P: plain Monte Carlo from P ({self.estimator}), one set of "
               f"sequences for all ======",
               f"{'rank':>4}  {'candidate':<{width}}  {'KL(P||Q)':>11}  {'std err':>9}  {'95% CI':<24}  flag"]
        for i in sorted(range(len(rows)), key=lambda i: ranks[i]):
            r = rows[i]
            ci = f"[{r.ci[0]:.5g}, {r.ci[1]:.5g}]"
            out.append(f"{ranks[i]:>4}  {self.names[i]:<{width}}  {r.estimate:>11.5g}  {r.std_error:>9.3g}  "
                       f"{ci:<24}  {r.flag or '-'}")
        out.append(f"paired differences against the closest candidate ({self.estimator}, the same sequences: SE of the "
                   f"per-sequence differences):")
        for i in sorted(range(len(rows)), key=lambda i: ranks[i]):
            d = vs[i]
            if d is None:
                continue
            verdict = "indistinguishable" if d.details["indistinguishable"] else "farther from P"
            out.append(f"  {d.proposal} = {d.estimate:+.5g} ± {d.std_error:.3g} [{d.ci[0]:+.5g}, {d.ci[1]:+.5g}] "
                       f"(unpaired SE {d.details['se_unpaired']:.3g}): {verdict}")
        per = [p for p in self.shared.get("per_candidate", [])]
        if per:
            out.append("drawn per candidate (their draws depend on Q): " + ", ".join(per))
        return "\n".join(out) + "\n"

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict:
        vs = self.vs_best
        return {"kind": "llm-candidates", "config": self.config, "candidates": self.names, "shared": self.shared,
                "timing": self.timing,
                "table": [dict(r.to_dict(), candidate=n, rank=k, model=self.results[i].config.get("q_model"),
                               folder=self._folder(i))
                          for i, (r, n, k) in enumerate(zip(self.table, self.names, self.ranks))],
                "vs_best": [d.to_dict() if d is not None else None for d in vs]}

    def _folder(self, i: int) -> str:
        return f"{CANDIDATES}/{i + 1:02d}-{self.names[i]}"

    def write(self, folder) -> Path:
        """comparison.json and comparison.csv beside the candidates' run folders (candidates/NN-name/)."""
        folder = Path(folder)
        d = self.to_dict()
        runio.write_json(folder / "comparison.json", dict(d, versions=runio.versions("torch", "transformers")))
        flat = []
        for row, v in zip(d["table"], d["vs_best"]):
            keep = {k: row.get(k) for k in ("rank", "candidate", "model", "estimator", "estimate", "std_error",
                                             "ci_low", "ci_high", "flag")}
            keep.update({f"vs_best_{k}": (v or {}).get(k) for k in ("proposal", "estimate", "std_error", "ci_low",
                                                                       "ci_high", "indistinguishable")})
            flat.append(keep)
        runio.write_csv(folder / "comparison.csv", flat)
        self.folder = folder
        return folder

    @classmethod
    def load(cls, folder) -> KLComparison:
        """A comparison from its folder: the candidates' run folders and comparison.json."""
        import json

        from kl_estimation.api import KLResult

        folder = Path(folder)
        d = json.loads((folder / "comparison.json").read_text())
        results = [KLResult.load(folder / row["folder"]) for row in d["table"]]
        return cls(results, d["candidates"], d["config"], d.get("shared", {}), d.get("timing", {}), folder)


# ------------------------------------------------------------------------------------------------ the run

def candidate_labels(names) -> list[str]:
    """Short names (llm.corpus.compare.labels: file stems less their common start); folders that share their last
    part (run/ckpt-100/model, run/ckpt-200/model) are named by the parts where they differ."""
    from kl_estimation.llm.corpus.compare import labels

    parts = [Path(str(n)).parts for n in names]
    if len({p[-1] for p in parts if p}) < len(names):
        k = 0
        while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
            k += 1
        names = ["-".join(p[k:]) for p in parts]
    return labels(names)


def run_candidates(cfg: LLMConfig, progress: bool = False) -> KLComparison:
    """P loaded once, its shared draws run once (P's pass), then each candidate in turn (loaded alone beside P)
    through the one-candidate run (api.run) on a pair that takes P's side of the shared draws from P's pass.
    With cfg.output_dir: each candidate's run folder under candidates/NN-name/ and comparison.json / .csv."""
    from transformers.utils import logging as hf_logging

    from kl_estimation import api
    from kl_estimation.core.resources import set_threads
    from kl_estimation.llm.loading import (
        gguf_speedups,
        load_model,
        load_tokenizers,
        pair_from_models,
        text_start,
    )
    from kl_estimation.llm.pair import DTYPES, _inner
    from kl_estimation.llm.run import distributed
    from kl_estimation.llm.run.config import resolve_device, resolve_dtype
    from kl_estimation.llm.run.runner import check_fits, draw, loading_options, models_record, plan_proposal
    from kl_estimation.llm.run.store import existing_outputs

    t0 = time.perf_counter()
    cfg = cfg.validate()
    if not cfg.several:
        raise ValueError("q_model: a comparison run takes several candidates")
    if cfg.p_model is None:
        raise ValueError("p_model: several candidates are compared against a `p_model` you give")
    if "P" not in cfg.proposals:
        raise ValueError("proposals: a comparison of candidates needs P (plain Monte Carlo from P), whose sequences "
                         "every candidate shares")
    cfg = replace(cfg, threads=set_threads(cfg.threads))
    names = candidate_labels(cfg.q_model)
    top = None if cfg.output_dir is None else Path(cfg.output_dir)
    if top is not None:
        runio.check_output_dir(top, "`output_dir`")
        if (top / "comparison.json").exists() and not (cfg.overwrite or cfg.resume):
            raise ValueError(f"output_dir: {top} already holds a comparison; pass `resume` to continue or reuse it, "
                             f"`overwrite` to replace it, or choose another folder")
    device = resolve_device(cfg.device)
    hf_logging.disable_progress_bar()
    with gguf_speedups():  # every tokenizer checked against P's before any weights load
        tokenizer = None
        for name in cfg.q_model:
            tokenizer, _ = load_tokenizers(cfg.p_model, name, p_revision=cfg.p_revision,
                                           trust_remote_code=cfg.trust_remote_code, ignore_eos=cfg.ignore_eos,
                                           chat_template=cfg.chat_template)
        p = load_model("p_model", cfg.p_model, device, DTYPES[resolve_dtype(cfg.p_dtype or cfg.dtype, device)],
                       cfg.device_map, cfg.offload, cfg.p_revision, cfg.trust_remote_code)
    if cfg.p_adapter:
        from kl_estimation.llm.loading import _with_adapters
        from kl_estimation.llm.pair import AdapterView

        p = AdapterView(_with_adapters(p, {"p": ("p_adapter", cfg.p_adapter)}, cfg.p_model), "p")
    scale = loading_options(cfg, device)
    shard = distributed.from_env(cfg.device)
    pair_p = pair_from_models(p, p, tokenizer, prompts=cfg.prompt_set, temperature=cfg.temperature,
                              ignore_eos=cfg.ignore_eos, chat_template=cfg.chat_template)
    check_fits(pair_p, cfg)
    store = SharedDraws(_inner(p).get_output_embeddings())
    recorder = RecordingPair(pair_p, store, cfg)
    shared = [(d, n) for d in cfg.directions for n in cfg.proposals if shares_draws(cfg, n, d)]
    per_candidate = [f"{d} {n}" for d in cfg.directions for n in cfg.proposals if not shares_draws(cfg, n, d)]
    runs = [plan_proposal(replace(cfg, q_model=cfg.q_model[0]), n, {}, None, shard, d) for d, n in shared]
    from kl_estimation.cost import Meter
    from kl_estimation.progress import bar as progress_bar

    total = sum(u.rows for r in runs for g in r.batches for u in g) * cfg.max_new_tokens  # sequence-tokens
    bar = progress_bar(total=total, desc=f"P's pass (shared by {len(names)} candidates)", unit="token") \
        if progress and total else None
    meter = Meter(bar, max(total, 1), probe=max(total, 1), make=lambda *a: None)  # the bar alone: no cost line
    try:
        for run in runs:
            draw(recorder, cfg, run, shard, meter)
    finally:
        if bar is not None:
            bar.close()
        store.close()
    t_p = time.perf_counter()
    results, timing = [], []
    for i, (name, label) in enumerate(zip(cfg.q_model, names)):
        t1 = time.perf_counter()
        if name == cfg.p_model:
            q = p
        else:
            with gguf_speedups():
                q = load_model("q_model", name, device, DTYPES[resolve_dtype(cfg.dtype, device)], cfg.device_map,
                               cfg.offload, None, cfg.trust_remote_code)
        pair = pair_from_models(p, q, tokenizer, prompts=cfg.prompt_set, temperature=cfg.temperature,
                                ignore_eos=cfg.ignore_eos, chat_template=cfg.chat_template)
        cq = replace(cfg, q_model=name, output_dir=None if top is None else str(top / CANDIDATES /
                                                                                f"{i + 1:02d}-{label}"))
        if cq.resume:  # a candidate the interrupted run never reached starts afresh
            cq = replace(cq, resume=bool(existing_outputs(cq.output_dir, cq.proposals, cq.directions)))
        models = models_record(cq, cfg.p_model, name, device, scale)
        models["text_start"] = text_start(tokenizer, cfg.chat_template)
        if progress:
            print(f"candidate {i + 1}/{len(names)}: {label}", flush=True)
        results.append(api.run(cq, CandidatePair(pair, store, cq), models, progress))
        del q, pair
        timing.append({"candidate": label, "s": time.perf_counter() - t1})
    info = {"proposals": [f"{d} {n}" for d, n in shared], "per_candidate": per_candidate,
            "p_hidden_bytes": store.nbytes, "p_rows_bit_exact": bool(store.exact),
            "p_rows": "P's head applied again to its kept final hidden states" if store.exact else
                      "P run again for every candidate (its head applied again did not reproduce its logits)"}
    out = KLComparison(results, names, dict(vars(cfg), q_model=list(cfg.q_model), proposals=list(cfg.proposals),
                                            prompts=list(cfg.prompt_set)), info,
                       {"p_pass_s": t_p - t0, "candidates": timing, "total_s": time.perf_counter() - t0})
    if top is not None and shard.writes_final:
        out.write(top)
    return out


def console(result: KLComparison, plots: bool = True) -> str:
    """What LLM_experiments.py prints for several candidates: each candidate's table (as its one-candidate run
    prints it), the comparison, the series figure and the folders."""
    from kl_estimation.llm.run.directions import direction_title
    from kl_estimation.report import llm_table

    out = []
    for i, (name, r) in enumerate(zip(result.names, result.results)):
        out.append(f"###### candidate {i + 1}/{len(result.names)}: {name}")
        out += [llm_table(r.rows_for(d), f"{direction_title(d)} (per sequence)") for d in r.directions]
    out.append(result.text)
    if result.folder is not None:
        if plots:
            from kl_estimation.figures.llm import candidates_figure

            out.append(f"figure: {candidates_figure(result, result.folder / 'plots' / 'candidates.png')}")
        out.append(f"output folder: {result.folder} (each candidate's run folder under {CANDIDATES}/)")
    return "\n".join(out)
