r"""Arithmetic sampling with jittered stratified codes (Vilnis et al., ICML 2023): one code per sequence.

A unit of n rows gets the codes u_i = ((i + U_i)/n + V) mod 1, U_i and V i.i.d. uniform: one code per stratum of
[0, 1), the whole set shifted at random so that each code, not only a row picked at random, is uniform. Each step
inverts r_t's CDF at the row's code, x_t = F_t⁻¹(u), and keeps the residual u ← (u − F_t(x_t⁻))/r_t(x_t) for the
next step. Given the prefix, the residual of a uniform code is again uniform on [0, 1), so every sequence is an exact
draw from the proposal and every estimator stays unbiased; but the n sequences of a unit spread over the prefix tree
(each branch of probability w gets n·w rows ± 1, and their residuals are stratified inside it) instead of piling up.

Precision: the residual is the code's position inside an interval of width W = Π_s r_s(x_s); a float64 code has
~53 bits, so once W < 2^-40 the residual carries little of them. The row then takes a fresh uniform, pre-drawn per
unit. The switch depends on the prefix only (through W), and a fresh uniform is uniform given the prefix, so each
draw stays exact; rows that refreshed are independent from there on.

Rows of a unit are dependent: the standard error must come from independent units (randomizations), never from the
spread of the n terms (``independent_rows`` False; estimators.randomization_estimates).
"""
from __future__ import annotations

import math

import torch

REFRESH_LOG_WIDTH = -40 * math.log(2)


def stratified_codes(n: int, generator: torch.Generator) -> torch.Tensor:
    """((i + U_i)/n + V) mod 1 for i < n, float64, on the generator's device: each code uniform on [0, 1)."""
    dev = generator.device
    u = torch.rand(n + 1, generator=generator, dtype=torch.float64, device=dev)
    return torch.remainder((torch.arange(n, dtype=torch.float64, device=dev) + u[:n]) / n + u[n], 1.0)


class StratifiedDraws:
    """Nested CDF inversion of one stratified code per sequence; a code set (one unit) is one randomization."""

    independent_rows = False

    def __init__(self, streams, max_new_tokens: int, device):
        codes, fresh = [], []
        for g, n in streams:  # everything of a unit from its own generator, in a fixed order
            codes.append(stratified_codes(n, g))
            fresh.append(torch.rand((n, max_new_tokens), generator=g, dtype=torch.float64, device=g.device))
        self.u = torch.cat(codes).to(device)
        self.fresh = torch.cat(fresh).to(device)
        self.log_width = torch.zeros_like(self.u)

    def __call__(self, t: int, log_r: torch.Tensor) -> torch.Tensor:
        from . import invert_cdf

        x, lo, hi = invert_cdf(log_r, self.u)
        width = hi - lo
        # rounding can put u a hair outside [F(x⁻), F(x)): clamp the residual into [0, 1)
        resid = torch.where(width > 0, (self.u - lo) / width.clamp(min=1e-300), self.fresh[:, t])
        self.u = resid.clamp(0.0, 1.0 - 2.0 ** -53)
        self.log_width += torch.log(width.clamp(min=1e-300))
        spent = self.log_width < REFRESH_LOG_WIDTH
        self.u = torch.where(spent, self.fresh[:, t], self.u)
        self.log_width = torch.where(spent, 0.0, self.log_width)
        return x
