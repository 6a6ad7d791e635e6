r"""Typed results: a frozen :class:`Row` per (proposal, estimator, direction), flags as :class:`Flag` (a code and its
data: numbers and identities, never sentences), and :class:`Advice` (what to change) / :class:`Reason` (why a row is
recommended) as kind + fields.

Words are made at the edge only: :func:`render` writes a flag, an advice or a reason in a direction's names — forward
(KL(P‖Q) from sequences of P) speaks of the sampling model as P and the other as Q, reverse the other way round — so
a reverse row is said in its own names because the renderer knows its direction; nothing rewrites a message. JSON
keeps its keys: a flag is written as ``{"code", "message", "data"}`` (the message rendered for readers),
:meth:`Flag.from_dict` reads it back, and an old record ``{"code", "message"}`` (run folders written before the
data existed) loads with its message kept as it was written.

:func:`pool_prompts` is the one pooling of per-prompt estimates (the mean over a prompt set with its fixed-set and
population standard errors), used by the prompt-set aggregation, the subset recommendation and the Jeffreys row.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import numpy as np

from kl_estimation.core.diagnostics import (
    IDENTITY_FLOOR,
    IDENTITY_Z,
    KHAT_LIMIT,
    MIN_DISTINCT,
    MIN_OTHER_DRAWS,
    TOP_SHARE_LIMIT,
)
from kl_estimation.core.kinds import Estimator, kind
from kl_estimation.core.proposals import (
    FORWARD,
    REVERSE,
    SAMPLED_FROM,
    SequenceProposal,
    proposal_label,
    sequence_proposal,
)

MIN_ESS = MIN_DISTINCT  # a weighted sample worth fewer draws than this cannot estimate its own variance


class Code(str, Enum):
    """What is wrong with an estimate. A str Enum: JSON writes it as its value, and it compares equal to it."""

    UNCOVERED_MASS = "UNCOVERED_MASS"  # the proposal gives r = 0 to tokens with P > 0: biased
    BIASED = "BIASED"  # its exact mean is not the KL (k2; where an exact mean is known)
    SELF_NORMALIZED = "SELF_NORMALIZED"  # SNIS under r ≠ P: biased at O(1/n)
    SE_NOT_INFORMATIVE = "SE_NOT_INFORMATIVE"  # (nearly) every draw the same sequence, or too few draws for an SE
    CV_TOO_FEW = "CV_TOO_FEW"  # a control variate fitted on too few sequences
    WEIGHT_IDENTITY = "WEIGHT_IDENTITY"  # the weights' sample mean is not 1 where it must be
    TOP_SHARE = "TOP_SHARE"  # one draw holds most of the total weight
    KHAT = "KHAT"  # Pareto k̂ above its limit: weights too heavy-tailed
    K3_IDENTITY = "K3_IDENTITY"  # k3: the sample mean of Q/r is not 1
    INCONSISTENT = "INCONSISTENT"  # disagrees with the best trusted P-based estimate
    UNCONFIRMED = "UNCONFIRMED"  # an IS row whose SE nothing trustworthy in the run can confirm
    SAMPLE_VAR_COLLAPSE = "SAMPLE_VAR_COLLAPSE"  # sample variance far below the exact variance (exact known)
    EXACT_VAR_OVERFLOW = "EXACT_VAR_OVERFLOW"  # exact variance beyond float64

    def __str__(self) -> str:
        return self.value


# The kinds of SE_NOT_INFORMATIVE (data["why"]) and of INCONSISTENT (data["test"]).
FEW_DRAWS, FEW_DISTINCT, CONSTANT, LOW_ESS = "few_draws", "few_distinct", "constant", "low_ess"
DISAGREES, CONTRADICTED, MORE_PRECISE, SAME_DRAWS = "disagrees", "contradicted", "more_precise", "same_draws"


@dataclass(frozen=True)
class Flag:
    """A code and its data (numbers, row identities): what is wrong, for programs; :func:`render` says it in words.

    Data fields by code: UNCOVERED_MASS ``mass``; SE_NOT_INFORMATIVE ``why`` (few_draws / few_distinct / constant /
    low_ess) with ``n``, ``n_distinct``, ``modal_share``, ``ess``; CV_TOO_FEW ``n``, ``needed_n``; WEIGHT_IDENTITY and
    K3_IDENTITY ``mean``, ``z`` (K3 also ``is_p``); TOP_SHARE ``share``; KHAT ``khat`` (``over_repeats``);
    INCONSISTENT ``test`` (disagrees / contradicted / more_precise / same_draws), ``against`` (the other row:
    :func:`identity`), ``z``; UNCONFIRMED ``resolution``, ``std_error``, ``needed_n``; BIASED ``exact_mean``, ``kl``;
    SAMPLE_VAR_COLLAPSE ``ratio``. Found at some prompts of a set: ``prompts``, ``n_prompts``; in some repeats:
    ``repeats``, ``n_repeats``. An old record read back holds its text under ``message``."""

    code: Code
    data: Mapping = field(default_factory=dict, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "code", Code(self.code))

    def text(self, direction: str = FORWARD) -> str:
        return render(self, direction)

    @property
    def message(self) -> str:
        """The words in the forward names (a row renders its flags in its own direction: Row.messages)."""
        return render(self)

    def to_dict(self, direction: str = FORWARD) -> dict:
        return {"code": self.code.value, "message": render(self, direction), "data": dict(self.data)}

    @classmethod
    def from_dict(cls, d) -> Flag:
        """A Flag from its JSON record (or a Flag, returned as it is); an old {code, message} record keeps its text."""
        if isinstance(d, Flag):
            return d
        return cls(Code(d["code"]), d["data"] if "data" in d else {"message": d.get("message", "")})

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


def codes(flags) -> str:
    """The short ``flag`` string of a list of flags: their distinct codes in order, comma-separated ('' = none)."""
    seen = []
    for f in flags or ():
        c = Flag.from_dict(f).code.value
        if c not in seen:
            seen.append(c)
    return ",".join(seen)


def as_flags(flags) -> tuple[Flag, ...]:
    """Flags from Flag objects or their JSON records."""
    return tuple(Flag.from_dict(f) for f in flags or ())


def has(flags, *wanted: Code) -> bool:
    return any(Flag.from_dict(f).code in wanted for f in flags or ())


@dataclass(frozen=True)
class Advice:
    """What to change in a direction when nothing can be recommended: ``kind`` and its fields (rendered by
    :func:`render` in the direction's names).

    Kinds: ``include_p``; ``draw_more`` (``needed_n`` or None, ``per_prompt``, ``cold``: the prompts where P's draws
    are not informative, ``n_prompts``, ``why``: one_sequence — P's draws are almost all one sequence — / too_few —
    too few draws to show their spread — / unconfirmed, ``n_drawn``); ``disputed``; ``cv_too_few`` (``needed_n``,
    ``per_prompt``); ``all_flagged``."""

    kind: str
    data: Mapping = field(default_factory=dict, hash=False)
    direction: str = FORWARD

    def __str__(self) -> str:
        return render(self, self.direction)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "message": str(self), "data": dict(self.data), "direction": self.direction}


@dataclass(frozen=True)
class Reason:
    """Why a row is the one to report: ``kind`` (default_cv, default_rb, smaller_se, p_cv_flagged, no_p_cv, no_p) and
    its fields (``ratio``, ``default``: the default's estimator, ``codes``: what flags P's RB+CV)."""

    kind: str
    data: Mapping = field(default_factory=dict, hash=False)

    def text(self, direction: str = FORWARD) -> str:
        return render(self, direction)


def names(direction: str = FORWARD) -> tuple[str, str]:
    """(the sampling model, the other model) as a direction's outputs call them: ("P", "Q") forward, ("Q", "P")."""
    s = SAMPLED_FROM[direction]
    return s, SAMPLED_FROM[REVERSE if direction == FORWARD else FORWARD]


def identity(row) -> dict:
    """A row's identity and numbers as a flag names it: proposal key, estimator, estimate, SE."""
    return {"proposal_key": row.proposal_key, "estimator": str(row.estimator), "estimate": row.estimate,
            "std_error": row.std_error}


def _num(x, missing: float = math.nan) -> float:
    """A number of a flag's data; None where JSON held NaN or ±inf (strict JSON has neither) reads as `missing`."""
    return missing if x is None else x


def _not_one(m: float) -> str:
    """A sample mean that must be 1, with enough digits that a mean ≠ 1 never prints as '1'."""
    m = _num(m)
    for digits in range(3, 16):
        text = f"{m:.{digits}g}"
        if float(text) != 1.0 or m == 1.0:
            return text
    return repr(m)


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _sizes(z: float) -> str:
    z = _num(z, math.inf)  # saved as None: a gap over two zero SEs
    return f"{z:.1f}" if z < 1000 else "more than 1000"


def _row_name(a: Mapping, direction: str) -> str:
    label = proposal_label(a["proposal_key"], direction)
    return f"{label} · {a['estimator']} ({a['estimate']:.4g}, SE {a['std_error']:.2g})"


def _where(d: Mapping) -> str:
    """"prompts 0, 1 of 2: " / "in 3 of 10 repeats: " for a flag found at some prompts or repeats."""
    if "prompts" in d:
        ps = d["prompts"]
        return (f"prompt{'s' if len(ps) > 1 else ''} {', '.join(map(str, ps[:5]))}{' …' if len(ps) > 5 else ''} "
                f"of {d['n_prompts']}: ")
    if "repeats" in d:
        return f"in {d['repeats']} of {d['n_repeats']} repeat{'s' if d['n_repeats'] > 1 else ''}: "
    return ""


def _flag_text(f: Flag, direction: str) -> str:
    d, (s, o) = f.data, names(direction)
    c = f.code
    if "message" in d:  # an old record: its text as it was written
        return d["message"]
    if c is Code.UNCOVERED_MASS:
        return (f"biased: the proposal gives r = 0 to tokens with {s} > 0 (up to {d['mass']:.2g} of {s}'s mass at a "
                f"step): sequences through them are never drawn")
    if c is Code.SELF_NORMALIZED:
        return "self-normalised: biased at O(1/n)"
    if c is Code.SE_NOT_INFORMATIVE:
        why, n = d["why"], d.get("n")
        if why == FEW_DRAWS:
            return f"SE not informative: {n} draw{'s' if n != 1 else ''} — a standard error needs at least 2"
        if why == FEW_DISTINCT:
            return (f"SE not informative: {d['n_distinct']} distinct sequences in {n} draws, "
                    f"{d['modal_share'] if d['modal_share'] is not None else math.nan:.0%} of them one sequence "
                    f"(needs ≥ {MIN_DISTINCT} distinct and ≥ {MIN_OTHER_DRAWS} draws off the most frequent) — the "
                    f"sample has not seen the variance")
        if why == CONSTANT:
            return "SE not informative: every draw gave the same value — the sample has not seen the variance"
        return (f"SE not informative: the weights' Kish ESS is {d['ess']:.1f} of {n} draws (< {MIN_ESS}): the "
                f"weighted sample is worth too few draws to have seen its own variance")
    if c is Code.CV_TOO_FEW:
        return (f"control variate fitted on {d['n']} < {d['needed_n']} sequences: its cross-fitted β is noisy, so its "
                f"variance can exceed both MC's and RB's and its SE is too small")
    if c is Code.WEIGHT_IDENTITY:
        m, z = _num(d["mean"]), d["z"]
        if _finite(z) and abs(z) > IDENTITY_Z:
            why = f"{z:+.1f} SE from 1"
        elif _finite(m) and m < IDENTITY_FLOOR:
            why = f"below {IDENTITY_FLOOR}"
        else:
            why = "every draw has the same weight, so any mean ≠ 1 fails"
        return (f"weights degenerate: a sample mean of the prefix weights W_≤t is {_not_one(m)} where it must be 1 "
                f"({why}) — the sequences with large weights were {'never ' if not _finite(m) or m < 1 else 'over-'}"
                f"drawn")
    if c is Code.TOP_SHARE:
        return (f"one draw holds {d['share']:.0%} of the total weight (limit {TOP_SHARE_LIMIT:.0%}): the estimate "
                f"rests on it")
    if c is Code.KHAT:
        if d.get("over_repeats"):
            return f"Pareto k̂ {d['khat']:.2f} > {KHAT_LIMIT} (mean over repeats)"
        return f"k̂ {d['khat']:.2f} > {KHAT_LIMIT}: weights too heavy-tailed to trust"
    if c is Code.K3_IDENTITY:
        z = d["z"]
        return (f"k3: the sample mean of {o}/{s if d.get('is_p') else 'r'} is {_not_one(d['mean'])} where it must be 1 "
                f"({f'{z:+.1f} SE' if _finite(z) else 'every draw the same'}): {o}'s mass lies on sequences that "
                f"were never drawn")
    if c is Code.INCONSISTENT:
        a, z, test = d["against"], d["z"], d["test"]
        if test == DISAGREES:
            return f"disagrees with {_row_name(a, direction)} by {_sizes(z)} combined SEs"
        if test == CONTRADICTED:
            return (f"contradicted by {_row_name(a, direction)} by {_sizes(z)} combined SEs — healthy rows of "
                    f"{d['disputers']}+ proposals disagree with {s} on one side, so {s}'s SE or theirs is wrong and "
                    f"neither is trusted")
        if test == MORE_PRECISE:
            return f"disagrees with the more precise {_row_name(a, direction)} by {_sizes(z)} combined SEs"
        return (f"the same draws' IS estimate ({a['estimate']:.4g}, SE {a['std_error']:.2g}) is inconsistent: the "
                f"weights of these draws miss mass, for every estimator made from them")
    if c is Code.UNCONFIRMED:
        res, need = d["resolution"], d.get("needed_n")
        more = f"; draw ≥ {need} sequences from {s} to check it" if need else f"; draw more sequences from {s}"
        return (f"unconfirmed: {s}'s draws are not informative here and resolve only SE "
                f"{'—' if res is None else f'{res:.2g}'}; an SE of {d['std_error']:.2g} (< {d['ratio']:g}× that) "
                f"rests on this row's own draws alone{more}")
    if c is Code.BIASED:
        return f"biased: exact mean {d['exact_mean']:.4g} vs KL {d['kl']:.4g}"
    if c is Code.EXACT_VAR_OVERFLOW:
        return "exact variance beyond float64 (> 1e308): weights degenerate"
    return (f"degenerate weights: sample variance {_num(d['ratio'], math.inf):.2g}× below exact (rare large weights "
            f"never drawn)")


def _list(ps) -> str:
    return ", ".join(map(str, ps[:8]))


def _advice_text(a: Advice, direction: str) -> str:
    d, (s, _) = a.data, names(direction)
    per = " per prompt" if d.get("per_prompt") else ""
    if "message" in a.data:
        return a.data["message"]
    if a.kind == "include_p":
        return (f"include {s} in the proposals: without it nothing can check the importance-sampling rows (their "
                f"weights may miss mass no diagnostic of their own draws shows)")
    if a.kind == "draw_more":
        cold, multi = d.get("cold") or [], d.get("n_prompts", 1) > 1
        drawn = f"{d['n_drawn']} " if d.get("n_drawn") and not multi else ""
        what = {"one_sequence": f"{s}'s draws are almost all one sequence",
                "too_few": f"{s}'s {drawn}draws are too few to show their spread — an SE needs ≥ {MIN_DISTINCT} "
                           f"distinct sequences and ≥ {MIN_OTHER_DRAWS} draws off the most frequent —",
                "unconfirmed": f"{s}'s draws do not resolve the importance-sampling rows' SEs"}[d["why"]]
        sep = " " if d["why"] == "too_few" else ", "
        where = (f" (at prompt{'s' if len(cold) > 1 else ''} {_list(cold)} {what}{sep}so nothing there can be "
                 f"checked)" if multi and cold else f" ({what}{sep}so nothing can be checked)")
        n = d.get("needed_n")
        text = f"draw {f'≥ {n}' if n else 'more'} sequences{per} from {s}{where}"
        return text + (f", or leave out prompt{'s' if len(cold) > 1 else ''} {_list(cold)}"
                       if multi and cold and len(cold) < d["n_prompts"] else "")
    if a.kind == "disputed":
        return (f"{s} and healthy proposals disagree beyond their SEs (see the flags): draw about 4× as many sequences "
                f"to tell which is off")
    if a.kind == "cv_too_few":
        return (f"draw ≥ {d['needed_n']} sequences{per}: below that RB+CV's control variate cannot be fitted and the "
                f"other rows are flagged too")
    return "every row is flagged (see above): draw more sequences"


def _reason_text(r: Reason, direction: str) -> str:
    d, (s, _) = r.data, names(direction)
    if "message" in d:
        return d["message"]
    if r.kind == "default_cv":
        return ("RB+CV (cross-fitted β) is the default: unbiased, weights all 1, and asymptotically never worse than "
                "the better of MC and RB")
    if r.kind == "default_rb":
        return ("RB is the default here: RB+CV's control variate cannot be fitted on so few sequences (RB is its β = 0 "
                "member: unbiased, weights all 1)")
    if r.kind == "smaller_se":
        return f"the smallest SE among trusted unbiased rows, {d['ratio']:.2g}× below {s}'s {d['default']}"
    if r.kind == "p_cv_flagged":
        return f"the smallest SE among trusted unbiased rows ({s}'s RB+CV is flagged: {d['codes']})"
    if r.kind == "no_p_cv":
        return f"the smallest SE among trusted unbiased rows (the run has no RB+CV from {s})"
    return (f"the smallest SE among trusted unbiased rows (the run has no {s}, so nothing checks its consistency)")


def render(x, direction: str = FORWARD) -> str:
    """A Flag, Advice or Reason in words, in `direction`'s names (see the module doc); a string stays as it is."""
    if isinstance(x, Flag):
        return _where(x.data) + _flag_text(x, direction)
    if isinstance(x, Advice):
        return _advice_text(x, x.direction)
    if isinstance(x, Reason):
        return _reason_text(x, direction)
    return x


# ------------------------------------------------------------------------------------------------ rows

NAN = math.nan
TYPED = ("estimate", "std_error", "ci_low", "ci_high", "std_error_population", "ci_population_low",
         "ci_population_high", "n", "flags", "flag", "recommended", "proposal", "proposal_key", "estimator",
         "direction")


@dataclass(frozen=True)
class Row:
    """One (proposal, estimator) estimate of the KL in its direction's units, with its verdict.

    ``identity`` is the proposal (core.proposals.SequenceProposal; None for a combined row such as the Jeffreys sum,
    named by ``name``); ``proposal`` is its label in the direction's names (plain Monte Carlo is "P" forward and "Q"
    reverse), ``proposal_key`` its stable key. ``std_error`` is over the fixed prompt set, ``ci`` its 95 % interval;
    ``std_error_population`` / ``ci_population`` treat the prompts as a sample (NaN / None where there is none);
    ``flags`` are :class:`Flag` records (empty: trusted) and ``flag`` the short string of their codes;
    ``recommended`` marks the row to report; ``details`` holds the other diagnostics (variance, ESS, k̂, max weight,
    identity tests, …) under their saved names. ``reason`` (the recommended row) says why it is the one; ``note`` is
    what is wrong with a combined row, in words (the Jeffreys row: a direction without a trusted estimate), and is
    its ``flag``.

    Read access by the saved names also works, as a read-only mapping (``row["estimate"]``, ``row.get("khat")``,
    ``dict(row)``), as summary.json holds a row (``flags`` as Flag records, ``reason`` in words)."""

    identity: SequenceProposal | None
    estimator: Estimator | str
    estimate: float
    std_error: float
    ci: tuple = (NAN, NAN)
    direction: str = FORWARD
    std_error_population: float | None = None
    ci_population: tuple | None = None
    n: int | None = None
    flags: tuple = ()
    recommended: bool = False
    details: Mapping = field(default_factory=dict, hash=False, repr=False)
    name: str = ""
    reason: Reason | None = None
    note: str = ""

    @classmethod
    def from_entry(cls, identity: SequenceProposal | None, estimator, e: Mapping, **kw) -> Row:
        """A row from an estimate entry (core.estimators.sequence_estimates, or a saved row's flat dict)."""
        e = dict(e)
        pop = None
        if "ci_population_low" in e:
            pop = (e.pop("ci_population_low"), e.pop("ci_population_high"))
        ci = (e.pop("ci_low", NAN), e.pop("ci_high", NAN))
        saved_pop = "std_error_population" in e
        std_error_population = e.pop("std_error_population", None)
        if std_error_population is None and saved_pop:  # NaN, read back from strict JSON as null
            std_error_population = NAN
        flags = as_flags(e.pop("flags", ()))
        reason = e.pop("reason", None)
        if isinstance(reason, str):
            reason = Reason("saved", {"message": reason})
        elif isinstance(reason, Mapping):
            reason = Reason(reason["kind"], reason.get("data", {}))
        fixed = {k: e.pop(k) for k in ("estimate", "std_error", "n", "recommended", "direction") if k in e}
        note = e.pop("flag", "") if identity is None and not flags else ""
        for k in ("proposal", "proposal_key", "estimator", "flag"):
            e.pop(k, None)
        args = {"note": note or "", "ci": ci, "std_error_population": std_error_population, "ci_population": pop,
                "flags": flags, "reason": reason, "recommended": bool(fixed.pop("recommended", False)), **fixed}
        args.update(kw)
        args.setdefault("details", e)
        return cls(identity, kind(estimator) or estimator, **args)

    @classmethod
    def from_dict(cls, d: Mapping) -> Row:
        """A row read back from summary.json (old folders included: their flags as {code, message}). A row whose
        proposal is not a sequence proposal (the Jeffreys sum) keeps its name."""
        direction = d.get("direction", FORWARD)
        label = d.get("proposal", "")
        try:
            ident = sequence_proposal("p" if label == SAMPLED_FROM[direction] else d.get("proposal_key") or label)
        except (ValueError, KeyError):
            ident = None
        return cls.from_entry(ident, d["estimator"], d, name="" if ident is not None else label,
                              direction=direction)

    # ---- names

    @property
    def proposal(self) -> str:
        return self.name if self.identity is None else proposal_label(self.identity, self.direction)

    @property
    def proposal_key(self) -> str:
        return "" if self.identity is None else self.identity.key

    @property
    def is_p(self) -> bool:
        """Plain Monte Carlo from the sampling model (P forward, Q reverse)."""
        return self.identity is not None and self.identity.is_p

    @property
    def kind(self) -> Estimator | None:
        return kind(self.estimator)

    @property
    def flag(self) -> str:
        return codes(self.flags) or self.note

    @property
    def messages(self) -> list[str]:
        """What went wrong, in words, in this row's direction (one line per flag)."""
        return [f"{f.code.value}: {render(f, self.direction)}" for f in self.flags]

    @property
    def ess(self):
        return self.details.get("ess")

    @property
    def khat(self):
        return self.details.get("khat")

    def has(self, *wanted: Code) -> bool:
        return any(f.code in wanted for f in self.flags)

    # ---- flat views

    def to_dict(self, records: bool = True) -> dict:
        """Flat, as summary.csv and summary.json hold it: ``ci_low`` / ``ci_high``, the details as columns; with
        `records` the flags as {code, message, data} records rendered in the row's direction (summary.json), else
        only the short ``flag`` codes (CSV, DataFrames)."""
        d = {"direction": self.direction, "proposal": self.proposal, "proposal_key": self.proposal_key,
             "estimator": str(self.estimator), "estimate": self.estimate, "std_error": self.std_error}
        if self.std_error_population is not None:
            d["std_error_population"] = self.std_error_population
        if self.ci_population is not None:
            d["ci_population_low"], d["ci_population_high"] = self.ci_population
        ci_n = {"ci_low": self.ci[0], "ci_high": self.ci[1], **({} if self.n is None else {"n": self.n})}
        for k, v in self.details.items():  # the saved layout: the interval and n follow k̂ (else the diagnostics)
            d[k] = v
            if k == "khat":
                d.update(ci_n)
        d.update(ci_n)
        if records:
            d["flags"] = [f.to_dict(self.direction) for f in self.flags]
        d["flag"] = self.flag
        d["recommended"] = self.recommended
        if records and self.reason is not None:
            d["reason"] = render(self.reason, self.direction)
        return d

    @cached_property
    def _flat(self) -> dict:
        return self.to_dict(records=False)

    def __getitem__(self, key: str):
        if key == "flags":
            return list(self.flags)
        if key == "reason" and self.reason is not None:
            return render(self.reason, self.direction)
        return self._flat[key]

    def get(self, key: str, default=None):
        try:
            return self[key]
        except KeyError:
            return default

    def __repr__(self) -> str:
        return (f"Row(proposal={self.proposal!r}, estimator={str(self.estimator)!r}, estimate={self.estimate!r}, "
                f"std_error={self.std_error!r}, ci={self.ci!r}, flag={self.flag!r}, direction={self.direction!r})")

    def keys(self) -> list[str]:
        return [*self._flat, "flags", *(("reason",) if self.reason is not None else ())]

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: str) -> bool:
        return key in self.keys()


def pool_prompts(estimates, std_errors) -> dict:
    """The mean over a prompt set of per-prompt estimates (m of them), with its two standard errors: ``std_error``
    over this fixed set (√(Σ SE_i²)/m, within-prompt noise only) with a normal 95 % interval ``ci_low``/``ci_high``,
    and ``std_error_population`` (the spread of the estimates over prompts, s/√m: prompts drawn i.i.d. from a
    population) with a Student-t interval on m − 1 degrees of freedom ``ci_population_low``/``ci_population_high``
    (NaN for m = 1). The one pooling of the prompt-set aggregation, the subset recommendation and the Jeffreys row."""
    from kl_estimation.core.estimators import Z95, t95

    e, se = np.asarray(estimates, dtype=np.float64), np.asarray(std_errors, dtype=np.float64)
    m = e.size
    mean, se_fixed = float(e.mean()), float(np.sqrt(np.sum(se ** 2)) / m)
    se_pop = float(e.std(ddof=1) / math.sqrt(m)) if m > 1 else NAN
    half = t95(m - 1) if m > 1 else NAN
    return {"estimate": mean, "std_error": se_fixed, "ci_low": mean - Z95 * se_fixed, "ci_high": mean + Z95 * se_fixed,
            "std_error_population": se_pop, "ci_population_low": mean - half * se_pop,
            "ci_population_high": mean + half * se_pop}
