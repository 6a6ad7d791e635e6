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
from kl_estimation.core.proposals import REGISTRY, Proposal, by_name
from kl_estimation.core.streams import torch_stream

P_NAME = "P"  # the label of plain Monte Carlo
P_KEY = "p"  # ... and its key
PREFIX_SUFFIX = " [prefix-aware]"
KEY_PREFIX_SUFFIX = "_prefix-aware"
# Families whose formula depends on Q only through log P/Q or a per-row constant factor: shifting log Q by the
# prefix log-ratio then means exactly "use the running sequence log-ratio".
PREFIX_FAMILIES = ("Alpha-mixture", "Exponential family", "Balanced 1", "Balanced 3", "Adaptive", "Optimal")
# Directions: forward estimates KL(P‖Q) from sequences of P, reverse KL(Q‖P) from sequences of Q (SwappedPair).
FORWARD, REVERSE = "forward", "reverse"
DIRECTIONS = (FORWARD, REVERSE)
SAMPLED_FROM = {FORWARD: "P", REVERSE: "Q"}  # the model whose sequences a direction draws (its "P" proposal)
TARGET = {FORWARD: "KL(P‖Q)", REVERSE: "KL(Q‖P)"}


@dataclass(frozen=True)
class SequenceProposal:
    """A sequence proposal as a typed identity: the token-level registry proposal `base` (None: P itself, plain
    Monte Carlo) and whether |log P/Q| is the running prefix log-ratio (`prefix_aware`).

    ``key`` (ASCII, stable: ``p``, ``geometric_beta-0.5``, ``adaptive_prefix-aware``) names the proposal's random
    streams (unit_generator), its files (llm.run.store.slug) and its run key; ``label`` (``Geometric (β=0.5)``,
    ``Adaptive [prefix-aware]``) is what people read. ``name`` is the label."""

    base: Proposal | None = None
    prefix_aware: bool = False

    @property
    def is_p(self) -> bool:
        return self.base is None

    @property
    def key(self) -> str:
        if self.base is None:
            return P_KEY
        return self.base.key + ("_prefix-aware" if self.prefix_aware else "")

    @property
    def label(self) -> str:
        if self.base is None:
            return P_NAME
        return self.base.label + (PREFIX_SUFFIX if self.prefix_aware else "")

    @property
    def name(self) -> str:
        return self.label

    @property
    def family(self) -> str:
        """The registry family, or "P"."""
        return P_NAME if self.base is None else self.base.family

    def record(self) -> dict:
        """What a run's files say about the proposal: key, label, family, parameter, prefix_aware."""
        return dict(key=self.key, label=self.label, family=self.family,
                    param=None if self.base is None else self.base.param, prefix_aware=self.prefix_aware)

    def __call__(self, log_p, log_q, prefix_log_ratio):
        if self.base is None:
            return log_p
        if self.prefix_aware:
            log_q = log_q - prefix_log_ratio[:, None].to(log_q.dtype)
        return self.base(log_p, log_q)


def _allowed() -> str:
    return (f"allowed: P, a registry name such as 'Geometric (β=0.5)' (or 'Geometric (beta=0.5)') or 'Optimal' "
            f"(families: {', '.join(REGISTRY)}), optionally followed by '{PREFIX_SUFFIX.strip()}' for "
            f"{', '.join(PREFIX_FAMILIES)}")


def _also() -> str:
    return f"; also P (plain Monte Carlo) and '<name>{PREFIX_SUFFIX}' for {', '.join(PREFIX_FAMILIES)}"


def sequence_proposal(name) -> SequenceProposal:
    """Parse a proposal strictly: 'P', a registry name such as 'Geometric (β=0.5)' (ASCII alias 'Geometric
    (beta=0.5)'), or one with the suffix ' [prefix-aware]'; also a key ('p', 'geometric_beta-0.5',
    'adaptive_prefix-aware') or a SequenceProposal (returned as it is). ValueError starting with 'proposals:',
    with a "did you mean" where a name is close."""
    if isinstance(name, SequenceProposal):
        return name
    if not isinstance(name, str):
        raise ValueError(f"proposals: a proposal is named by a string (got {name!r})")
    text = name.strip()
    if text in (P_NAME, P_KEY):
        return SequenceProposal()
    base_name, prefix = text, False
    if text.endswith(KEY_PREFIX_SUFFIX) and "(" not in text and " " not in text:
        base_name, prefix = text[: -len(KEY_PREFIX_SUFFIX)], True
    elif "[" in text:
        base_name, _, tail = text.partition("[")
        base_name, tail = base_name.strip(), "[" + tail
        if tail != PREFIX_SUFFIX.strip():
            raise ValueError(f"proposals: unknown suffix {tail!r} in {name!r}; did you mean "
                             f"{base_name + PREFIX_SUFFIX!r}? ({_allowed()})")
        prefix = True
    if base_name.casefold() in ("p", "mc") and not prefix:
        raise ValueError(f"proposals: unknown proposal {name!r}; did you mean 'P'? ({_allowed()})")
    try:
        base = by_name(base_name)
    except ValueError as err:
        raise ValueError(f"{err}{_also()}" if "unknown proposal" in str(err) else str(err)) from None
    if prefix and base.family not in PREFIX_FAMILIES:
        raise ValueError(f"proposals: {base.family} has no prefix-aware variant; allowed for: "
                         f"{', '.join(PREFIX_FAMILIES)}")
    return SequenceProposal(base, prefix)


def parse_proposals(names) -> list[SequenceProposal]:
    """Every name parsed (sequence_proposal), refusing two names of one proposal ('Geometric (β=0.5)' and
    'Geometric (beta=0.5)' share a key: their files and streams would collide)."""
    out, seen = [], {}
    for name in names:
        prop = sequence_proposal(name)
        if prop.key in seen:
            raise ValueError(f"proposals: {seen[prop.key]!r} and {name!r} are the same proposal ({prop.label})")
        seen[prop.key] = name
        out.append(prop)
    return out


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


def proposal_label(name, direction: str = FORWARD) -> str:
    """A proposal's name in a direction's outputs, whatever spelling named it: its label, except that plain Monte
    Carlo ("P", the sampling model) is "Q" in reverse (every other formula is taken with Q in P's place)."""
    prop = sequence_proposal(name)
    return SAMPLED_FROM[direction] if prop.is_p else prop.label


def pair_view(pair, direction: str = FORWARD):
    """The pair as a direction samples it: itself for forward, P and Q swapped for reverse."""
    if direction == FORWARD:
        return pair
    if direction == REVERSE:
        return SwappedPair(pair)
    raise ValueError(f"direction: unknown direction {direction!r}; allowed: {', '.join(DIRECTIONS)}")


@torch.inference_mode()
def sample_batch(pair, proposal: SequenceProposal, n: int, max_new_tokens: int, generator, *, prompt_rows=None,
                 sampler: str = "iid", exclude=None) -> Batch:
    """Draw `n` sequences of up to `max_new_tokens` tokens from the proposal; one Python iteration per step.

    `generator`: a torch.Generator for all n rows, or a list of (torch.Generator, rows) — one per unit, in row order.
    `prompt_rows`: (n,) indices into the pair's prompt set (default: prompt 0 for every row).
    `sampler`: the draw source (draws.DRAWS).
    `exclude`: a head.Head of the rows' prompt: draw from the proposal conditioned on not ending in its sequences;
    ``log_r`` then holds the conditioned r′ and ``log_p_cond`` the conditioned P′ (llm/head.py).
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
            break
    return Batch(**{k: torch.stack(v, dim=1).cpu().numpy() for k, v in cols.items()})
