r"""The KL term of each RL library's options, written as the library writes it, against the exact gradient.

On an enumerable policy, an order-1 Markov chain over V tokens whose logits table θ (one row per previous token,
row 0 at BOS) is the parameter, every sequence of length ≤ T can be listed. So each option's *expected* gradient
Σ_x μ(x)·∇surrogate(x) (μ the policy that drew the sequences, no gradient through μ) and the gradients it might be
meant to have are exact, and the relative bias ‖E[g] − ∇KL‖ / ‖∇KL‖ needs no z-score. The targets:

- reverse: ∇KL(P_θ‖Q), the penalty every library means;  forward: ∇KL(Q‖P_θ);
- frozen reverse / frozen forward: Σ_t E_{x~P_θ}[∇KL(P_θ,t‖Q_t)] (or ∇KL(Q_t‖P_θ,t)), the per-step KL with no
  gradient through the distribution of the prefix — what a per-token loss differentiates;
- zero.

Each option's surrogate is the library's KL term for one sequence: a loss term summed over its tokens (the
libraries' token means only rescale it), or, for KL in the reward, the policy-gradient surrogate Σ_t r_t·G_t with
G_t = Σ_{s≥t} of the per-token KL rewards from the rollout (γ = 1, no critic) and r_t the per-token ratio
P_θ/P_old (TRL's RLOO: the sequence ratio). PPO's clip of that ratio is left out (all ratios inside it).
Off-policy, P_old = P_θ with N(0, drift²) noise on every logit draws the sequences. docs/audit.md has the table
with the sources (repository, path, line) of every formula.

    python -m kl_estimation.audit                      # the table (V = 4, T = 3, with and without EOS)
    python -m kl_estimation.audit --json audit.json    # and the rows, config and versions as JSON
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from kl_estimation import training as tr

TARGETS = ("reverse", "forward", "frozen reverse", "frozen forward", "zero")
MATCH_RTOL = 1e-9


# ------------------------------------------------------------------ the chain

@dataclass(frozen=True)
class Chain:
    """P (θ, trained), Q (reference) and P_old (drew the sequences off-policy) as (V, V) logits tables, float64."""

    theta_p: object
    theta_q: object
    theta_old: object
    horizon: int
    eos: bool  # token 0 ends a sequence (masked after it); without EOS every sequence has `horizon` tokens


def make_chain(*, vocab: int = 4, horizon: int = 3, eos: bool = True, seed: int = 3, drift: float = 0.4) -> Chain:
    import torch

    g = torch.Generator().manual_seed(seed)
    theta_p = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
    theta_q = torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
    theta_old = theta_p + drift * torch.randn(vocab, vocab, generator=g, dtype=torch.float64)
    return Chain(theta_p, theta_q, theta_old, horizon, eos)


def sequences(vocab: int, horizon: int, eos: bool):
    """Every distinct sequence once, (N, T); with EOS the tokens after the first 0 are 0."""
    import torch

    seqs = [s for s in itertools.product(range(vocab), repeat=horizon)
            if not eos or all(s[t] == 0 for t in range(horizon) if 0 in s[:t])]
    return torch.tensor(seqs, dtype=torch.long)


def states_and_mask(tokens, eos: bool):
    """State before each step (0 at BOS, then the previous token) and the mask (False after EOS)."""
    import torch

    prev = torch.cat([torch.zeros_like(tokens[..., :1]), tokens[..., :-1]], -1)
    if not eos:
        return prev, torch.ones_like(tokens, dtype=torch.bool)
    ended = torch.cumsum((prev == 0).long(), -1) > 1  # an EOS before this step (the first 0 is BOS)
    return torch.where(ended, torch.zeros_like(prev), prev), ~ended


def logits_of(theta, states):
    """(…, T, V) logits: θ (S, V) is one table; θ (M, S, V) is one copy per batch with states (M, B, T)."""
    import torch

    if theta.ndim == 2:
        return theta[states]
    return theta[torch.arange(theta.shape[0])[:, None, None], states]


def seq_logprob(theta, tokens, eos: bool):
    import torch

    st, m = states_and_mask(tokens, eos)
    lp = torch.log_softmax(logits_of(theta, st), -1).gather(-1, tokens[..., None])[..., 0]
    return torch.where(m, lp, torch.zeros_like(lp)).sum(-1)


def exact_targets(ch: Chain) -> dict:
    """∇_θ of each candidate objective at θ_P, flattened, by autograd through the enumerated sums."""
    import torch

    tok = sequences(ch.theta_p.shape[-1], ch.horizon, ch.eos)
    st, m = states_and_mask(tok, ch.eos)

    def grad(fn):
        th = ch.theta_p.clone().requires_grad_()
        return torch.autograd.grad(fn(th), th)[0].reshape(-1)

    def sequence_kl(forward):
        def fn(th):
            lp, lq = seq_logprob(th, tok, ch.eos), seq_logprob(ch.theta_q, tok, ch.eos)
            return (lq.exp() * (lq - lp)).sum() if forward else (lp.exp() * (lp - lq)).sum()
        return fn

    def frozen(forward):
        def fn(th):
            w = seq_logprob(ch.theta_p, tok, ch.eos).exp()
            a, b = torch.log_softmax(logits_of(th, st), -1), torch.log_softmax(logits_of(ch.theta_q, st), -1)
            if forward:
                a, b = b, a
            step = (a.exp() * (a - b)).sum(-1)
            return (w * torch.where(m, step, torch.zeros_like(step)).sum(-1)).sum()
        return fn

    out = {"reverse": grad(sequence_kl(False)), "forward": grad(sequence_kl(True)),
           "frozen reverse": grad(frozen(False)), "frozen forward": grad(frozen(True))}
    out["zero"] = torch.zeros_like(out["reverse"])
    return out


class Terms(NamedTuple):
    """Per-step inputs of one batch of sequences, (…, T): at θ with gradient, and the rollout's (detached)."""

    logp: object
    logq: object
    kl: object  # exact KL(P_θ,t‖Q_t), with gradient
    mask: object
    logp_old: object  # the policy that drew the sequences (= logp.detach() on-policy)
    logq_old: object
    kl_old: object
    on_policy: bool


def terms(ch: Chain, theta, tokens, on_policy: bool) -> Terms:
    st, m = states_and_mask(tokens, ch.eos)
    zq = logits_of(ch.theta_q, st)
    logp, logq, kl = tr.token_logprobs_and_kl(logits_of(theta, st), zq, tokens, m)
    if on_policy:
        return Terms(logp, logq, kl, m, logp.detach(), logq, kl.detach(), True)
    lpo, lqo, klo = tr.token_logprobs_and_kl(logits_of(ch.theta_old, st), zq, tokens, m)
    return Terms(logp, logq, kl, m, lpo, lqo, klo, False)


# ------------------------------------------------------------------ the libraries' KL terms, as each writes them

def _sum(x, m):
    import torch

    return torch.where(m, x, torch.zeros_like(x)).sum(-1)


def reward_surrogate(b: Terms, rewards):
    """KL as per-token rewards from the rollout: Σ_t r_t·G_t, G_t = Σ_{s≥t} rewards_s, r_t = P_θ/P_old per token
    (1 in value on-policy, where its gradient is the score)."""
    import torch

    zero = torch.zeros((), dtype=b.logp.dtype)
    ratio = torch.where(b.mask, torch.exp(b.logp - b.logp_old), zero)
    return (ratio * tr._future(torch.where(b.mask, rewards, zero), inclusive=True)).sum(-1)


def trl_k3(lp, lq):
    # trl/trainer/grpo_trainer.py (1.16.0) 3100-3102
    return (lq - lp).exp() - (lq - lp) - 1


def verl_forward(lp, lq, kind: str):
    # verl 0.9.1 verl/trainer/ppo/core_algos.py kl_penalty_forward
    if kind in ("kl", "k1"):
        return lp - lq
    if kind == "abs":
        return (lp - lq).abs()
    if kind in ("mse", "k2"):
        return 0.5 * (lp - lq).square()
    if kind in ("low_var_kl", "k3"):
        kl = (lq - lp).clamp(min=-20, max=20)
        return (kl.exp() - kl - 1).clamp(min=-10, max=10)
    raise NotImplementedError(kind)  # "full": verl raises NotImplementedError too


def verl_kl(lp, lq, kind: str):
    # verl 0.9.1 verl/trainer/ppo/core_algos.py kl_penalty: "x+" keeps x's value, takes k2's gradient
    value = verl_forward(lp, lq, kind.rstrip("+"))
    if not kind.endswith("+"):
        return value
    k2 = 0.5 * (lp - lq).square()
    return k2 - k2.detach() + value.detach()


def openrlhf_kl(lp, lq, estimator: str, lp_old=None, unbiased_gradient: bool = False):
    # openrlhf/models/utils.py (0.11.2) compute_approx_kl
    f = lp - lq
    if estimator == "k1":
        value = f
    elif estimator == "k2":
        value = f ** 2 / 2.0
    else:
        g = f.clamp(min=-10)
        value = (-g).exp() - 1 + g
    value = value.clamp(min=-10, max=10)
    if not unbiased_gradient:
        return value
    w = 1.0 if lp_old is None else (lp - lp_old).exp().clamp(max=10.0).detach()
    surrogate = w * (f ** 2 / 2.0)
    return value.detach() + surrogate - surrogate.detach()


def nemo_kl(lp, lq, weights, kind: str = "k3", input_clamp: float = 20.0, output_clamp: float = 10.0):
    # NeMo-RL (7ea279a) nemo_rl/algorithms/utils.py calculate_kl
    import torch

    logr = lq - lp
    clamped = logr.clamp(min=-input_clamp, max=input_clamp)
    weights = torch.where(logr == clamped, weights, weights.detach())
    kl = {"k1": -clamped, "k2": clamped.square() / 2, "k3": clamped.exp() - 1 - clamped}[kind]
    return (weights * kl).clamp(min=-output_clamp, max=output_clamp)


def nemo_weights(b: Terms, on_policy_kl_approximation: bool):
    # nemo_rl/algorithms/loss/loss_functions.py 482-493
    import torch

    w = torch.exp(b.logp - (b.logp_old if on_policy_kl_approximation else b.logp.detach()))
    return torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)


def slime_kl(lp, lq, kind: str, importance_ratio=None):
    # slime (624b824) slime/utils/ppo_utils.py compute_approx_kl
    f = lp - lq
    kl = f if kind == "k1" else f ** 2 / 2.0 if kind == "k2" else (-f).exp() - 1 + f
    if importance_ratio is not None:
        kl = importance_ratio * kl
    return kl.clamp(min=-10, max=10) if kind == "low_var_kl" else kl


@dataclass(frozen=True)
class Option:
    library: str
    option: str  # as a user sets it
    where: str  # "loss" or "reward"
    surrogate: Callable[[Terms], object]  # one term per sequence
    ours: str  # the same value (and, where one exists, gradient) in kl_estimation.training
    on_policy: str | None  # the target its expected gradient equals on-policy (None: none of them)
    off_policy: str | None = None


def _loss(fn):
    return lambda b: _sum(fn(b), b.mask)


OPTIONS = (
    Option("TRL", "GRPO beta>0 (1.16 default)", "loss",
           _loss(lambda b: trl_k3(b.logp, b.logq) * (b.logp - b.logp_old).exp()),
           "k3 × ratio; gradient of k2", "frozen reverse"),
    Option("TRL", "use_bias_correction_kl=False", "loss", _loss(lambda b: trl_k3(b.logp, b.logq)),
           "k3", "frozen forward"),
    Option("TRL", "RLOO beta>0", "reward",
           lambda b: (_sum(b.logp, b.mask) - _sum(b.logp_old, b.mask)).exp() * _sum(b.logp_old - b.logq_old, b.mask),
           "kl_rewards mc (sequence)", "reverse"),
    *(Option("verl", f"kl_loss_type={k}", "loss", _loss(lambda b, k=k: verl_kl(b.logp, b.logq, k)), ours, claim)
      for k, ours, claim in (("k1", "k1", "zero"), ("k2", "k2", "frozen reverse"), ("abs", "|k1|", None),
                             ("low_var_kl", "k3 (clamped)", "frozen forward"),
                             ("k1+", "k1; gradient of k2", "frozen reverse"),
                             ("abs+", "|k1|; gradient of k2", "frozen reverse"),
                             ("low_var_kl+", "k3; gradient of k2", "frozen reverse"))),
    *(Option("verl", f"use_kl_in_reward kl_penalty={k}", "reward",
             lambda b, k=k: reward_surrogate(b, verl_forward(b.logp_old, b.logq_old, k)), ours, claim)
      for k, ours, claim in (("kl", "kl_rewards mc", "reverse"), ("mse", "k2 rewards", None),
                             ("abs", "|k1| rewards", None), ("low_var_kl", "k3 rewards", None))),
    *(Option("OpenRLHF", f"kl.use_loss estimator={k}", "loss", _loss(lambda b, k=k: openrlhf_kl(b.logp, b.logq, k)),
             ours, claim)
      for k, ours, claim in (("k1", "k1", "zero"), ("k2", "k2", "frozen reverse"),
                             ("k3", "k3 (clamped)", "frozen forward"))),
    Option("OpenRLHF", "kl.use_loss unbiased_gradient", "loss",
           _loss(lambda b: openrlhf_kl(b.logp, b.logq, "k3", b.logp_old, unbiased_gradient=True)),
           "k3; gradient of k2 × clamped ratio", "frozen reverse"),
    *(Option("OpenRLHF", f"kl in reward estimator={k}", "reward",
             lambda b, k=k: reward_surrogate(b, openrlhf_kl(b.logp_old, b.logq_old, k)), ours, claim)
      for k, ours, claim in (("k1", "kl_rewards mc", "reverse"), ("k2", "k2 rewards", None),
                             ("k3", "k3 rewards", None))),
    Option("NeMo-RL", "reference_policy_kl_penalty>0", "loss",
           _loss(lambda b: nemo_kl(b.logp, b.logq, nemo_weights(b, False))), "k3 × ratio (on-policy)",
           "frozen reverse"),
    Option("NeMo-RL", "use_on_policy_kl_approximation", "loss",
           _loss(lambda b: nemo_kl(b.logp, b.logq, nemo_weights(b, True))), "k3 × ratio", "frozen reverse"),
    Option("slime", "--kl-loss-type low_var_kl", "loss", _loss(lambda b: slime_kl(b.logp, b.logq, "low_var_kl")),
           "k3 (clamped)", "frozen forward"),
    Option("slime", "low_var_kl --use-unbiased-kl", "loss",
           _loss(lambda b: slime_kl(b.logp, b.logq, "low_var_kl", (b.logp - b.logp_old).exp())), "k3 × ratio",
           "frozen reverse"),
    Option("ours", 'kl_loss("rb", weights="full")', "loss",
           lambda b: tr.kl_loss(b.logp, b.logq, b.mask, token_kl=b.kl, logp_old=None if b.on_policy else b.logp_old,
                                weights="full", min_ess=0), "", "reverse", "reverse"),
    Option("ours", 'kl_loss("rb") (clip, default)', "loss",
           lambda b: tr.kl_loss(b.logp, b.logq, b.mask, token_kl=b.kl,
                                logp_old=None if b.on_policy else b.logp_old), "", "reverse"),
    Option("ours", 'kl_loss("mc", weights="full")', "loss",
           lambda b: tr.kl_loss(b.logp, b.logq, b.mask, estimator="mc",
                                logp_old=None if b.on_policy else b.logp_old, weights="full", min_ess=0),
           "", "reverse", "reverse"),
    Option("ours", 'kl_rewards("rb")', "reward",
           lambda b: reward_surrogate(b, tr.kl_rewards(b.logp_old, b.logq_old, b.mask, token_kl=b.kl_old).rewards)
           + tr.kl_rewards(b.logp, b.logq, b.mask, token_kl=b.kl).pathwise, "", "reverse"),
)


# ------------------------------------------------------------------ evaluation

def expected_gradient(ch: Chain, option: Option, on_policy: bool):
    """Σ_x μ(x)·∇_θ surrogate(x) over every sequence, μ the sampling policy (P_θ on-policy, P_old off)."""
    import torch

    tok = sequences(ch.theta_p.shape[-1], ch.horizon, ch.eos)
    mu = seq_logprob(ch.theta_p if on_policy else ch.theta_old, tok, ch.eos).exp()
    th = ch.theta_p.clone().requires_grad_()
    return torch.autograd.grad((mu * option.surrogate(terms(ch, th, tok, on_policy))).sum(), th)[0].reshape(-1)


def relative_bias(g, target) -> float:
    return float((g - target).norm() / target.norm())


def matching_target(g, targets: dict) -> str | None:
    import torch

    for name in TARGETS:
        if torch.allclose(g, targets[name], rtol=MATCH_RTOL, atol=1e-12 * float(targets["reverse"].abs().max())):
            return name
    return None


def audit(*, vocab: int = 4, horizon: int = 3, seed: int = 3, drift: float = 0.4, options=OPTIONS) -> list[dict]:
    """One row per option, EOS or not, on- or off-policy: the target its expected gradient equals (if any) and
    its relative bias against the reverse and forward KL's gradients."""
    rows = []
    for eos in (True, False):
        ch = make_chain(vocab=vocab, horizon=horizon, eos=eos, seed=seed, drift=drift)
        targets = exact_targets(ch)
        frozen = {k: relative_bias(targets[f"frozen {k}"], targets[k]) for k in ("reverse", "forward")}
        for on_policy in (True, False):
            for o in options:
                g = expected_gradient(ch, o, on_policy)
                rows.append({"library": o.library, "option": o.option, "where": o.where, "eos": eos,
                             "policy": "on" if on_policy else "off", "matches": matching_target(g, targets),
                             "bias_reverse": relative_bias(g, targets["reverse"]),
                             "bias_forward": relative_bias(g, targets["forward"]),
                             "frozen_reverse_bias": frozen["reverse"], "frozen_forward_bias": frozen["forward"]})
    return rows


def format_rows(rows: list[dict]) -> list[str]:
    """Console lines (≤ 80 columns): a block per chain, one line per option."""
    lines = []
    for eos, policy in ((True, "on"), (True, "off"), (False, "on"), (False, "off")):
        block = [r for r in rows if r["eos"] == eos and r["policy"] == policy]
        if not block:
            continue
        lines += ["", (f"{'with' if eos else 'without'} EOS, {policy}-policy"
                       f" (frozen reverse: bias {block[0]['frozen_reverse_bias']:.3f} against reverse)"),
                  f"{'library':8s} {'option':31s} {'where':6s} {'matches':14s} {'vs rev':>7s} {'vs fwd':>7s}"]
        lines += [f"{r['library']:8s} {r['option'][:31]:31s} {r['where']:6s} {r['matches'] or '—':14s} "
                  f"{r['bias_reverse']:7.3f} {r['bias_forward']:7.3f}" for r in block]
    return lines


def _parser():
    p = argparse.ArgumentParser(prog="python -m kl_estimation.audit", description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=4, help="tokens of the chain, 2–6 (token 0 is EOS)")
    p.add_argument("--horizon", type=int, default=3, help="sequence length T, 1–6")
    p.add_argument("--drift", type=float, default=0.4, help="SD of the noise that makes P_old from P (≥ 0)")
    p.add_argument("--seed", type=int, default=3, help="seed of the tables")
    p.add_argument("--json", metavar="PATH", help="also write the rows, config and versions as JSON")
    return p


def _check_args(a) -> str | None:
    if not 2 <= a.vocab <= 6:
        return f"--vocab: must be an integer from 2 to 6 (got {a.vocab})"
    if not 1 <= a.horizon <= 6:
        return f"--horizon: must be an integer from 1 to 6 (got {a.horizon})"
    if not (math.isfinite(a.drift) and a.drift >= 0):
        return f"--drift: must be a finite number ≥ 0 (got {a.drift})"
    return None


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    err = _check_args(a)
    if err:
        print(f"python -m kl_estimation.audit: error: {err}", file=sys.stderr)
        return 2
    rows = audit(vocab=a.vocab, horizon=a.horizon, seed=a.seed, drift=a.drift)
    print("\n".join(format_rows(rows)[1:]))
    if a.json:
        from kl_estimation.runio import versions

        cfg = {"vocab": a.vocab, "horizon": a.horizon, "seed": a.seed, "drift": a.drift}
        with open(a.json, "w") as fh:
            json.dump({"config": cfg, "versions": versions("torch"), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
