r"""Ways of turning a proposal's next-token distributions r_t into tokens: one module per way of drawing.

The sampling engine asks a *draw source* for the tokens of every step, ``source(t, log_r) -> tokens (B,)``, or
``source(t, log_r, kl)`` for a source with ``uses_kl`` True (kl: this step's exact KL(P_t‖Q_t) per row, 0 after a
row's EOS: a statistic of the prefix, so a source may order rows by it and stay exact); the source owns all
randomness of one forward batch. A forward batch is made of *units* (prompt × proposal × batch
index), each with its own ``torch.Generator``: a source draws what it needs from each unit's generator for that
unit's rows only, when it is built, so the records of a unit do not depend on which other units share its batch.

Every source must make each sequence an exact draw from the proposal (marginally), so that every estimator stays
unbiased; sources that correlate the sequences of a unit (stratified codes, quasi-random points) change only the
variance, and the standard error must then come from independent randomizations, never from the spread of the n
terms (``independent_rows`` False).
"""
from __future__ import annotations

import torch

from .array_kl import ArrayKLDraws
from .array_rqmc import ArrayRQMCDraws
from .iid import IIDDraws
from .sobol import SobolDraws
from .stratified import StratifiedDraws


def invert_cdf(log_r: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token x with F(x⁻) ≤ u·F(V) < F(x) for each row, through a float64 CDF of exp(log_r); returns x and the
    normalised CDF values F(x⁻), F(x) (their difference is r(x)). ``side='right'`` never picks a zero-mass token."""
    cdf = log_r.double().exp().cumsum(-1)
    total = cdf[..., -1:]
    x = torch.searchsorted(cdf, u[..., None] * total, right=True)[..., 0].clamp_(max=cdf.shape[-1] - 1)
    hi = cdf.gather(-1, x[..., None])[..., 0] / total[..., 0]
    lo = torch.where(x > 0, cdf.gather(-1, (x - 1).clamp(min=0)[..., None])[..., 0] / total[..., 0], 0.0)
    return x, lo, hi


DRAWS = {"iid": IIDDraws, "stratified": StratifiedDraws, "sobol": SobolDraws, "array": ArrayRQMCDraws,
         "array-kl": ArrayKLDraws}


def draw_step(source, t: int, log_r: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
    """One step of `source`, handing it the per-row step KL when it asks for it (``uses_kl``)."""
    return source(t, log_r, kl) if getattr(source, "uses_kl", False) else source(t, log_r)


def make_source(name: str, streams, max_new_tokens: int, device):
    """The draw source `name` over `streams`, a list of (torch.Generator, rows) — one per unit, in row order."""
    try:
        cls = DRAWS[name]
    except KeyError:
        raise ValueError(f"sampler: unknown sampler {name!r}; allowed: {', '.join(DRAWS)}") from None
    return cls(streams, max_new_tokens, device)
