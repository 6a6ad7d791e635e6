r"""A fused two-model output head: per-token log π(x_t), log π_ref(x_t), the exact KL between the two next-token
distributions (the Rao-Blackwellized term) and the policy's entropy, from the final hidden states of both models and
their output heads, without ever building (B, T, V) logits.

The work runs over tiles of (row block × vocabulary slice). The forward folds each tile's logits of both models into
online log-sum-exp statistics per row (float32, or float64 for float64 inputs); the backward recomputes each tile,
writes the analytic gradient of the logits in place and accumulates the two gradient products in float32. Peak
extra memory is a few (rows, vocab slice) float32 tiles plus the (V, H) float32 accumulator of the head's gradient —
the layout of TRL's chunked log-prob head (trl.kernels.chunked_logprob), extended to a second, frozen model.

With z = (h·Wᵀ + b)·scale / τ, log p = z − lse(z), and upstream gradients a_lp, a_kl, a_H per row:

    ∂log p(x)/∂z = 1{x} − p        ∂H/∂z = −p·(log p + H)
    ∂KL(π‖π_ref)/∂z_π = p·(log p − log q − KL)        ∂KL(π_ref‖π)/∂z_π = p − q

The reference gets no gradient (it is frozen in every trainer this is for).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FUSED_HEAD_DIRECTIONS = ("forward", "reverse")
# elements per float32 tile: 2^24 (64 MiB), a handful of them live at once
_TILE_ELEMENTS = 1 << 24
_ROW_BLOCK = 1024


class HeadTerms(NamedTuple):
    """Per-token outputs of ``fused_head_terms``, each (..., T), 0 where the mask is False."""

    logp: torch.Tensor  # log π(x_t), with gradient
    logq: torch.Tensor  # log π_ref(x_t), no gradient
    kl: torch.Tensor  # exact KL_t in the chosen direction, with gradient
    entropy: torch.Tensor  # H(π_t), with gradient


def _acc_dtype(dtype):
    return torch.promote_types(torch.float32, dtype)


def _tile_logits(h, w, b, v0, v1, factor, cdt):
    """Scaled logits of rows `h` over vocabulary slice [v0, v1), in float32 or wider: the product runs in the
    compute dtype `cdt` (bf16 logits, as the model's own head would give them) and is converted after."""
    z = h.to(cdt) @ w[v0:v1].to(cdt).t()
    if b is not None:
        z = z + b[v0:v1].to(cdt)
    z = z.to(_acc_dtype(z.dtype))
    return z if factor == 1.0 else z.mul_(factor)


def _dot(a, b):
    return torch.einsum("rv,rv->r", a, b)


def _fold(m, s, z, r0, r1):
    """Online log-sum-exp over vocabulary slices: move the running sum of rows r0:r1 to the new row maxima, add the
    slice; returns the slice's exp(z − max) and the factor the other running sums must be rescaled by."""
    new = torch.maximum(m[r0:r1], z.amax(-1))
    c = torch.exp(m[r0:r1] - new)
    e = torch.exp(z - new[:, None])
    s[r0:r1] = s[r0:r1] * c + e.sum(-1)
    m[r0:r1] = new
    return e, c


class _FusedHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hp, wp, bp, hq, wq, bq, tok, factor: float, reverse: bool, rows: int, cols: int, cdt):
        ctx.set_materialize_grads(False)
        N, V = hp.shape[0], wp.shape[0]
        dt = _acc_dtype(torch.promote_types(hp.dtype, cdt))

        def stats():
            return torch.zeros(N, dtype=dt, device=hp.device)

        mp, mq = (torch.full((N,), -torch.inf, dtype=dt, device=hp.device) for _ in range(2))
        sp, sq, sxp, sdp, sdq, zp_x, zq_x = (stats() for _ in range(7))
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            t = tok[r0:r1, None]
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                zp = _tile_logits(hp[r0:r1], wp, bp, v0, v1, factor, cdt)
                zq = _tile_logits(hq[r0:r1], wq, bq, v0, v1, factor, cdt)
                ep, cp = _fold(mp, sp, zp, r0, r1)
                sxp[r0:r1] = sxp[r0:r1] * cp + _dot(ep, zp)
                eq, cq = _fold(mq, sq, zq, r0, r1)
                if reverse:
                    sdq[r0:r1] = sdq[r0:r1] * cq + _dot(eq, zq - zp)
                else:
                    sdp[r0:r1] = sdp[r0:r1] * cp + _dot(ep, zp - zq)
                inside = (t >= v0) & (t < v1)
                idx = (t - v0).clamp(0, v1 - v0 - 1)
                zp_x[r0:r1] += torch.where(inside, zp.gather(-1, idx), 0.0)[:, 0]
                zq_x[r0:r1] += torch.where(inside, zq.gather(-1, idx), 0.0)[:, 0]
        lse_p, lse_q = mp + torch.log(sp), mq + torch.log(sq)
        logp, logq = zp_x - lse_p, zq_x - lse_q
        entropy = lse_p - sxp / sp
        kl = (sdq / sq - lse_q + lse_p) if reverse else (sdp / sp - lse_p + lse_q)
        ctx.save_for_backward(hp, wp, bp, hq, wq, bq, tok, lse_p, lse_q, kl, entropy)
        ctx.args = factor, reverse, rows, cols, cdt
        ctx.mark_non_differentiable(logq)
        return logp, logq, kl, entropy

    @staticmethod
    def backward(ctx, g_lp, g_lq, g_kl, g_ent):
        hp, wp, bp, hq, wq, bq, tok, lse_p, lse_q, kl, entropy = ctx.saved_tensors
        factor, reverse, rows, cols, cdt = ctx.args
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, V = hp.shape[0], wp.shape[0]
        dt = lse_p.dtype
        gh = torch.zeros(hp.shape, dtype=dt, device=hp.device) if need_h else None
        gw = torch.zeros(wp.shape, dtype=dt, device=wp.device) if need_w else None
        gb = torch.zeros(bp.shape, dtype=dt, device=bp.device) if need_b else None
        if not (need_h or need_w or need_b) or all(g is None for g in (g_lp, g_kl, g_ent)):
            return gh, gw, gb, *(None,) * 9
        need_q = g_kl is not None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            t = tok[r0:r1, None]
            a_lp = None if g_lp is None else g_lp[r0:r1, None].to(dt)
            a_kl = None if g_kl is None else g_kl[r0:r1, None].to(dt)
            a_h = None if g_ent is None else g_ent[r0:r1, None].to(dt)
            hp_r, hp_acc = hp[r0:r1], hp[r0:r1].to(cdt).to(dt)
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                lp = _tile_logits(hp_r, wp, bp, v0, v1, factor, cdt).sub_(lse_p[r0:r1, None])
                p = torch.exp(lp)
                # coefficient of p in the gradient, then the terms that are not proportional to p
                coef = torch.zeros_like(lp)
                if a_h is not None:
                    coef.sub_((lp + entropy[r0:r1, None]).mul_(a_h))
                if a_lp is not None:
                    coef.sub_(a_lp)
                if need_q:
                    lq = _tile_logits(hq[r0:r1], wq, bq, v0, v1, factor, cdt).sub_(lse_q[r0:r1, None])
                    if reverse:
                        coef.add_(a_kl)
                    else:
                        coef.add_((lp - lq - kl[r0:r1, None]).mul_(a_kl))
                d = coef.mul_(p)
                if need_q and reverse:
                    d.sub_(torch.exp(lq).mul_(a_kl))
                if a_lp is not None:
                    inside = (t >= v0) & (t < v1)
                    d.scatter_add_(-1, (t - v0).clamp(0, v1 - v0 - 1), torch.where(inside, a_lp, 0.0))
                if factor != 1.0:
                    d.mul_(factor)
                if gh is not None:
                    gh[r0:r1].addmm_(d, wp[v0:v1].to(dt))
                if gw is not None:
                    gw[v0:v1].addmm_(d.t(), hp_acc)
                if gb is not None:
                    gb[v0:v1] += d.sum(0)
        return (None if gh is None else gh.to(hp.dtype), None if gw is None else gw.to(wp.dtype),
                None if gb is None else gb.to(bp.dtype), *(None,) * 9)


def _check_head(name, hidden, weight, bias):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name}: hidden states and head weight must be torch tensors")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{name}: head weight shape {tuple(weight.shape)} does not match hidden size "
                         f"{hidden.shape[-1]} (expected (V, {hidden.shape[-1]}))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")


def fused_head_terms(hidden_p, weight_p, hidden_q, weight_q, tokens, mask=None, *, bias_p=None, bias_q=None,
                     logit_scale: float = 1.0, temperature: float = 1.0, direction: str = "forward",
                     row_block: int | None = None, vocab_block: int | None = None,
                     compute_dtype: torch.dtype | None = None) -> HeadTerms:
    """Per-token log π(x_t), log π_ref(x_t), exact KL_t and H(π_t) from both models' final hidden states.

    Parameters
    ----------
    hidden_p, hidden_q : torch.Tensor, (..., T, H)
        Final hidden states of the policy and the reference, already aligned with ``tokens``: row t scores
        ``tokens[..., t]`` (for a causal LM, the hidden state at position t − 1 of the input).
    weight_p, weight_q : torch.Tensor, (V, H)
        Output heads (tied to the input embeddings or not: the gradient reaches whatever tensor is passed).
    tokens : torch.Tensor, (..., T), integer
        The tokens scored; any value (−100 included) where ``mask`` is False.
    mask : torch.Tensor, (..., T), bool, optional
        False on padding and after EOS: those rows are skipped (no compute) and their outputs are 0.
    bias_p, bias_q : torch.Tensor, (V,), optional
    logit_scale, temperature : float
        Logits are (h·Wᵀ + b)·logit_scale / temperature (the sampling temperature, so that π is what was sampled).
    direction : {"forward", "reverse"}
        "forward": KL(π‖π_ref), the penalty RL trainers estimate with k1/k3; "reverse": KL(π_ref‖π).
    row_block, vocab_block : int, optional
        Tile shape; defaults 1024 rows × ⌊2²⁴ / rows⌋ vocabulary entries (64 MiB per float32 tile).
    compute_dtype : torch.dtype, optional
        dtype of the head products (default: the hidden states'). TRL's head uses the autocast dtype under mixed
        precision (bf16 logits from float32 weights); the statistics and gradients stay float32 or wider.

    Returns
    -------
    HeadTerms(logp, logq, kl, entropy), each (..., T) in float32 (float64 for float64 inputs). Gradients flow to
    ``hidden_p``, ``weight_p`` and ``bias_p`` through ``logp``, ``kl`` and ``entropy``; the reference is frozen.
    """
    if direction not in FUSED_HEAD_DIRECTIONS:
        raise ValueError(f"direction: unknown {direction!r}; allowed: {', '.join(FUSED_HEAD_DIRECTIONS)}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0 (got {temperature!r})")
    for name, v in (("row_block", row_block), ("vocab_block", vocab_block)):
        if v is not None and not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name}: must be an integer ≥ 1 (got {v!r})")
    _check_head("hidden_p", hidden_p, weight_p, bias_p)
    _check_head("hidden_q", hidden_q, weight_q, bias_q)
    if tuple(hidden_q.shape[:-1]) != tuple(hidden_p.shape[:-1]):
        raise ValueError(f"hidden_q: leading shape {tuple(hidden_q.shape[:-1])} differs from hidden_p's "
                         f"{tuple(hidden_p.shape[:-1])}")
    if weight_q.shape[0] != weight_p.shape[0]:
        raise ValueError(f"weight_q: vocabulary {weight_q.shape[0]} differs from weight_p's {weight_p.shape[0]}")
    lead, V = tuple(hidden_p.shape[:-1]), weight_p.shape[0]
    if not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != lead:
        raise ValueError(f"tokens: must be a tensor of the hidden states' leading shape {lead}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens: must be integer (got {tokens.dtype})")
    m = torch.ones(lead, dtype=torch.bool, device=hidden_p.device) if mask is None else torch.as_tensor(
        mask, device=hidden_p.device).bool()
    if tuple(m.shape) != lead:
        raise ValueError(f"mask: shape {tuple(m.shape)} differs from tokens' {lead}")
    tok = tokens[m].long()
    if bool(((tok < 0) | (tok >= V)).any()):
        raise ValueError(f"tokens: values outside [0, {V}) at unmasked positions")
    rows = row_block or _ROW_BLOCK
    cols = vocab_block or max(1, _TILE_ELEMENTS // rows)
    outs = _FusedHead.apply(hidden_p[m], weight_p, bias_p, hidden_q[m].detach(), weight_q.detach(),
                            None if bias_q is None else bias_q.detach(), tok, logit_scale / temperature,
                            direction == "reverse", rows, cols, compute_dtype or hidden_p.dtype)
    return HeadTerms(*(o.new_zeros(lead).masked_scatter(m, o) for o in outs))
