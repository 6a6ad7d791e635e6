r"""Long-tailed single-token model pairs (P = base, Q = "fine-tuned") for the synthetic experiments.

Families (ranks k = 1..V, all in float64, then normalised):

* ``zipf``        P(k) ∝ k^-s with s = 1.5.
* ``zipf-cutoff`` P(k) ∝ k^-s · exp(−max(k − 100, 0)/(V/10)): the power-law head, exponential decay after rank 100.
* ``mixture``     head exp(−0.05k) over the top h = min(100, V/10) ranks, power-law middle k^-1.3 up to V/2, slow tail
                  k^-0.7 beyond; pieces joined continuously, then multiplied by lognormal(0, 0.5) noise per token.

Q is P with probability mass moved (``shift_mass``): a random half of the tokens give up mass, in total a share
``s`` of all mass (low s = 0.1, medium s = 0.3, high s = 0.5), each keeping at least 1 % of its own probability (the
floor keeps KL(P‖Q) finite); the mass goes, with Dirichlet(1) shares, to a random tenth of the tokens outside the
top 100 of P that did not give. For ``high``, Q starts from the family with exponent 1.2 instead of s (the mixture's
middle exponent 1.3 → 1.2) before the 50 % shift. When the donors hold less than ``s``, all of them drop to the floor
and the moved mass (reported as ``moved_mass``) is smaller than ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAMILIES = ("zipf", "zipf-cutoff", "mixture")
SHIFTS = {"low": 0.1, "medium": 0.3, "high": 0.5}
DIVERGENCES = tuple(SHIFTS)
HIGH_EXPONENT = 1.2
MIN_VOCAB = {"zipf": 2, "zipf-cutoff": 200, "mixture": 20}
FLOOR = 0.01  # share of its own mass a donor keeps at least
TOP = 100  # the "head" ranks that receive no shifted mass


@dataclass(frozen=True)
class ModelPair:
    family: str
    divergence: str
    P: np.ndarray
    Q: np.ndarray
    moved_mass: float


def check_family(family: str, vocab_size: int) -> None:
    if family not in FAMILIES:
        raise ValueError(f"families: unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if vocab_size < MIN_VOCAB[family]:
        raise ValueError(f"vocab_size: family {family} needs a vocabulary of at least {MIN_VOCAB[family]} "
                         f"tokens (got {vocab_size})")


def base_weights(family: str, vocab_size: int, exponent: float | None = None, noise: np.ndarray | None = None):
    """Unnormalised weights over ranks 1..V; `exponent` replaces the family's power, `noise` multiplies (mixture)."""
    k = np.arange(1, vocab_size + 1, dtype=np.float64)
    if family == "zipf":
        return k ** -(exponent or 1.5)
    if family == "zipf-cutoff":
        s = exponent or 1.5
        return k ** -s * np.exp(-np.maximum(k - TOP, 0.0) / (vocab_size / 10))
    # mixture: three pieces, each scaled to meet the previous one, so the shape has no jumps.
    s = exponent or 1.3
    h, mid_end = max(1, min(TOP, vocab_size // 10)), vocab_size // 2
    head = np.exp(-0.05 * k)
    middle = np.exp(-0.05 * h) * (k / h) ** -s
    tail = np.exp(-0.05 * h) * (mid_end / h) ** -s * (k / mid_end) ** -0.7
    w = np.where(k <= h, head, np.where(k <= mid_end, middle, tail))
    return w * noise if noise is not None else w


def _rank(x: np.ndarray) -> np.ndarray:
    """Rank of each entry along the last axis (0 = smallest; ties by position)."""
    return np.argsort(np.argsort(x, axis=-1, kind="stable"), axis=-1, kind="stable")


def shift_mass(p: np.ndarray, share: float, rng: np.random.Generator):
    """Move `share` of the probability mass of each row of `p` (last axis; see the module docstring).

    Returns (q, moved mass per row). Vectorised over leading axes, so whole Markov tables shift at once.
    """
    V = p.shape[-1]
    donors = _rank(rng.random(p.shape)) < V // 2
    head = _rank(-p) < min(TOP, V // 2)
    pool = ~donors & ~head
    pool = np.where(pool.any(-1, keepdims=True), pool, ~donors)
    recipients = _rank(np.where(pool, rng.random(p.shape), np.inf)) < np.maximum(1, pool.sum(-1, keepdims=True) // 10)
    donor_mass = np.sum(p * donors, axis=-1, keepdims=True)
    cut = np.minimum(share / donor_mass, 1.0 - FLOOR)
    moved = donor_mass * cut
    gift = np.where(recipients, rng.standard_exponential(p.shape), 0.0)  # Dirichlet(1) shares, normalised below
    # No renormalisation: q sums to 1 up to rounding already, and untouched tokens keep q == p exactly (log P/Q = 0).
    q = np.where(donors, p * (1.0 - cut), p) + moved * gift / gift.sum(-1, keepdims=True)
    return q, moved[..., 0]


def model_pair(family: str, divergence: str, vocab_size: int, rng: np.random.Generator) -> ModelPair:
    """P and Q for one (family, divergence), deterministic given `rng`."""
    check_family(family, vocab_size)
    if divergence not in SHIFTS:
        raise ValueError(f"divergence: unknown level {divergence!r}; allowed: {', '.join(DIVERGENCES)}, all")
    noise = rng.lognormal(0.0, 0.5, size=vocab_size) if family == "mixture" else None
    p = base_weights(family, vocab_size, noise=noise)
    p /= p.sum()
    q0 = base_weights(family, vocab_size, HIGH_EXPONENT, noise) if divergence == "high" else p
    q, moved = shift_mass(q0 / q0.sum(), SHIFTS[divergence], rng)
    return ModelPair(family, divergence, p, q, float(moved))


def top_mass(p: np.ndarray, k: int) -> float:
    return float(np.sort(p)[::-1][:k].sum())
