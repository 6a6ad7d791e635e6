r"""An exact head plus a sampled remainder: the KL of a near-deterministic model without sampling its few likely
sequences over and over.

For any per-sequence term g — g = f = log P(x)/Q(x) (MC) or g = Σ_t KL(P_t‖Q_t | x_<t) (RB), both with E_P[g] = KL —
and any set H of complete sequences (the *head*),

    KL = Σ_{x∈H} P(x)·g(x) + Σ_{x∉H} P(x)·g(x),

the first sum computed exactly, the second estimated from n draws of r′ = r(· | x ∉ H) (r = P: plain Monte Carlo
conditioned on the remainder) as the mean of W(x)·g(x), W = P(x)/r′(x). For r = P every W is the remainder's mass
1 − P(H), so the estimate is Σ_H P·g + (1 − P(H))·mean(g). Unbiased for every H; the SE is the remainder sample's.

*Search* (:func:`search_head`): best-first over the prefix tree under the sampling model — expand the most probable
open prefix (one forward of P and Q at that position: its next-token rows), put its complete children (EOS, or the
last position) into H, push its most probable open children — until P(H) ≥ 1 − eps or `budget` prefixes were
expanded. *Exact conditioning*: for each expanded prefix u keep b(u) = P(not in H | u), bottom-up
b(u) = Σ_v P(v|u)·b(uv) with b = 0 for a complete child in H and b = 1 below any prefix never expanded; the
remainder draws token v at u with P(v|u)·b(uv)/b(u) (:meth:`Head.condition`; the same with r for a proposal).
Computed in log space from the rows themselves (never as 1 − Σ), so a remainder of 1e-12 keeps its digits.

A control variate comes free: E_P[f − g_RB] = 0, so the remainder's W·(f − g_RB) has the known mean
−Σ_H P·(f − g_RB); RB+CV adds a cross-fitted multiple of it (as estimators.rb_control_variate_terms does for the
whole sample). Flags read the remainder's sample (its distinct sequences, its weights P′/r′ under the conditioned P′).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from kl_estimation.core.estimators import Z95
from kl_estimation.llm.engine import exact_step_kl

ROUNDING = 1e-14  # relative float64 error of the head's exact sums (about 50 ulp: exp of log-probabilities, sums)
HEAD_ESTIMATORS = {True: ("MC", "RB", "RB+CV"), False: ("IS", "RB-IS", "RB-IS+CV")}  # by "proposal is P"
AUTO_PILOT = 16  # forwards of the pilot search that decides, in auto mode, whether a prompt gets a head
AUTO_BUDGET = 256  # ... and the budget it then gets
AUTO_MIN_SHARE = 0.5  # ... given only where one sequence may hold at least this share of P's mass (see heads_for)
MAX_CHILDREN = 64  # open children pushed per expanded prefix (the rest stay in the remainder: exactness unchanged)


@dataclass
class Head:
    """The head of one prompt: its exact sums and the tree that conditions draws on leaving it.

    ``mass`` P(H); ``log_remainder`` log(1 − P(H)) computed bottom-up; ``mc`` Σ_H P·f; ``rb`` Σ_H P·g_RB;
    ``scale`` Σ_H P·(|f| + g_RB); ``top`` P of H's most probable sequence; ``modal_bound`` an upper bound on P of
    the most probable sequence of all (in H or not: what the search has seen of the rest bounds it);
    ``forwards`` prefixes expanded (each one position of P and Q); ``sequences`` complete sequences in H. Tree
    (torch, one row per expanded prefix, node 0 the root): ``tok`` (N, K) children with a conditioning entry (padded
    with V), ``lb_p`` / ``lb_r`` their log b under P / r, ``child`` their node (−1: none)."""

    mass: float
    log_remainder: float
    mc: float
    rb: float
    scale: float  # Σ_H P·(|f| + g_RB): what the sums' rounding is relative to
    top: float  # P of the most probable sequence in H
    modal_bound: float  # ≥ P of the most probable sequence anywhere (= top once the search has passed every rival)
    forwards: int
    sequences: int
    vocab_size: int
    tok: torch.Tensor
    lb_p: torch.Tensor
    lb_r: torch.Tensor
    child: torch.Tensor

    def record(self) -> dict:
        """What a run's files and rows say about the head."""
        return {"head_mass": self.mass, "head_remainder_mass": math.exp(self.log_remainder),
                "head_forwards": self.forwards, "head_sequences": self.sequences}

    @property
    def exhausted(self) -> bool:
        """Every sequence is in H (a small tree searched to the end): the sums are the exact KL, nothing is left
        to sample (the draws are then plain ones, weighted 0)."""
        return self.log_remainder == -math.inf

    def roots(self, n: int, device) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, device=device)

    def condition(self, node: torch.Tensor, log_p: torch.Tensor, log_r: torch.Tensor):
        """(log P′, log r′): the rows conditioned on not ending in H, for rows at tree node `node` (−1: below a
        prefix never expanded, where nothing of H lies: the rows stay as they are, renormalised in float64)."""
        log_p, log_r = (x.double().log_softmax(-1) for x in (log_p, log_r))
        inside = node >= 0
        if self.exhausted or not bool(inside.any()):
            return log_p, log_r
        at = node.clamp(min=0)
        tok = self.tok[at]
        out = []
        for rows, lb in ((log_p, self.lb_p), (log_r, self.lb_r)):
            adj = torch.zeros(rows.shape[0], self.vocab_size + 1, dtype=torch.float64, device=rows.device)
            adj = adj.scatter(1, tok, lb[at])[:, :self.vocab_size]
            # renormalised, not divided by b(u): the model's rows and the search's b make one exact distribution
            out.append(torch.where(inside[:, None], rows + adj, rows).log_softmax(-1))
        return out[0], out[1]

    def advance(self, node: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each row's node after drawing token x (−1 once it left the expanded tree)."""
        at = node.clamp(min=0)
        hit = self.tok[at] == x[:, None]
        nxt = self.child[at].gather(1, hit.long().argmax(1, keepdim=True))[:, 0]
        return torch.where((node >= 0) & hit.any(1), nxt, torch.full_like(node, -1))


@dataclass
class _Node:
    tokens: tuple
    lp: float  # log P(prefix)
    lq: float
    rb: float  # Σ of KL_s at the prefixes before this one
    expanded: bool = False
    kids: list = field(default_factory=list)  # [token, log P(v|u), log r(v|u), node id] of pushed open children
    eos: tuple | None = None  # (token, log P(v|u), log r(v|u)) of the EOS child (complete: in H)
    rest_p: float = -math.inf  # log P-mass of the open children not pushed (b = 1)
    rest_top: float = -math.inf  # log P(v|u) of the most probable of them
    rest_r: float = -math.inf


def _rows(pair, prompt_index: int, prefixes: list[tuple]):
    """The next-token rows (float64, renormalised) of P and Q after each prefix, replayed from the prompt in one
    batch (the prefixes have one length)."""
    rows = torch.full((len(prefixes),), prompt_index, dtype=torch.long)
    log_p, log_q, state = pair.start(rows)
    toks = torch.as_tensor(prefixes, dtype=torch.long, device=log_p.device).reshape(len(prefixes), -1)
    for s in range(toks.shape[1]):
        log_p, log_q, state = pair.step(state, toks[:, s])
    return log_p.double().log_softmax(-1), log_q.double().log_softmax(-1)


@torch.inference_mode()
def search_head(pair, proposal, max_new_tokens: int, budget: int, eps: float = 0.0, prompt_index: int = 0,
                width: int = 8) -> Head:
    """Best-first search of the head after prompt `prompt_index` (see the module doc). `pair` is the direction's
    view (engine.pair_view); `proposal` the SequenceProposal whose conditioned draws sample the remainder;
    `budget` the most prefixes to expand, `width` how many are expanded per batch of forwards (best-first up to
    that batching); `eps` > 0 stops once P(H) ≥ 1 − eps (0: the whole budget, or until every sequence is in H —
    P(H) summed in float64 reaches 1 long before the remainder, whose draws need not be all alike, is 0)."""
    if budget < 1:
        raise ValueError(f"head: the budget of forward passes must be ≥ 1 (got {budget})")
    V, eos = pair.vocab_size, pair.eos_token_id
    nodes = [_Node((), 0.0, 0.0, 0.0)]
    frontier = [(-0.0, 0)]  # (−log P(prefix), node id): expanded when popped
    mass = mc = rb = scale = top = 0.0
    sequences = expanded = 0
    while frontier and expanded < budget and not (eps > 0 and mass >= 1 - eps):
        batch = [heapq.heappop(frontier)[1] for _ in range(min(width, budget - expanded, len(frontier)))]
        expanded += len(batch)
        by_depth: dict[int, list[int]] = {}
        for i in batch:
            by_depth.setdefault(len(nodes[i].tokens), []).append(i)
        for depth, ids in by_depth.items():
            log_p, log_q = _rows(pair, prompt_index, [nodes[i].tokens for i in ids])
            dev = log_p.device
            lp_u, lq_u, rb_u = (torch.tensor([getattr(nodes[i], a) for i in ids], dtype=torch.float64, device=dev)
                                for a in ("lp", "lq", "rb"))
            log_r = proposal(log_p, log_q, lp_u - lq_u).double().log_softmax(-1)
            rb_u = rb_u + exact_step_kl(log_p, log_q)  # g_RB of a sequence ending at a child of u
            last = depth + 1 == max_new_tokens
            complete = torch.full((V,), last, dtype=torch.bool, device=dev)
            if eos is not None:
                complete[eos] = True
            # the complete children join H: their exact sums, vectorised over the batch and the vocabulary
            p_seq = torch.where(complete, (lp_u[:, None] + log_p).exp(), 0.0)
            f_seq = torch.where(p_seq > 0, (lp_u - lq_u)[:, None] + log_p - log_q, 0.0)
            mass += float(p_seq.sum())
            mc += float((p_seq * f_seq).sum())
            scale += float((p_seq * f_seq.abs()).sum())
            top = max(top, float(p_seq.max()))
            rb += float((p_seq.sum(1) * rb_u).sum())
            sequences += int((p_seq > 0).sum())
            for i in ids:
                nodes[i].expanded = True
            if last:
                continue
            open_p = torch.where(complete, -math.inf, log_p)
            k = min(MAX_CHILDREN, V, budget - expanded)
            if k == 0:  # nothing more can be expanded: every open child stays in the remainder
                top_v = torch.zeros((len(ids), 0), dtype=torch.long, device=dev)
            else:
                top_v = open_p.topk(k, dim=1).indices
            pushed = torch.zeros((len(ids), V), dtype=torch.bool, device=dev).scatter_(1, top_v, True)
            rest = torch.where(pushed, -math.inf, open_p)
            rest_p, rest_top = rest.logsumexp(1), rest.max(1).values
            rest_r = torch.where(pushed | complete, -math.inf, log_r).logsumexp(1)
            top_lp, top_lq, top_lr = (x.gather(1, top_v) for x in (open_p, log_q, log_r))
            for j, i in enumerate(ids):  # a loop over expanded prefixes (≤ budget), not over samples
                u = nodes[i]
                u.rest_p, u.rest_r, u.rest_top = float(rest_p[j]), float(rest_r[j]), float(rest_top[j])
                if eos is not None:
                    u.eos = (eos, float(log_p[j, eos]), float(log_r[j, eos]))
                for v, lpv, lqv, lrv in zip(top_v[j].tolist(), top_lp[j].tolist(), top_lq[j].tolist(),
                                            top_lr[j].tolist()):
                    if lpv == -math.inf:
                        continue
                    nodes.append(_Node(u.tokens + (v,), u.lp + lpv, u.lq + lqv, float(rb_u[j])))
                    u.kids.append([v, lpv, lrv, len(nodes) - 1])
                    heapq.heappush(frontier, (-(u.lp + lpv), len(nodes) - 1))
    # a sequence outside H leaves the expanded tree at a prefix u by an open child v, pushed (then on the frontier)
    # or not (then at most u's most probable unpushed child): its P is at most the largest of those prefixes' P
    outside = max([-frontier[0][0]] if frontier else [], default=-math.inf)
    outside = max([outside] + [u.lp + u.rest_top for u in nodes if u.expanded])
    sums = {"mass": mass, "mc": mc, "rb": rb, "scale": scale + rb, "top": top, "sequences": sequences,
            "modal_bound": max(top, math.exp(outside))}
    return _tree(nodes, expanded, sums, V, pair.device)


def _tree(nodes, expanded, sums, V, device) -> Head:
    """b bottom-up over the expanded prefixes (children come after their parents), and the tables that condition
    the remainder's draws: per expanded prefix its EOS child (b = 0) and its expanded children."""
    rows = {i: j for j, i in enumerate(i for i, u in enumerate(nodes) if u.expanded)}
    lb_p, lb_r = np.zeros(len(nodes)), np.zeros(len(nodes))  # b = 1 below a prefix never expanded
    for i in reversed(list(rows)):
        u = nodes[i]
        terms_p = [u.rest_p] + [lp + lb_p[c] for _, lp, _, c in u.kids]
        terms_r = [u.rest_r] + [lr + lb_r[c] for _, _, lr, c in u.kids]
        lb_p[i], lb_r[i] = np.logaddexp.reduce(terms_p), np.logaddexp.reduce(terms_r)
    entries = [[(v, lb_p[c], lb_r[c], rows[c]) for v, _, _, c in nodes[i].kids if nodes[c].expanded]
               + ([(nodes[i].eos[0], -math.inf, -math.inf, -1)] if nodes[i].eos is not None else [])
               for i in rows]
    K = max(1, max(len(e) for e in entries))
    tok = np.full((len(rows), K), V)
    lbp, lbr = np.zeros((len(rows), K)), np.zeros((len(rows), K))
    child = np.full((len(rows), K), -1)
    for j, e in enumerate(entries):
        for k, (v, a, b, c) in enumerate(e):
            tok[j, k], lbp[j, k], lbr[j, k], child[j, k] = v, a, b, c

    def t(x, dtype):
        return torch.as_tensor(x, dtype=dtype, device=device)

    return Head(**sums, log_remainder=float(lb_p[0]), forwards=expanded, vocab_size=V, tok=t(tok, torch.long),
                lb_p=t(lbp, torch.float64), lb_r=t(lbr, torch.float64),
                child=t(child, torch.long))


def _cv_terms(y: np.ndarray, c: np.ndarray, c_mean: float, folds: int = 2) -> np.ndarray:
    """y − β·(c − E[c]) with β = Cov(y, c)/Var(c) fitted on the other fold (cross-fitted: unbiased for any β)."""
    out = y.astype(np.float64).copy()
    fold = np.arange(y.size) % folds
    for k in range(folds):  # a loop over folds (2), not samples
        train, test = fold != k, fold == k
        if train.sum() < 2 or not test.any():
            continue
        var = np.var(c[train])
        beta = np.cov(y[train], c[train])[0, 1] / var if var > 0 else 0.0
        out[test] = y[test] - beta * (c[test] - c_mean)
    return out


def head_estimates(head: Head, batch, proposal_is_p: bool) -> dict[str, dict]:
    """MC, RB and RB+CV (IS, RB-IS, RB-IS+CV for a proposal ≠ P) of the head plus the remainder drawn with
    engine.sample_batch(..., exclude=head) (a Batch, or its arrays as store.records_to_arrays gives them): entries
    as estimators.sequence_estimates gives them, whose diagnostics are those of the remainder's sample under the
    conditioned P′ and r′ (what it has seen is all the SE knows), with the head's record (``head_mass``,
    ``head_remainder_mass``, ``head_forwards``, ``head_sequences``).
    The SE adds in quadrature the rounding of the exact sums (ROUNDING × Σ_H P·(|f| + g_RB)): at τ = 0.05 the
    remainder's own SE can fall far below what float64 resolves."""
    from kl_estimation.core.estimators import sequence_estimates

    a = batch if isinstance(batch, dict) else vars(batch)
    mask = np.asarray(a["mask"], dtype=bool)
    diag = sequence_estimates(a["log_p_cond"], a["log_q"], a["log_r"], a["kl_step"], mask, proposal_is_p)
    W = np.exp(np.where(mask, a["log_p"] - a["log_r"], 0.0).sum(-1)) * (not head.exhausted)
    f = np.where(mask, a["log_p"] - a["log_q"], 0.0).sum(-1)
    g = np.where(mask, a["kl_step"], 0.0).sum(-1)
    mc, rb, cv = HEAD_ESTIMATORS[proposal_is_p]
    terms = {mc: (head.mc, W * f), rb: (head.rb, W * g),
             cv: (head.rb, _cv_terms(W * g, W * (f - g), -(head.mc - head.rb)))}
    out = {}
    for name, (exact, x) in terms.items():
        n = x.size
        var = float(np.var(x, ddof=1)) if n > 1 else math.nan
        est, se = exact + float(np.mean(x)), math.hypot(math.sqrt(var / n), ROUNDING * head.scale)
        exact = {"se_informative": True, "n_distinct": head.sequences, "modal_share": head.top} \
            if head.exhausted else {}  # the sums are the KL: the draws, weighted 0, are not what it rests on
        informative = exact.get("se_informative", diag[name]["se_informative"])
        half = Z95 if informative else math.nan
        out[name] = dict(diag[name], estimate=est, std_error=se, variance=var, ci_low=est - half * se,
                         ci_high=est + half * se, **exact, **head.record())
    return out


def heads_for(view, proposal, max_new_tokens: int, n_samples: int, n_prompts: int, budget: int | None,
              eps: float = 0.0) -> dict[int, Head]:
    """{prompt: Head} for a run's remainder draws. `budget` N > 0: every prompt, N forwards each; 0: none; None
    (auto; plain Monte Carlo only — a proposal's draws are not P's): the prompts where P's draws would be nearly
    all one sequence, with AUTO_BUDGET forwards each. A pilot head of AUTO_PILOT forwards bounds the probability m
    of the most probable sequence from above (Head.modal_bound: on a prompt whose first steps are near-certain, the
    product of their top-token probabilities); a prompt is cold where m ≥ AUTO_MIN_SHARE and `n_samples` draws
    could leave fewer than MIN_OTHER_DRAWS off that sequence (the case verdicts flag SE_NOT_INFORMATIVE). The mass
    condition is what keeps a small n from buying a head on every prompt: below 2·MIN_OTHER_DRAWS draws every
    sample is flagged, but only where one sequence holds much of the mass does the head replace sampling."""
    from kl_estimation.core.diagnostics import MIN_OTHER_DRAWS
    from kl_estimation.llm.engine import sequence_proposal

    if budget == 0 or budget is None and not proposal.is_p:
        return {}
    if budget is not None:
        return {i: search_head(view, proposal, max_new_tokens, budget, eps, i) for i in range(n_prompts)}
    pilot = sequence_proposal("P")
    bounds = [search_head(view, pilot, max_new_tokens, AUTO_PILOT, 0.0, i).modal_bound for i in range(n_prompts)]
    cold = [i for i, m in enumerate(bounds) if m >= AUTO_MIN_SHARE and n_samples * (1 - m) < MIN_OTHER_DRAWS]
    return {i: search_head(view, proposal, max_new_tokens, AUTO_BUDGET, eps, i) for i in cold}
