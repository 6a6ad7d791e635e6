r"""The exact KL of rows of distributions, for every area (numpy and torch, in log space).

    KL(P‖Q) = Σ_v P(v)·(log P(v) − log Q(v))   over the last axis

Conventions of ``kl_rows``:

* 0·log 0 = 0: a token with P = 0 contributes nothing, whatever Q is there (also Q = 0: no −inf − (−inf) = NaN).
* P > 0 = Q gives +inf (KL(P‖Q) is infinite), as scipy.stats.entropy does.
* numpy: float64 throughout. torch: the terms in float32 or wider (bfloat16 / float16 inputs are upcast to float32,
  float64 stays float64); ``accumulate`` (e.g. torch.float64) sums the row in that dtype. Gradients flow to both
  inputs, and the 0·log 0 positions contribute a zero gradient (never NaN): the masked difference is formed before
  the product, so no inf·0 appears on either pass.

Two forms of the one formula:

* ``kl_rows`` / ``kl_from_probs`` / ``kl_from_logits``: rows of (log-)probabilities, numpy float64 or torch, with the
  exact 0·log 0 and +inf conventions above. Used by the synthetic evaluation, the toy Markov DP, enumeration ground
  truth and the sampling engine's per-step KL (accumulated in float64).
* ``token_terms``: torch logits (N, V) → log P(x), log Q(x) of given tokens and KL(P‖Q) in
  one pass, ``chunk_size`` rows at a time in float32 or wider, K = Σ p·(log p − log q) (the difference formed in
  place, one dot product), with an analytic backward that recomputes each chunk instead of keeping
  (N, V) float32 activations. Used by every exact KL from logits of training.py (``exact_token_kl``,
  ``token_logprobs_and_kl``); the corpus run's statistics (llm/corpus/stats.py) form theirs with the normalisers in
  double instead, which a loss does not need. −inf logits are
  clamped to the most negative float there, so 0·log 0 = 0 and its gradient is 0, and P > 0 = Q gives a huge
  finite KL rather than +inf (a finite loss whose gradient stays finite).
"""
from __future__ import annotations

import math

import numpy as np


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def kl_rows(log_p, log_q, *, accumulate=None):
    """KL(P‖Q) over the last axis from normalised log-probabilities (numpy arrays or torch tensors).

    ``accumulate``: torch only, the dtype of the sum over the row (default: the terms' dtype)."""
    if _is_torch(log_p) or _is_torch(log_q):
        import torch

        lp, lq = (torch.as_tensor(x) for x in (log_p, log_q))
        dt = torch.promote_types(torch.promote_types(lp.dtype, lq.dtype), torch.float32)
        lp, lq = lp.to(dt), lq.to(device=lp.device, dtype=dt)
        has_p = lp > -math.inf
        diff = torch.where(has_p, lp - torch.where(has_p, lq, torch.zeros_like(lq)), torch.zeros_like(lp))
        terms = torch.where(has_p, lp.exp(), torch.zeros_like(lp)) * diff
        return terms.sum(-1) if accumulate is None else terms.sum(-1, dtype=accumulate)
    lp, lq = np.asarray(log_p, dtype=np.float64), np.asarray(log_q, dtype=np.float64)
    has_p = lp > -np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(has_p, lp - np.where(has_p, lq, 0.0), 0.0)
        return np.sum(np.where(has_p, np.exp(lp), 0.0) * diff, axis=-1)


def kl_from_probs(P, Q, axis: int = -1):
    """KL(P‖Q) along `axis` from probabilities (numpy, float64); equals scipy.stats.entropy(P, Q) for normalised
    rows."""
    P = np.moveaxis(np.asarray(P, dtype=np.float64), axis, -1)
    Q = np.moveaxis(np.asarray(Q, dtype=np.float64), axis, -1)
    with np.errstate(divide="ignore"):
        return kl_rows(np.log(P), np.log(Q))


def kl_from_logits(logits_p, logits_q, *, temperature: float = 1.0, accumulate=None):
    """KL(P_τ‖Q_τ) over the last axis from unnormalised logits (log-softmax after dividing by τ)."""
    if _is_torch(logits_p) or _is_torch(logits_q):
        import torch

        def norm(x):
            x = torch.as_tensor(x)
            x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            return torch.log_softmax(x / temperature if temperature != 1.0 else x, dim=-1)

        return kl_rows(norm(logits_p), norm(logits_q), accumulate=accumulate)
    from scipy.special import log_softmax

    return kl_rows(log_softmax(np.asarray(logits_p, dtype=np.float64) / temperature, axis=-1),
                   log_softmax(np.asarray(logits_q, dtype=np.float64) / temperature, axis=-1))


def default_chunk(V: int) -> int:
    """Rows per chunk for a vocabulary of V."""
    # 2^24 elements (64 MiB in float32) per temporary, three or four of them live per chunk, whatever B × T is
    return max(1, (1 << 24) // max(1, V))


def _fused_kernels():
    """The chunk computations written functionally for torch.compile: inductor fuses each into a pass or two over
    the bf16 logits, where eager torch makes one float32 pass per operation."""
    import torch

    def scaled(z, inv_tau):
        return z.to(torch.promote_types(torch.float32, z.dtype)) * inv_tau

    def normalised(z, lse, inv_tau):
        x = scaled(z, inv_tau) - lse
        return x.clamp(min=torch.finfo(x.dtype).min)

    def onehot(tok, z):
        # a comparison with an index range, which inductor generates inside the kernel (a scatter would need the
        # gradient materialised in float32 first)
        return (torch.arange(z.shape[-1], device=z.device) == tok).to(torch.promote_types(torch.float32, z.dtype))

    def forward(zp, zq, tok, inv_tau: float):
        # the row log-normalisers go back to the Function so that the backward is one pass over the logits
        lse_p = torch.logsumexp(scaled(zp, inv_tau), -1, keepdim=True)
        lse_q = torch.logsumexp(scaled(zq, inv_tau), -1, keepdim=True)
        lsa, lsb = normalised(zp, lse_p, inv_tau), normalised(zq, lse_q, inv_tau)
        kl = (lsa.exp() * (lsa - lsb)).sum(-1)
        return lsa.gather(-1, tok)[:, 0], lsb.gather(-1, tok)[:, 0], kl, lse_p, lse_q

    def grad_p(zp, zq, tok, kl, lse_p, lse_q, a_lp, a_kl, inv_tau: float, use_kl: bool):
        lsa = normalised(zp, lse_p, inv_tau)
        p = lsa.exp()
        d = p * (a_kl * (lsa - normalised(zq, lse_q, inv_tau) - kl) - a_lp) if use_kl else -p * a_lp
        return ((d + a_lp * onehot(tok, zp)) * inv_tau).to(zp.dtype)

    def grad_q(zp, zq, tok, lse_p, lse_q, a_lq, a_kl, inv_tau: float):
        p, q = normalised(zp, lse_p, inv_tau).exp(), normalised(zq, lse_q, inv_tau).exp()
        return ((a_kl * (q - p) - a_lq * q + a_lq * onehot(tok, zq)) * inv_tau).to(zq.dtype)

    # dynamic: one compilation serves every number of rows (the last chunk, other batch shapes)
    return tuple(torch.compile(f, dynamic=True) for f in (forward, grad_p, grad_q))


_FUSED = None  # the compiled kernels, built on the first token_terms(compile=True)
_KERNEL = None  # _build_kernel()'s, built on first use: numpy callers never import torch


def _build_kernel():
    """The autograd Function of token_terms."""
    import torch

    def log_softmax(z, dt, inv_tau, clamp):
        # torch's fused kernel on an explicit float32 copy (faster on CPU than dtype=); −inf logits are clamped to
        # the most negative float so that 0·log 0 stays 0 in the dot products below
        out = torch.log_softmax(z.to(dt) * inv_tau if inv_tau != 1.0 else z.to(dt), -1)
        return out.clamp_(min=torch.finfo(dt).min) if clamp else out

    def dot(a, b):
        return torch.einsum("rv,rv->r", a, b)

    def block(zp, zq, tok, dt, inv_tau, clamp):
        """log P(x), log Q(x), KL(P‖Q) of one chunk of rows, computed in `dt`."""
        lsa, lsb = log_softmax(zp, dt, inv_tau, clamp), log_softmax(zq, dt, inv_tau, clamp)
        out = lsa.gather(-1, tok)[:, 0], lsb.gather(-1, tok)[:, 0]
        p = lsa.exp()
        # the difference first, then one dot product: Σ p·log p − Σ p·log q loses up to 3× more to cancellation in
        # float32; formed in place (log P is not needed any more), so it costs no extra vocabulary-wide tensor
        d = lsa.sub_(lsb)
        kl = dot(p, d)
        return (*out, kl)

    class _TokenTerms(torch.autograd.Function):
        """log P(x_t), log Q(x_t) and KL(P_t‖Q_t) from (N, V) logits, one chunk of rows at a time.

        K = Σ_v p·(log p − log q) (the difference formed in place, one dot product). The backward pass
        recomputes each chunk's log-softmax instead of keeping (N, V) float32 activations and writes the analytic
        gradients, ∂K/∂z_p = p·(log p − log q − K), ∂K/∂z_q = q − p, ∂log p(x)/∂z_p = 1{x} − p, in place (or
        through the compiled kernels of _fused_kernels).
        """

        @staticmethod
        def forward(ctx, zp, zq, tokens, inv_tau: float, chunk: int, fused):
            dt = torch.promote_types(torch.float32, zp.dtype)
            clamp = bool(torch.isneginf(zp.amin()) or torch.isneginf(zq.amin())) if fused is None else True
            N = zp.shape[0]
            lp_tok, lq_tok, kl = (torch.empty(N, dtype=dt, device=zp.device) for _ in range(3))
            n_lse = N if fused is not None else 0  # the compiled backward starts from the forward's normalisers
            lse_p, lse_q = (torch.empty(n_lse, 1, dtype=dt, device=zp.device) for _ in range(2))
            for i in range(0, N, chunk):
                j = min(N, i + chunk)
                tok = tokens[i:j, None]
                if fused is not None:
                    lp_tok[i:j], lq_tok[i:j], kl[i:j], lse_p[i:j], lse_q[i:j] = fused[0](zp[i:j], zq[i:j], tok,
                                                                                         inv_tau)
                    continue
                lp_tok[i:j], lq_tok[i:j], kl[i:j] = block(zp[i:j], zq[i:j], tok, dt, inv_tau, clamp)
            ctx.save_for_backward(zp, zq, tokens, kl, lse_p, lse_q)
            ctx.inv_tau, ctx.chunk, ctx.clamp, ctx.fused = inv_tau, chunk, clamp, fused
            return lp_tok, lq_tok, kl

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, g_lp, g_lq, g_kl):
            zp, zq, tokens, kl, lse_p, lse_q = ctx.saved_tensors
            need_p, need_q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            dt, N, inv_tau, chunk, clamp, fused = kl.dtype, zp.shape[0], ctx.inv_tau, ctx.chunk, ctx.clamp, ctx.fused
            zeros = torch.zeros(N, dtype=dt, device=kl.device)
            use_kl = g_kl is not None  # kl_loss("mc") never uses it: log Q's softmax is then not needed for P
            g_lp, g_lq, g_kl = (zeros if g is None else g.to(dt) for g in (g_lp, g_lq, g_kl))
            gp = torch.empty_like(zp) if need_p else None
            gq = torch.empty_like(zq) if need_q else None
            for i in range(0, N, chunk):
                j = min(N, i + chunk)
                tok, a_lp, a_lq, a_kl = tokens[i:j, None], g_lp[i:j, None], g_lq[i:j, None], g_kl[i:j, None]
                if fused is not None:
                    lp_, lq_ = lse_p[i:j], lse_q[i:j]
                    if need_p:
                        gp[i:j] = fused[1](zp[i:j], zq[i:j], tok, kl[i:j, None], lp_, lq_, a_lp, a_kl, inv_tau,
                                           use_kl)
                    if need_q:
                        gq[i:j] = fused[2](zp[i:j], zq[i:j], tok, lp_, lq_, a_lq, a_kl, inv_tau)
                    continue
                lsa = log_softmax(zp[i:j], dt, inv_tau, clamp)
                p = lsa.exp()
                lsb = log_softmax(zq[i:j], dt, inv_tau, clamp) if (use_kl or need_q) else None
                if need_q:
                    q = lsb.exp()
                    d = torch.sub(p, q).mul_(-a_kl).sub_(q.mul_(a_lq))  # a_kl·(q − p) − a_lq·q
                    d.scatter_add_(-1, tok, a_lq)
                    gq[i:j] = d.mul_(inv_tau) if inv_tau != 1.0 else d
                if need_p:
                    if use_kl:  # p·(a_kl·(log p − log q − K) − a_lp)
                        d = lsa.sub_(lsb).mul_(a_kl).sub_(a_kl * kl[i:j, None] + a_lp).mul_(p)
                    else:
                        d = p.mul_(-a_lp)
                    d.scatter_add_(-1, tok, a_lp)
                    gp[i:j] = d.mul_(inv_tau) if inv_tau != 1.0 else d
            return gp, gq, None, None, None, None

    return _TokenTerms


def token_terms(logits_p, logits_q, tokens, *, inv_tau: float = 1.0, chunk_size: int | None = None,
                compile: bool = False):
    """log P(x), log Q(x) of ``tokens`` (N,) int64 and KL(P‖Q) of each row of the logits (N, V), rows divided by the
    temperature 1/``inv_tau``; in float32 (float64 for float64 logits), with the analytic backward to both logits.
    ``chunk_size``: rows per chunk (default ``default_chunk(V)``); ``compile``: torch.compile'd kernels. The callers
    check their inputs (training.token_logprobs_and_kl)."""
    global _FUSED
    if compile and _FUSED is None:
        _FUSED = _fused_kernels()
    chunk = default_chunk(logits_p.shape[-1]) if chunk_size is None else chunk_size
    return _kernel().apply(logits_p, logits_q, tokens, inv_tau, chunk, _FUSED if compile else None)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL
