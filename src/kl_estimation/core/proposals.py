r"""Proposal distributions r built from P and Q: one registry for the synthetic and the LLM halves.

Every proposal takes next-token log-probabilities ``log_p`` and ``log_q`` (numpy arrays or torch tensors of shape
``(..., V)``) and returns ``log r`` of the same shape, normalised over the last axis. With ``f = log P/Q``:

=====================  ==========================================  =====================
family                 r                                           parameter
=====================  ==========================================  =====================
Alpha-mixture          α·normalize(P|f|) + (1−α)·P                 α ∈ [0, 1] (weight)
Geometric              ∝ P^β Q^(1−β)                               β ≥ 0
Fixed mixture          λP + (1−λ)Q                                 λ ∈ [0, 1]
Chi-square aware       ∝ P·(P/Q)^α                                 α ≥ 0
Cross-entropy tilted   ∝ P·exp(t·(−P log Q))                       t ≥ 0
Exponential family     ∝ P·exp(β|f|)                               β ≥ 0
Balanced 1             ∝ √(PQ)·|f|
Balanced 2             ∝ √(P·|f|·Q/(P+Q))
Balanced 3             ∝ √(PQ·(f²+1))
Adaptive               ∝ P·(1+|f|)
Optimal                ∝ P·|f|   (zero-variance ceiling when f keeps one sign; needs the exact KL-scale P|f|)
=====================  ==========================================  =====================

All math is in log space, so P·exp(5|f|) or P^β Q^(1−β) never overflow. Tokens with P = 0 get f = 0: they carry no
KL, and proposals built from P alone leave them out. A row on which every weight is 0 (P = Q there) falls back to P.

Adding a proposal is one function ``fn(log_p, log_q[, param]) -> unnormalised log weight`` and one ``REGISTRY`` line.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from kl_estimation.core.xp import array_namespace, log_normalize

ALPHA_GRID = "--alpha-values"  # marks families whose grid follows --alpha-values
DEFAULT_ALPHA_VALUES = (0.3, 0.5, 0.7, 0.9)


def log_ratio(log_p, log_q):
    """f = log P/Q, with f = 0 where P = 0 (those tokens carry no KL; this also avoids −inf − (−inf))."""
    xp = array_namespace(log_p, log_q)
    return xp.where(log_p == -math.inf, xp.zeros_like(log_p), log_p - log_q)


def _log_abs_f(log_p, log_q):
    xp = array_namespace(log_p, log_q)
    return xp.log(xp.abs(log_ratio(log_p, log_q)))


def _log_optimal(log_p, log_q):
    return log_normalize(log_p + _log_abs_f(log_p, log_q), log_p)


def alpha_mixture(log_p, log_q, alpha):
    xp = array_namespace(log_p, log_q)
    if alpha == 0:
        return log_p
    if alpha == 1:
        return _log_optimal(log_p, log_q)
    return xp.logaddexp(math.log(alpha) + _log_optimal(log_p, log_q), math.log1p(-alpha) + log_p)


def geometric(log_p, log_q, beta):
    xp = array_namespace(log_p, log_q)
    if beta == 0:
        return log_q
    # P = 0 ⇒ r = 0 for β > 0; the explicit where also avoids −inf + inf when β > 1 and Q = 0.
    return xp.where(log_p == -math.inf, log_p, beta * log_p + (1 - beta) * log_q)


def fixed_mixture(log_p, log_q, lam):
    xp = array_namespace(log_p, log_q)
    if lam in (0, 1):
        return log_p if lam == 1 else log_q
    return xp.logaddexp(math.log(lam) + log_p, math.log1p(-lam) + log_q)


def chi_square_aware(log_p, log_q, alpha):
    return log_p + alpha * log_ratio(log_p, log_q)


def cross_entropy_tilted(log_p, log_q, t):
    xp = array_namespace(log_p, log_q)
    # −P log Q is 0 where P = 0, whatever Q is.
    ce = xp.where(log_p == -math.inf, xp.zeros_like(log_p), -xp.exp(log_p) * log_q)
    return log_p + t * ce


def exponential_family(log_p, log_q, beta):
    xp = array_namespace(log_p, log_q)
    return log_p + beta * xp.abs(log_ratio(log_p, log_q))


def balanced_1(log_p, log_q):
    return 0.5 * (log_p + log_q) + _log_abs_f(log_p, log_q)


def balanced_2(log_p, log_q):
    xp = array_namespace(log_p, log_q)
    return 0.5 * (log_p + _log_abs_f(log_p, log_q) + log_q - xp.logaddexp(log_p, log_q))


def balanced_3(log_p, log_q):
    xp = array_namespace(log_p, log_q)
    f = log_ratio(log_p, log_q)
    return 0.5 * (log_p + log_q + xp.log1p(f * f))


def adaptive(log_p, log_q):
    xp = array_namespace(log_p, log_q)
    return log_p + xp.log1p(xp.abs(log_ratio(log_p, log_q)))


def optimal(log_p, log_q):
    return log_p + _log_abs_f(log_p, log_q)


@dataclass(frozen=True)
class Family:
    fn: Callable
    symbol: str | None = None  # parameter symbol shown in names, None for parameter-free proposals
    low: float = 0.0
    high: float = math.inf
    grid: str | tuple = ()  # ALPHA_GRID or a fixed tuple of parameters


# One line per proposal family: function, parameter symbol, allowed range, default grid.
REGISTRY: dict[str, Family] = {
    "Alpha-mixture": Family(alpha_mixture, "α", 0.0, 1.0, ALPHA_GRID),
    "Geometric": Family(geometric, "β", 0.0, math.inf, ALPHA_GRID),
    "Fixed mixture": Family(fixed_mixture, "λ", 0.0, 1.0, ALPHA_GRID),
    "Chi-square aware": Family(chi_square_aware, "α", 0.0, math.inf, ALPHA_GRID),
    "Cross-entropy tilted": Family(cross_entropy_tilted, "t", 0.0, math.inf, ALPHA_GRID),
    "Exponential family": Family(exponential_family, "β", 0.0, math.inf, (0.1, 0.5, 1.0, 2.0, 5.0)),
    "Balanced 1": Family(balanced_1),
    "Balanced 2": Family(balanced_2),
    "Balanced 3": Family(balanced_3),
    "Adaptive": Family(adaptive),
    "Optimal": Family(optimal),
}


@dataclass(frozen=True)
class Proposal:
    """One registry member with its parameter bound; calling it gives normalised log r."""

    name: str
    family: str
    param: float | None = None

    def __call__(self, log_p, log_q):
        fam = REGISTRY[self.family]
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            log_w = fam.fn(log_p, log_q) if fam.symbol is None else fam.fn(log_p, log_q, self.param)
            return log_normalize(log_w, log_p)


def _fmt(x: float) -> str:
    return f"{x:g}"


def proposal(family: str, param: float | None = None) -> Proposal:
    """The registry proposal `family` with parameter `param`; ValueError for unknown names or out-of-range values."""
    if family not in REGISTRY:
        raise ValueError(f"unknown proposal family {family!r}; allowed: {', '.join(REGISTRY)}")
    fam = REGISTRY[family]
    if fam.symbol is None:
        if param is not None:
            raise ValueError(f"proposal {family!r} takes no parameter (got {param!r})")
        return Proposal(family, family)
    if param is None or not (fam.low <= float(param) <= fam.high):  # NaN fails this test too
        hi = "∞)" if fam.high == math.inf else f"{_fmt(fam.high)}]"
        raise ValueError(f"{family} {fam.symbol} must be in [{_fmt(fam.low)}, {hi} (got {param!r})")
    param = float(param)
    return Proposal(f"{family} ({fam.symbol}={_fmt(param)})", family, param)


def build_proposals(alpha_values: Sequence[float] = DEFAULT_ALPHA_VALUES,
                    families: Sequence[str] | None = None) -> list[Proposal]:
    """Every registry proposal over its grid (families whose grid is --alpha-values use `alpha_values`)."""
    out = []
    for family in (REGISTRY if families is None else families):
        if family not in REGISTRY:
            raise ValueError(f"unknown proposal family {family!r}; allowed: {', '.join(REGISTRY)}")
        fam = REGISTRY[family]
        if fam.symbol is None:
            out.append(proposal(family))
        else:
            out.extend(proposal(family, a) for a in (alpha_values if fam.grid == ALPHA_GRID else fam.grid))
    return out


def by_name(name: str, alpha_values: Sequence[float] = DEFAULT_ALPHA_VALUES) -> Proposal:
    """Parse a name as printed in outputs, e.g. ``'Geometric (β=0.5)'`` or ``'Optimal'``."""
    if "(" in name and name.endswith(")"):
        family, _, rest = name.partition(" (")
        _, _, value = rest[:-1].partition("=")
        try:
            return proposal(family, float(value))
        except ValueError as err:
            if family in REGISTRY and REGISTRY[family].symbol:
                raise
            raise ValueError(f"unknown proposal {name!r}; allowed e.g.: {_examples(alpha_values)}") from err
    if name in REGISTRY and REGISTRY[name].symbol is None:
        return proposal(name)
    raise ValueError(f"unknown proposal {name!r}; allowed e.g.: {_examples(alpha_values)}")


def _examples(alpha_values) -> str:
    return ", ".join(p.name for p in build_proposals(alpha_values[:1]))
