"""Flags as records: a code (what kind of problem, for programs and short table cells) and a message (for people).

A row's ``flags`` is a list of :class:`Flag`; its ``flag`` is the short string of their codes (``codes``), empty when
the row is trusted. JSON holds the records as ``{"code": …, "message": …}`` (``Flag.from_dict`` reads them back);
CSV files and DataFrames hold the short ``flag`` string only, so their cells stay short.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


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


@dataclass(frozen=True)
class Flag:
    code: Code
    message: str

    def __post_init__(self):
        object.__setattr__(self, "code", Code(self.code))

    def to_dict(self) -> dict:
        return {"code": self.code.value, "message": self.message}

    @classmethod
    def from_dict(cls, d) -> "Flag":
        """A Flag from its JSON record (or a Flag, returned as it is)."""
        return d if isinstance(d, Flag) else cls(Code(d["code"]), d["message"])

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


def as_flags(flags) -> list[Flag]:
    """Flags from Flag objects or their JSON records."""
    return [Flag.from_dict(f) for f in flags or ()]


def has(flags, *wanted: Code) -> bool:
    return any(Flag.from_dict(f).code in wanted for f in flags or ())
