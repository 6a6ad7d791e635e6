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

Identity and display are separate: a proposal's ``key`` (ASCII, from the registry's ``key`` and the parameter's ASCII
name: ``geometric_beta-0.5``, ``optimal``) names its random streams, files and run keys; its ``label``
(``Geometric (β=0.5)``) is for people. ``by_name`` parses labels, their ASCII aliases (``Geometric (beta=0.5)``), the
value alone (``Geometric(0.5)``: each family has one parameter) and keys strictly, with a "did you mean" for near
misses.
"""
from __future__ import annotations

import difflib
import math
import re
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


# ------------------------------------------------------------------------------------------------ identities

@dataclass(frozen=True)
class Family:
    fn: Callable
    key: str  # stable ASCII identity of the family (random streams, file names, run keys): never change it
    symbol: str | None = None  # parameter symbol shown to people, None for parameter-free proposals
    ascii: str | None = None  # the parameter's ASCII name: accepted when parsing, used in keys
    low: float = 0.0
    high: float = math.inf
    grid: str | tuple = ()  # ALPHA_GRID or a fixed tuple of parameters


# One line per proposal family: function, key, parameter symbol and its ASCII name, allowed range, default grid.
REGISTRY: dict[str, Family] = {
    "Alpha-mixture": Family(alpha_mixture, "alpha-mixture", "α", "alpha", 0.0, 1.0, ALPHA_GRID),
    "Geometric": Family(geometric, "geometric", "β", "beta", 0.0, math.inf, ALPHA_GRID),
    "Fixed mixture": Family(fixed_mixture, "fixed-mixture", "λ", "lambda", 0.0, 1.0, ALPHA_GRID),
    "Chi-square aware": Family(chi_square_aware, "chi-square-aware", "α", "alpha", 0.0, math.inf, ALPHA_GRID),
    "Cross-entropy tilted": Family(cross_entropy_tilted, "cross-entropy-tilted", "t", "t", 0.0, math.inf, ALPHA_GRID),
    "Exponential family": Family(exponential_family, "exponential-family", "β", "beta", 0.0, math.inf,
                                 (0.1, 0.5, 1.0, 2.0, 5.0)),
    "Balanced 1": Family(balanced_1, "balanced-1"),
    "Balanced 2": Family(balanced_2, "balanced-2"),
    "Balanced 3": Family(balanced_3, "balanced-3"),
    "Adaptive": Family(adaptive, "adaptive"),
    "Optimal": Family(optimal, "optimal"),
}
PARAM = "proposals"  # the parameter (CLI flag --proposals, API keyword proposals=) that names proposals


def _fmt(x: float) -> str:
    """Shortest text of a parameter that reads back as the same float: 0.5 → '0.5', 5.0 → '5'."""
    text = f"{x:g}"
    return text if float(text) == x else repr(float(x))


@dataclass(frozen=True)
class Proposal:
    """One registry member with its parameter bound; calling it gives normalised log r.

    ``key`` is its identity (ASCII, stable: random streams, file names and run keys derive from it), ``label`` the
    name shown to people (``name`` is the same); changing how a label prints never changes a stream or a file."""

    family: str
    param: float | None = None

    @property
    def key(self) -> str:
        fam = REGISTRY[self.family]
        return fam.key if fam.symbol is None else f"{fam.key}_{fam.ascii}-{_fmt(self.param)}"

    @property
    def label(self) -> str:
        fam = REGISTRY[self.family]
        return self.family if fam.symbol is None else f"{self.family} ({fam.symbol}={_fmt(self.param)})"

    @property
    def name(self) -> str:
        return self.label

    def __call__(self, log_p, log_q):
        fam = REGISTRY[self.family]
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            log_w = fam.fn(log_p, log_q) if fam.symbol is None else fam.fn(log_p, log_q, self.param)
            return log_normalize(log_w, log_p)


def proposal(family: str, param: float | None = None) -> Proposal:
    """The registry proposal `family` with parameter `param`; ValueError for unknown names or out-of-range values."""
    if family not in REGISTRY:
        raise ValueError(f"{PARAM}: unknown proposal family {family!r}{_did_you_mean(family, list(REGISTRY))}; "
                         f"allowed: {', '.join(REGISTRY)}")
    fam = REGISTRY[family]
    if fam.symbol is None:
        if param is not None:
            raise ValueError(f"{PARAM}: proposal {family!r} takes no parameter (got {param!r})")
        return Proposal(family)
    if isinstance(param, bool) or not isinstance(param, (int, float, np.integer, np.floating)) \
            or not (fam.low <= float(param) <= fam.high):  # NaN fails this test too
        hi = "∞)" if fam.high == math.inf else f"{_fmt(fam.high)}]"
        raise ValueError(f"{PARAM}: {family} {fam.symbol} must be in [{_fmt(fam.low)}, {hi} (got {param!r})")
    return Proposal(family, float(param))


def build_proposals(alpha_values: Sequence[float] = DEFAULT_ALPHA_VALUES,
                    families: Sequence[str] | None = None) -> list[Proposal]:
    """Every registry proposal over its grid (families whose grid is --alpha-values use `alpha_values`)."""
    out = []
    for family in (REGISTRY if families is None else families):
        if family not in REGISTRY:
            raise ValueError(f"{PARAM}: unknown proposal family {family!r}{_did_you_mean(family, list(REGISTRY))}; "
                             f"allowed: {', '.join(REGISTRY)}")
        fam = REGISTRY[family]
        if fam.symbol is None:
            out.append(proposal(family))
        else:
            out.extend(proposal(family, a) for a in (alpha_values if fam.grid == ALPHA_GRID else fam.grid))
    return out


# ------------------------------------------------------------------------------------------------ parsing

_WITH_PARAM = re.compile(r"^(?P<family>.*?)\s*\((?P<symbol>[^=()]*)=(?P<value>[^()]*)\)$")
_BARE_PARAM = re.compile(r"^(?P<family>.*?)\s*\((?P<value>[^=()]*)\)$")  # 'Geometric(0.5)': the value alone
_KEY = re.compile(r"^(?P<family>[a-z0-9]+(?:-[a-z0-9]+)*)(?:_(?P<symbol>[a-z]+)-(?P<value>.+))?$")
_BY_KEY = {fam.key: name for name, fam in REGISTRY.items()}


def suggest(text: str, candidates, cutoff: float = 0.6) -> str | None:
    """The candidate closest to `text` (difflib, case-insensitive), or None when nothing is close."""
    candidates = list(candidates)
    folded = {c.casefold(): c for c in candidates}
    hit = difflib.get_close_matches(text.casefold(), list(folded), n=1, cutoff=cutoff)
    return folded[hit[0]] if hit else None


def _did_you_mean(text: str, candidates) -> str:
    hit = suggest(text, candidates)
    return f"; did you mean {hit!r}?" if hit else ""


def _with_param(family: str, value: str) -> str:
    fam = REGISTRY[family]
    return family if fam.symbol is None else f"{family} ({fam.symbol}={value})"


def by_name(name: str, alpha_values: Sequence[float] = DEFAULT_ALPHA_VALUES) -> Proposal:
    """Parse a proposal's name, strictly: its label as printed (``'Geometric (β=0.5)'``, ``'Optimal'``), the same
    with the parameter's ASCII name (``'Geometric (beta=0.5)'``) or its key (``'geometric_beta-0.5'``). Anything
    else is a ValueError starting with ``proposals:`` that names what is wrong and, where one is close, the name
    meant (``did you mean 'Optimal'?``): a typo in the family, the wrong parameter symbol (``λ`` for Geometric's
    ``β``), a missing or extra parameter, a value out of range."""
    if not isinstance(name, str):
        raise ValueError(f"{PARAM}: a proposal is named by a string (got {name!r})")
    text = name.strip()
    m = _WITH_PARAM.match(text)
    if m:
        family, symbol, value = m["family"].strip(), m["symbol"].strip(), m["value"].strip()
        return _resolve(name, family, symbol, value, alpha_values)
    m = _BARE_PARAM.match(text)
    if m and m["family"].strip() in REGISTRY and REGISTRY[m["family"].strip()].symbol is not None:
        family = m["family"].strip()  # one parameter per family: the value alone names it
        return _resolve(name, family, REGISTRY[family].symbol, m["value"].strip(), alpha_values)
    if text in REGISTRY:
        fam = REGISTRY[text]
        if fam.symbol is not None:
            raise ValueError(f"{PARAM}: {text} needs its parameter {fam.symbol} ({fam.ascii}), e.g. "
                             f"{_with_param(text, _fmt(_example_value(text, alpha_values)))!r}")
        return proposal(text)
    k = _KEY.match(text)
    if k and k["family"] in _BY_KEY:
        family = _BY_KEY[k["family"]]
        if k["symbol"] is None and REGISTRY[family].symbol is None:
            return proposal(family)
        if k["symbol"] is not None:
            return _resolve(name, family, k["symbol"], k["value"], alpha_values)
    examples = [_with_param(f, _fmt(_example_value(f, alpha_values))) for f in REGISTRY]
    if m and (hit := suggest(m["family"].strip(), REGISTRY)) is not None:  # 'Geometrik(0.5)': keep the value given
        raise ValueError(f"{PARAM}: unknown proposal {name!r}; did you mean {_with_param(hit, m['value'].strip())!r}? "
                         f"(allowed e.g.: {', '.join(examples)})")
    hit = suggest(text, examples + list(REGISTRY))
    if hit is None:  # a family typo with a parameter written some other way: suggest on the family part
        hit = suggest(re.split(r"[\s(_]", text, maxsplit=1)[0], REGISTRY, cutoff=0.75)
    if hit in REGISTRY:
        hit = _with_param(hit, _fmt(_example_value(hit, alpha_values)))
    raise ValueError(f"{PARAM}: unknown proposal {name!r}{f'; did you mean {hit!r}?' if hit else ''} "
                     f"(allowed e.g.: {', '.join(examples)})")


def _example_value(family: str, alpha_values) -> float:
    fam = REGISTRY[family]
    grid = alpha_values if fam.grid == ALPHA_GRID else fam.grid
    return float(grid[0]) if grid else 0.5


def _resolve(name: str, family: str, symbol: str, value: str, alpha_values) -> Proposal:
    if family not in REGISTRY:
        hit = suggest(family, REGISTRY)
        meant = hit and _with_param(hit, value)
        raise ValueError(f"{PARAM}: unknown proposal {name!r}{f'; did you mean {meant!r}?' if meant else ''} "
                         f"(families: {', '.join(REGISTRY)})")
    fam = REGISTRY[family]
    if fam.symbol is None:
        raise ValueError(f"{PARAM}: {family} takes no parameter (got {name!r}); did you mean {family!r}?")
    if symbol not in (fam.symbol, fam.ascii):
        raise ValueError(f"{PARAM}: {family}'s parameter is {fam.symbol} ({fam.ascii}), not {symbol!r}, in "
                         f"{name!r}; did you mean {_with_param(family, value)!r}?")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{PARAM}: {family} {fam.symbol} must be a number (got {value!r} in {name!r})") from None
    return proposal(family, x)


# ------------------------------------------------------------------------------------------------ sequence proposals
# The identity of a sequence proposal (P itself, or a registry proposal applied per step, prefix-aware or not), and
# the names of the directions: defined here once, for the engine, the verdicts, the figures and every run.

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


def proposal_label(name, direction: str = FORWARD) -> str:
    """A proposal's name in a direction's outputs, whatever spelling named it: its label, except that plain Monte
    Carlo ("P", the sampling model) is "Q" in reverse (every other formula is taken with Q in P's place)."""
    prop = sequence_proposal(name)
    return SAMPLED_FROM[direction] if prop.is_p else prop.label
