r"""Array-RQMC (L'Ecuyer et al.): the n sequences of a unit move together; at every step they are sorted by their
most recent tokens and take the points of a randomized van der Corput sequence in that order.

Step t: rank the unit's rows by (x_{t−1}, x_{t−2}, …) — the prefix read backwards, so rows in the same Markov state
(and, for an LM, rows that end alike) sit next to each other — and give the row of rank k the uniform
u = ((rev_m(k) ⊕ D_t) + U_{k,t}) / 2^m: rev_m reverses the m = ⌈log₂ n⌉ bits of k, D_t is a random m-bit digital
shift of the step and U_{k,t} a uniform jitter, all fresh uniforms of the unit. Given everything drawn before, D_t
makes each row's u uniform on [0, 1): each token is an exact draw from r_t given its own prefix, so every sequence is
an exact draw from the proposal. Across rows, any aligned block of 2^j consecutive ranks takes one point in each of
2^j strata: rows that share a state are balanced over their next tokens (±1 of their count times r) at every step,
not only at the first steps as with one nested code per sequence (draws/stratified.py).

Rows of a unit are dependent: standard errors from independent units (``independent_rows`` False).
"""
from __future__ import annotations

import torch


def bit_reverse(k: torch.Tensor, bits: int) -> torch.Tensor:
    out = torch.zeros_like(k)
    for b in range(bits):  # a loop over bits, not rows
        out |= ((k >> b) & 1) << (bits - 1 - b)
    return out


class ArrayRQMCDraws:
    """Per step: sort each unit's rows by their reversed prefix, then invert digitally shifted van der Corput points."""

    independent_rows = False

    def __init__(self, streams, max_new_tokens: int, device):
        jitter, shift, unit, rev, scale = [], [], [], [], []
        for i, (g, n) in enumerate(streams):
            m = max(1, (n - 1).bit_length())
            jitter.append(torch.rand((n, max_new_tokens), generator=g, dtype=torch.float64, device=g.device).to(device))
            d = torch.randint(0, 2 ** m, (1, max_new_tokens), generator=g, device=g.device).to(device)
            shift.append(d.expand(n, max_new_tokens))
            unit.append(torch.full((n,), i, device=device))
            rev.append(bit_reverse(torch.arange(n, device=device), m))
            scale.append(torch.full((n,), 2.0 ** -m, dtype=torch.float64, device=device))
        # indexed by position in the rank order (units contiguous): the point that rank takes
        self.jitter, self.shift = torch.cat(jitter), torch.cat(shift)
        self.unit, self.rev, self.scale = torch.cat(unit), torch.cat(rev), torch.cat(scale)
        self.order = torch.arange(self.unit.numel(), device=device)  # rows by rank; row order at t = 0

    def __call__(self, t: int, log_r: torch.Tensor) -> torch.Tensor:
        from . import invert_cdf

        pos = torch.empty_like(self.order)
        pos[self.order] = torch.arange(self.order.numel(), device=self.order.device)
        u = ((self.rev[pos] ^ self.shift[pos, t]).double() + self.jitter[pos, t]) * self.scale
        x = invert_cdf(log_r, u)[0]
        # new order: by unit, then by this token, then by the old order (stable sorts, last key first)
        o = self.order
        o = o[torch.sort(x[o], stable=True).indices]
        self.order = o[torch.sort(self.unit[o], stable=True).indices]
        return x
