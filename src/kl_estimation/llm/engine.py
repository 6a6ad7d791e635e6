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

Directions: the reverse KL(Q‖P) = E_Q[Σ_t log Q_t/P_t] is the same problem with the roles swapped, so
``pair_view(pair, "reverse")`` (a :class:`SwappedPair`) hands the engine (log Q, log P) and everything above runs
unchanged; in its records ``log_p`` is then the sampling model's (Q's) log-probability, ``log_q`` the other's (P's),
``kl_step`` KL(Q_t‖P_t). Sequences from P and from Q are different sequences, so the two directions share no
forward pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kl_estimation.core.draws import draw_step, make_source
from kl_estimation.core.exact import kl_rows
from kl_estimation.core.proposals import (  # noqa: F401  (the sequence-proposal identity, re-exported)
    DIRECTIONS,
    FORWARD,
    KEY_PREFIX_SUFFIX,
    P_KEY,
    P_NAME,
    PREFIX_FAMILIES,
    PREFIX_SUFFIX,
    REVERSE,
    SAMPLED_FROM,
    TARGET,
    SequenceProposal,
    parse_proposals,
    proposal_label,
    sequence_proposal,
)
from kl_estimation.core.streams import torch_stream


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
    log_p_cond: np.ndarray | None = None  # drawn with `exclude`: log P′ (P conditioned on leaving the head)


def exact_step_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(P_t‖Q_t) per row, accumulated in float64 (core.exact.kl_rows: 0·log 0 = 0)."""
    return kl_rows(log_p, log_q, accumulate=torch.float64)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, idx[..., None])[..., 0].double()


def unit_generator(seed: int, proposal, batch_index: int, device, prompt_index: int = 0,
                   direction: str = FORWARD) -> torch.Generator:
    """The random stream of one unit (direction × prompt × proposal × batch), derived from identities and positions
    only: a resumed or re-packed run redraws nothing it kept and draws the same records.

    `proposal`: a SequenceProposal — its stable ``key`` names the stream, so relabelling a proposal never changes
    its draws — or a plain string used as it is (a stream name of a study or test, e.g. "reference"). A reverse
    unit's stream has the direction as one more name, so it differs from the forward unit's."""
    name = proposal.key if isinstance(proposal, SequenceProposal) else proposal
    names = (name, batch_index, prompt_index) + (() if direction == FORWARD else (direction,))
    return torch_stream(seed, *names, device=device)


# ------------------------------------------------------------------------------------------------ directions

class SwappedPair:
    """A pair with the roles of P and Q swapped: ``start`` / ``step`` return (log Q, log P, state). Sampling from it
    with proposal "P" draws sequences from Q, and every estimator, proposal and diagnostic then estimates KL(Q‖P)
    unchanged — a proposal is built from the sampling model (Q) and the other one (P) by the same formula. Every
    other attribute (vocab_size, eos_token_id, device, decode, prompt lengths, …) is the wrapped pair's."""

    def __init__(self, pair):
        self.pair = pair

    def start(self, prompt_rows):
        log_p, log_q, state = self.pair.start(prompt_rows)
        return log_q, log_p, state

    def step(self, state, tokens):
        log_p, log_q, state = self.pair.step(state, tokens)
        return log_q, log_p, state

    def __getattr__(self, name):
        if name == "pair":  # not set yet (copy / unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.pair, name)


def pair_view(pair, direction: str = FORWARD):
    """The pair as a direction samples it: itself for forward, P and Q swapped for reverse."""
    if direction == FORWARD:
        return pair
    if direction == REVERSE:
        return SwappedPair(pair)
    raise ValueError(f"direction: unknown direction {direction!r}; allowed: {', '.join(DIRECTIONS)}")


@torch.inference_mode()
def sample_batch(pair, proposal: SequenceProposal, n: int, max_new_tokens: int, generator, *, prompt_rows=None,
                 sampler: str = "iid", exclude=None, on_step=None) -> Batch:
    """Draw `n` sequences of up to `max_new_tokens` tokens from the proposal; one Python iteration per step.

    `generator`: a torch.Generator for all n rows, or a list of (torch.Generator, rows) — one per unit, in row order.
    `prompt_rows`: (n,) indices into the pair's prompt set (default: prompt 0 for every row).
    `sampler`: the draw source (draws.DRAWS).
    `exclude`: a head.Head of the rows' prompt: draw from the proposal conditioned on not ending in its sequences;
    ``log_r`` then holds the conditioned r′ and ``log_p_cond`` the conditioned P′ (llm/head.py).
    `on_step(k)`: called as the steps are done (k of them; the skipped ones at once when every row has ended), for a
    progress bar and the cost probe (cost.py); it sees nothing of the draws.
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
    cols = {k: [] for k in ("token_ids", "log_p", "log_q", "log_r", "kl_step", "mask", "uncovered")
            + (() if exclude is None else ("log_p_cond",))}
    node = None if exclude is None else exclude.roots(n, dev)
    for t in range(max_new_tokens):
        log_r = proposal(log_p, log_q, prefix)
        log_p_draw = log_p
        if exclude is not None:
            log_p_draw, log_r = exclude.condition(node, log_p, log_r)
        kl = exact_step_kl(log_p, log_q)
        x = draw_step(draw, t, log_r, torch.where(alive, kl, 0.0))
        lp_x, lq_x = _gather(log_p, x), _gather(log_q, x)
        cols["token_ids"].append(x)
        cols["log_p"].append(lp_x)
        cols["log_q"].append(lq_x)
        cols["log_r"].append(lp_x if proposal.base is None and exclude is None else _gather(log_r, x))
        cols["kl_step"].append(kl)
        cols["mask"].append(alive.clone())
        cols["uncovered"].append(torch.zeros_like(prefix) if proposal.base is None else  # r = P misses nothing
                                 torch.where(log_r == -math.inf, log_p_draw.exp(), 0.0).sum(-1, dtype=torch.float64))
        if exclude is not None:
            cols["log_p_cond"].append(_gather(log_p_draw, x))
            node = exclude.advance(node, x)
        prefix += torch.where(alive, lp_x - lq_x, 0.0)
        if pair.eos_token_id is not None:
            alive &= x != pair.eos_token_id
        if t + 1 < max_new_tokens and alive.any():
            log_p, log_q, state = pair.step(state, x)
        elif t + 1 < max_new_tokens:  # every sequence ended: the remaining steps are masked out
            for k in cols:
                cols[k] += [torch.zeros_like(cols[k][-1])] * (max_new_tokens - t - 1)
            if on_step is not None:
                on_step(max_new_tokens - t)
            break
        if on_step is not None:
            on_step(1)
    return Batch(**{k: torch.stack(v, dim=1).cpu().numpy() for k, v in cols.items()})
