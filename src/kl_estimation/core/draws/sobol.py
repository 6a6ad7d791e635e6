r"""Randomized quasi-Monte Carlo: scrambled Sobol points (scipy.stats.qmc), one coordinate per step.

Row i of a unit takes point i of a scrambled Sobol sequence in [0, 1)^T and inverts r_t's CDF at coordinate t. With
scrambling each point is uniform on the cube (the low bits below the points' 30-bit grid filled with an independent
uniform), so every sequence is an exact draw from the proposal; the points of a unit fill the cube evenly (a
(t, m, s)-net when the unit has 2^m rows), which stratifies the first steps jointly. The scramble's seed comes from
the unit's torch.Generator, so the records do not depend on packing.

Rows of a unit are dependent: standard errors from independent units (``independent_rows`` False).
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

BITS = 30


def sobol_points(n: int, dims: int, generator: torch.Generator) -> torch.Tensor:
    """n scrambled Sobol points in [0, 1)^dims, each exactly uniform; float64 on the generator's device."""
    dev = generator.device
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=dev))
    from scipy.stats import qmc  # scipy.stats costs ~1 s to import: only runs that draw Sobol points pay it

    with warnings.catch_warnings():  # units that are not a power of 2 lose some balance, not exactness
        warnings.simplefilter("ignore", UserWarning)
        pts = qmc.Sobol(dims, scramble=True, bits=BITS, rng=np.random.default_rng(seed)).random(n)
    low = torch.rand((n, dims), generator=generator, dtype=torch.float64, device=dev)
    return torch.as_tensor(pts, dtype=torch.float64, device=dev) + low * 2.0 ** -BITS


class SobolDraws:
    """Coordinate t of a unit's scrambled Sobol points is the uniform of step t."""

    independent_rows = False

    def __init__(self, streams, max_new_tokens: int, device):
        self.u = torch.cat([sobol_points(n, max_new_tokens, g) for g, n in streams]).to(device)

    def __call__(self, t: int, log_r: torch.Tensor) -> torch.Tensor:
        from . import invert_cdf

        return invert_cdf(log_r, self.u[:, t])[0]
