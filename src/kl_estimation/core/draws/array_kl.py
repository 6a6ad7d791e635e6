r"""Array-RQMC sorted by the running Rao-Blackwell sum, inverting each row's CDF over its tokens in order of
decreasing probability (``--sampler array-kl``).

``array`` (draws/array_rqmc.py) ranks a unit's rows by their last tokens: on a toy Markov chain that groups rows in
the same state, but on an LM with V ≈ 50 000 the rows of a unit soon all end differently and the rank order is the
order of token ids, which says nothing about what the rest of the sequence will add. Here, at step t:

- the rows of a unit are ranked by K_≤t = Σ_{s≤t} KL(P_s‖Q_s) over the steps before EOS (the running RB term,
  including this step's exact KL, which is known before x_t is drawn): rows whose sequences so far contribute alike
  sit next to each other, the 1-D state statistic that array-RQMC needs to predict the value to come;
- the row of rank k takes u = ((rev_m(k) ⊕ D_t) + U_{k,t}) / 2^m exactly as ``array`` does;
- u is inverted through the CDF of r_t over the TOP_K most probable tokens in order of decreasing r_t, then the rest
  in token-id order, so small u means "a likely token" in every row and the stratification of u across rows balances
  how surprising each row's token is, which is what moves the future KL of an LM (a tail token takes the sequence
  off P's typical path). torch.topk instead of a full sort of the row: at V = 49,152 the sort cost array-kl 1.5–1.7×
  array's CPU time per token; past the top 64 tokens (on SmolLM2 at τ = 1 most of the mass) the order of the tail
  matters little. With V ≤ TOP_K it is the full order of decreasing r_t.

Exactness: the rank order and the token permutation depend only on what was drawn before step t; the digital shift
D_t is a fresh uniform m-bit integer and the jitter a fresh uniform, so given everything before, each row's u is
uniform on [0, 1) and its token is an exact draw from r_t given its own prefix (inverting a CDF over any
prefix-measurable ordering of the vocabulary — the top-k set and its order are functions of r_t — gives the same
distribution). Every sequence is an exact draw from the
proposal, every estimator stays unbiased; rows of a unit are dependent: standard errors from independent units
(``independent_rows`` False).
"""
from __future__ import annotations

import torch

from .array_rqmc import ArrayRQMCDraws

TOP_K = 64


def invert_topk_cdf(log_r: torch.Tensor, u: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Token x per row from u ∈ [0, 1) through the float64 CDF of exp(log_r) over the k tokens of largest mass (in
    decreasing order), then every other token in id order. Never a zero-mass token.

    Cost: array's id-order inversion (exp, cumsum, searchsorted) plus a top-k and one in-place pass over the row —
    the rest's CDF is built in the exp's own buffer (top tokens zeroed, cumsum and offset in place)."""
    r = log_r.double().exp().contiguous()  # a fresh buffer, ours to overwrite
    k = min(k, r.shape[-1])
    top_r, top_i = r.topk(k, dim=-1)
    cdf_top = top_r.cumsum(-1)
    cdf_rest = r.scatter_(-1, top_i, 0.0).cumsum_(-1)
    rest_total = cdf_rest[..., -1].clone()
    cdf_rest += cdf_top[..., -1:]
    target = u[..., None] * cdf_rest[..., -1:]
    j_top = torch.searchsorted(cdf_top, target, right=True)[..., 0]
    j_rest = torch.searchsorted(cdf_rest, target, right=True)[..., 0]
    # rounding can leave u·F(V) at the top: the first token where the CDF reaches its end has positive mass
    last_rest = torch.searchsorted(cdf_rest, cdf_rest[..., -1:].contiguous(), right=False)[..., 0]
    in_top = (j_top < k) | (rest_total <= 0)
    x_top = top_i.gather(-1, torch.minimum(j_top, (top_r > 0).sum(-1) - 1)[..., None])[..., 0]
    return torch.where(in_top, x_top, torch.minimum(j_rest, last_rest))


class ArrayKLDraws(ArrayRQMCDraws):
    """Per step: rank each unit's rows by their running RB sum, take shifted jittered van der Corput points in that
    order, invert them over the most probable tokens first. ``sort_vocab`` False inverts in token-id order
    (ablation)."""

    independent_rows = False
    uses_kl = True  # the engine passes this step's exact KL(P_t‖Q_t) per row (0 after EOS)
    sort_vocab = True

    def __init__(self, streams, max_new_tokens: int, device):
        super().__init__(streams, max_new_tokens, device)
        self.key = torch.zeros(self.unit.numel(), dtype=torch.float64, device=device)

    def __call__(self, t: int, log_r: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        from . import invert_cdf

        self.key = self.key + kl.to(self.key)
        o = torch.sort(self.key, stable=True).indices  # ties (t = 0: all rows alike) keep row order
        self.order = o = o[torch.sort(self.unit[o], stable=True).indices]
        pos = torch.empty_like(o)
        pos[o] = torch.arange(o.numel(), device=o.device)
        u = ((self.rev[pos] ^ self.shift[pos, t]).double() + self.jitter[pos, t]) * self.scale
        return invert_topk_cdf(log_r, u) if self.sort_vocab else invert_cdf(log_r, u)[0]


class ArrayKLIdOrderDraws(ArrayKLDraws):
    """Ablation (not registered): rows ranked by the running RB sum, CDF in token-id order as in ``array``."""

    sort_vocab = False
