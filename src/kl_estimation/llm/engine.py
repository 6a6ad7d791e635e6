r"""The sampling engine: sequences drawn token by token from a proposal, with every per-step value kept.

Target: KL(P‖Q) of the sequence process truncated at T tokens (or at EOS, whichever comes first), after a prompt:
KL = E_P[Σ_t log P_t(x_t)/Q_t(x_t)], where P_t, Q_t are the tempered next-token distributions given the prefix.

A *sequence proposal* draws x_t ~ r_t = proposal(P_t, Q_t) with a registry proposal applied to each step's rows,
or, for the prefix-aware variants, with |log P/Q| replaced by |L_<t + log P_t/Q_t|, L_<t = Σ_{s<t} log P/Q(x_s): the
running log-ratio of the prefix (done by handing the registry function log Q_t − L_<t). Proposal "P" is plain
Monte Carlo. Per step the engine keeps log P_t(x_t), log Q_t(x_t), log r_t(x_t) and the exact KL(P_t‖Q_t), so every
estimator (estimators.sequence_estimates) can be recomputed later from the saved arrays alone.

The engine knows nothing of files or of where prompts come from: a pair (llm/pair.py) holds a tokenized prompt set
and ``pair.start(prompt_rows)`` starts one sequence per row from the given prompts (left-padded inside the pair).
Tokens come from a draw source (draws/): i.i.d. or any other way of drawing that keeps each sequence an exact draw.
Batched over sequences, one forward per model per step on a KV cache. (Sampling from P with P alone and scoring Q in
one teacher-forced pass measured slower on CPU — 0.50 s against 0.41 s for 256 × 20 tokens, bench/bench_llm.py — as
it holds (B, T, V) arrays.) A sequence that emits EOS stops contributing: its later steps are masked out (the model
still gets a token so the batch stays rectangular).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kl_estimation.core.draws import draw_step, make_source
from kl_estimation.core.proposals import REGISTRY, Proposal, by_name
from kl_estimation.core.streams import torch_stream

P_NAME = "P"
PREFIX_SUFFIX = " [prefix-aware]"
# Families whose formula depends on Q only through log P/Q or a per-row constant factor: shifting log Q by the
# prefix log-ratio then means exactly "use the running sequence log-ratio".
PREFIX_FAMILIES = ("Alpha-mixture", "Exponential family", "Balanced 1", "Balanced 3", "Adaptive", "Optimal")


@dataclass(frozen=True)
class SequenceProposal:
    name: str
    base: Proposal | None = None  # None: P itself
    prefix_aware: bool = False

    def __call__(self, log_p, log_q, prefix_log_ratio):
        if self.base is None:
            return log_p
        if self.prefix_aware:
            log_q = log_q - prefix_log_ratio[:, None].to(log_q.dtype)
        return self.base(log_p, log_q)


def sequence_proposal(name: str) -> SequenceProposal:
    """'P', a registry name such as 'Geometric (β=0.5)', or one with the suffix ' [prefix-aware]'."""
    if name == P_NAME:
        return SequenceProposal(P_NAME)
    prefix = name.endswith(PREFIX_SUFFIX)
    base_name = name[: -len(PREFIX_SUFFIX)] if prefix else name
    try:
        base = by_name(base_name)
    except ValueError:
        raise ValueError(f"proposals: unknown proposal {name!r}; allowed: P, a registry name such as "
                         f"'Geometric (β=0.5)' or 'Optimal' (families: {', '.join(REGISTRY)}), optionally followed by "
                         f"'{PREFIX_SUFFIX.strip()}' for {', '.join(PREFIX_FAMILIES)}") from None
    if prefix and base.family not in PREFIX_FAMILIES:
        raise ValueError(f"proposals: {base.family} has no prefix-aware variant; allowed for: "
                         f"{', '.join(PREFIX_FAMILIES)}")
    return SequenceProposal(name, base, prefix)


@dataclass
class Batch:
    """Per-step arrays (B, T) of one batch; steps after a sequence's EOS have mask False."""

    token_ids: np.ndarray
    log_p: np.ndarray
    log_q: np.ndarray
    log_r: np.ndarray
    kl_step: np.ndarray
    mask: np.ndarray
    uncovered: np.ndarray  # P-mass of the tokens the proposal cannot draw at that step (> 0: IS is biased)


def exact_step_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P_t‖Q_t) per row, accumulated in float64; 0·log 0 = 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1, dtype=torch.float64)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx[..., None])[..., 0].double()


def unit_generator(seed: int, proposal: str, batch_index: int, device, prompt_index: int = 0) -> torch.Generator:
    """The random stream of one unit (prompt × proposal × batch), derived from names and positions only: a resumed
    or re-packed run redraws nothing it kept and draws the same records."""
    return torch_stream(seed, proposal, batch_index, prompt_index, device=device)


@torch.inference_mode()
def sample_batch(pair, proposal: SequenceProposal, n: int, max_new_tokens: int, generator, *, prompt_rows=None,
                 sampler: str = "iid") -> Batch:
    """Draw `n` sequences of up to `max_new_tokens` tokens from the proposal; one Python iteration per step.

    `generator`: a torch.Generator for all n rows, or a list of (torch.Generator, rows) — one per unit, in row order.
    `prompt_rows`: (n,) indices into the pair's prompt set (default: prompt 0 for every row).
    `sampler`: the draw source (draws.DRAWS).
    """
    streams = [(generator, n)] if isinstance(generator, torch.Generator) else list(generator)
    if sum(rows for _, rows in streams) != n:
        raise ValueError(f"generator: the units' rows add up to {sum(r for _, r in streams)}, not n = {n}")
    rows = torch.zeros(n, dtype=torch.long) if prompt_rows is None else torch.as_tensor(prompt_rows)
    log_p, log_q, state = pair.start(rows)
    dev = log_p.device
    draw = make_source(sampler, streams, max_new_tokens, dev)
    alive = torch.ones(n, dtype=torch.bool, device=dev)
    prefix = torch.zeros(n, dtype=torch.float64, device=dev)
    cols = {k: [] for k in ("token_ids", "log_p", "log_q", "log_r", "kl_step", "mask", "uncovered")}
    for t in range(max_new_tokens):
        log_r = proposal(log_p, log_q, prefix)
        kl = exact_step_kl(log_p, log_q)
        x = draw_step(draw, t, log_r, torch.where(alive, kl, 0.0))
        lp_x, lq_x = _gather(log_p, x), _gather(log_q, x)
        cols["token_ids"].append(x)
        cols["log_p"].append(lp_x)
        cols["log_q"].append(lq_x)
        cols["log_r"].append(lp_x if proposal.base is None else _gather(log_r, x))
        cols["kl_step"].append(kl)
        cols["mask"].append(alive.clone())
        cols["uncovered"].append(torch.zeros_like(prefix) if proposal.base is None else  # r = P misses nothing
                                 torch.where(log_r == -math.inf, log_p.exp(), 0.0).sum(-1, dtype=torch.float64))
        prefix += torch.where(alive, lp_x - lq_x, 0.0)
        if pair.eos_token_id is not None:
            alive &= x != pair.eos_token_id
        if t + 1 < max_new_tokens and alive.any():
            log_p, log_q, state = pair.step(state, x)
        elif t + 1 < max_new_tokens:  # every sequence ended: the remaining steps are masked out
            for k in cols:
                cols[k] += [torch.zeros_like(cols[k][-1])] * (max_new_tokens - t - 1)
            break
    return Batch(**{k: torch.stack(v, dim=1).cpu().numpy() for k, v in cols.items()})
