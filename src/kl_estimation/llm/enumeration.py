"""Ground truth by enumeration: every continuation of a prompt of a small pair, with its exact values."""
from __future__ import annotations

import math

import torch

from kl_estimation.llm.engine import FORWARD, P_NAME, SequenceProposal, exact_step_kl, pair_view, sequence_proposal


@torch.inference_mode()
def enumerate_sequences(pair, proposal: SequenceProposal, max_new_tokens: int, max_sequences: int = 1_000_000,
                        prompt_index: int = 0, direction: str = FORWARD) -> dict:
    """Every complete sequence after prompt `prompt_index` of a small pair (a leaf: EOS or max_new_tokens tokens).
    `direction` "reverse" enumerates the swapped pair (engine.SwappedPair): ``log_p`` is then Q's, ``log_q`` P's,
    the proposal is built from Q and P, and ``kl`` is the exact KL(Q‖P).

    Returns float64 arrays over leaves — ``log_p``, ``log_q``, ``log_r`` (sequence log-probabilities under P, Q and
    the proposal), ``rb`` (Σ_t w_<t·KL_t along the sequence) — and ``kl``, the exact KL of the truncated process
    summed over prefixes (Σ_prefix P(prefix)·KL(P_t‖Q_t)). Any estimator's exact mean and variance under the
    proposal follow as sums Σ_x r(x)·g(x). Prefixes are replayed from the prompt at each depth (no cache reuse):
    fine for the tiny models this is for.
    """
    pair = pair_view(pair, direction)
    V = pair.vocab_size
    prefixes = torch.zeros((1, 0), dtype=torch.long, device=pair.device)
    acc = {k: torch.zeros(1, dtype=torch.float64, device=pair.device) for k in ("log_p", "log_q", "log_r", "rb")}
    leaves = {k: [] for k in acc}
    kl = 0.0
    for t in range(max_new_tokens):
        n = prefixes.shape[0]
        if n * V > max_sequences:
            raise ValueError(f"enumeration would visit more than {max_sequences} sequences (V={V}, T={max_new_tokens})")
        log_p, log_q, state = pair.start(torch.full((n,), prompt_index, dtype=torch.long))
        for s in range(t):
            log_p, log_q, state = pair.step(state, prefixes[:, s])
        # renormalised in float64, so that the exact sums hold to ~1e-15 rather than float32's ~1e-7
        log_p = log_p.double() - torch.logsumexp(log_p.double(), -1, keepdim=True)
        log_q = log_q.double() - torch.logsumexp(log_q.double(), -1, keepdim=True)
        log_r = proposal(log_p, log_q, acc["log_p"] - acc["log_q"]).double()
        kl_t = exact_step_kl(log_p, log_q)
        kl += float((acc["log_p"].exp() * kl_t).sum())
        rb = acc["rb"] + torch.exp(acc["log_p"] - acc["log_r"]) * kl_t
        child = {"log_p": acc["log_p"][:, None] + log_p, "log_q": acc["log_q"][:, None] + log_q,
                 "log_r": acc["log_r"][:, None] + log_r, "rb": rb[:, None].expand(n, V)}
        reachable = (child["log_p"] > -math.inf) | (child["log_r"] > -math.inf)
        tokens = torch.arange(V, device=pair.device).expand(n, V)
        ends = reachable & ((tokens == pair.eos_token_id) if pair.eos_token_id is not None else False)
        if t + 1 == max_new_tokens:
            ends = reachable
        for k in leaves:
            leaves[k].append(child[k][ends])
        go = reachable & ~ends
        rows, cols = go.nonzero(as_tuple=True)
        prefixes = torch.cat([prefixes[rows], cols[:, None]], dim=1)
        acc = {k: child[k][rows, cols] for k in acc}
        if prefixes.shape[0] == 0:
            break
    out = {k: torch.cat(v).cpu().numpy() for k, v in leaves.items()}
    out["kl"] = kl
    return out


def exact_kl(pair, max_new_tokens: int, prompt_index: int = 0, direction: str = FORWARD, **kw) -> float:
    """The exact KL of the truncated process after one prompt: KL(P‖Q) forward, KL(Q‖P) reverse."""
    return enumerate_sequences(pair, sequence_proposal(P_NAME), max_new_tokens, prompt_index=prompt_index,
                               direction=direction, **kw)["kl"]
