"""Independent draws: every sequence gets its own uniforms, one per step, inverted through r_t's CDF."""
from __future__ import annotations

import torch


class IIDDraws:
    """i.i.d. sequences: the n terms of a unit are independent, so their spread gives the standard error."""

    independent_rows = True

    def __init__(self, streams, max_new_tokens: int, device):
        # all of a unit's uniforms up front, from its own generator: independent of how units share a batch
        self.u = torch.cat([torch.rand((n, max_new_tokens), generator=g, dtype=torch.float64, device=g.device)
                            for g, n in streams]).to(device)

    def __call__(self, t: int, log_r: torch.Tensor) -> torch.Tensor:
        from . import invert_cdf

        return invert_cdf(log_r, self.u[:, t])[0]
