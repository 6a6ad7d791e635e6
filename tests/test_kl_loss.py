"""KL losses for training, against exact gradients.

A tiny autoregressive policy — an order-1 Markov chain over V = 4 tokens (token 0 = EOS) with a directly
parameterised logits table θ (one row per previous token, row 0 at BOS), T = 3 — is small enough that every sequence
can be listed, so KL(P_θ‖Q), KL(Q‖P_θ) and their gradients are exact (autograd through the enumerated sums, float64).
Each estimator's gradient is drawn over many seeded batches at once (one copy of θ per batch, so one backward pass
gives every batch's gradient) and compared coordinate by coordinate: z = (mean − target) / SE. The enumeration also
gives each estimator's *exact* expected gradient (Σ_x μ(x)·∇surrogate(x) over the sampling distribution μ), so each
line of the table in docs/training.md is checked twice: by Monte Carlo within 4 SE, and exactly.

`python tests/test_kl_loss.py` prints the z-scores of every line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import pytest
import torch

from kl_estimation import audit
from kl_estimation import training as tr

pytestmark = pytest.mark.usefixtures("one_thread")


V, T_SEQ, S = 4, 3, 4  # tokens (0 = EOS), horizon, states (0 = BOS, else the previous token)
M, B = 4000, 8  # batches × sequences per batch
Z_OK, Z_FAIL = 4.0, 8.0


def tables():
    """The chain of kl_estimation.audit with EOS (seed 3, P_old = P + N(0, 0.4²) on every logit)."""
    ch = audit.make_chain(vocab=V, horizon=T_SEQ, eos=True, seed=3, drift=0.4)
    return ch.theta_p, ch.theta_q, ch.theta_old


# ------------------------------------------------------------------ the chain: logits, masks, sampling, enumeration

logits_of = audit.logits_of


def states_and_mask(tokens):
    return audit.states_and_mask(tokens, eos=True)


def sample(theta, n_batches, T, seed):
    """(M, B, T) tokens from the chain θ; padding after EOS is token 0."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(theta, -1)
    tok = torch.zeros(n_batches * B, T, dtype=torch.long)
    state = torch.zeros(n_batches * B, dtype=torch.long)
    alive = torch.ones(n_batches * B, dtype=torch.bool)
    for t in range(T):  # a loop over positions, not samples
        x = torch.multinomial(probs[state], 1, generator=g)[:, 0]
        tok[:, t] = torch.where(alive, x, torch.zeros_like(x))
        alive = alive & (x != 0)
        state = torch.where(alive, x, torch.zeros_like(x))
    return tok.reshape(n_batches, B, T)


@cache
def all_sequences(T):
    return audit.sequences(V, T, eos=True)


def seq_logprob(theta, tokens):
    return audit.seq_logprob(theta, tokens, eos=True)


def exact_targets(theta_p, theta_q, T):
    """∇_θ of the candidate objectives, by enumeration: the audit's, and the reference's own gradient."""
    out = audit.exact_targets(audit.Chain(theta_p, theta_q, None, T, eos=True))
    out["reverse − forward"] = out["reverse"] - out["forward"]
    tok = all_sequences(T)
    th = theta_q.clone().requires_grad_()
    lp, lq = seq_logprob(theta_p, tok), seq_logprob(th, tok)
    out["reference: reverse"] = torch.autograd.grad((lp.exp() * (lp - lq)).sum(), th)[0].reshape(-1)
    return out


# ------------------------------------------------------------------ the estimators under test, one surrogate each

@dataclass
class Batch:
    logp: torch.Tensor  # current θ, with gradient
    logq: torch.Tensor
    kl: torch.Tensor  # exact KL(P_θ,t‖Q_t), with gradient
    mask: torch.Tensor
    logp_old: torch.Tensor  # the sampling policy's, detached (= logp.detach() on-policy)
    logq_old: torch.Tensor
    kl_old: torch.Tensor  # the sampling policy's exact per-step KL (what a rollout stores)
    on_policy: bool


def reward_surrogate(r):
    """REINFORCE / PPO without clipping on the rollout's per-token rewards r(b) (audit.reward_surrogate)."""
    return lambda b: audit.reward_surrogate(b, r(b))


def rewards_api(estimator):
    def fn(b: Batch):
        out = tr.kl_rewards(b.logp_old, b.logq_old, b.mask, token_kl=b.kl_old, estimator=estimator)
        now = tr.kl_rewards(b.logp, b.logq, b.mask, token_kl=b.kl, estimator=estimator)  # pathwise at θ
        return reward_surrogate(lambda _: out.rewards)(b) + now.pathwise
    return fn


def per_token_loss(k):
    return lambda b: k(b.logp, b.logq, b.mask).sum(-1)


def kl_loss_api(estimator, baseline=None, weights="full", ratio_clip=tr.RATIO_CLIP):
    return lambda b: tr.kl_loss(b.logp, b.logq, b.mask, token_kl=b.kl, estimator=estimator,
                                logp_old=None if b.on_policy else b.logp_old, baseline=baseline, weights=weights,
                                ratio_clip=ratio_clip, min_ess=0)


def rewards_full_api(b: Batch):
    out = tr.kl_rewards(b.logp_old, b.logq_old, b.mask, token_kl=b.kl_old)
    now = tr.kl_rewards(b.logp, b.logq, b.mask, token_kl=b.kl, logp_old=None if b.on_policy else b.logp_old,
                        weights="full", min_ess=0)
    return reward_surrogate(lambda _: out.rewards)(b) + now.pathwise


def f_old(b):
    return b.logp_old - b.logq_old


SURROGATES = {
    "k1 reward": reward_surrogate(f_old),
    "k2 reward": reward_surrogate(lambda b: 0.5 * f_old(b) ** 2),
    "k3 reward": reward_surrogate(lambda b: torch.expm1(-f_old(b)) + f_old(b)),
    "RB reward (K_t only)": reward_surrogate(lambda b: b.kl_old),
    "kl_rewards mc": rewards_api("mc"),
    "kl_rewards rb": rewards_api("rb"),
    "k1 loss": per_token_loss(tr.k1),
    "k2 loss": per_token_loss(tr.k2),
    "k3 loss": per_token_loss(tr.k3),
    "RB loss (sequence_kl rb)": lambda b: tr.sequence_kl(b.logp, b.logq, token_kl=b.kl, mask=b.mask, estimator="rb"),
    "kl_loss mc": kl_loss_api("mc"),
    "kl_loss rb": kl_loss_api("rb"),
    "kl_loss mc loo": kl_loss_api("mc", "loo"),
    "kl_loss rb loo": kl_loss_api("rb", "loo"),
    "kl_loss mc clip": kl_loss_api("mc", weights="clip"),
    "kl_loss rb clip": kl_loss_api("rb", weights="clip"),
    "kl_loss rb clip loo": kl_loss_api("rb", "loo", weights="clip"),
    "kl_loss rb token": kl_loss_api("rb", weights="clip", ratio_clip=math.inf),
    "kl_rewards rb full": rewards_full_api,
}
BATCH_COUPLED = {"kl_loss mc loo", "kl_loss rb loo", "kl_loss rb clip loo"}  # no per-sequence exact expectation

# (surrogate, T, on-policy?, what its expected gradient equals: a key of exact_targets, or "neither")
TABLE = [
    ("k1 reward", T_SEQ, True, "reverse"),
    ("k2 reward", T_SEQ, True, "neither"),
    ("k3 reward", T_SEQ, True, "neither"),
    ("k3 reward", 1, True, "reverse − forward"),
    ("RB reward (K_t only)", T_SEQ, True, "neither"),
    ("kl_rewards mc", T_SEQ, True, "reverse"),
    ("kl_rewards rb", T_SEQ, True, "reverse"),
    ("k1 loss", T_SEQ, True, "zero"),
    ("k2 loss", T_SEQ, True, "frozen reverse"),
    ("k2 loss", 1, True, "reverse"),
    ("k3 loss", T_SEQ, True, "frozen forward"),
    ("k3 loss", 1, True, "forward"),
    ("RB loss (sequence_kl rb)", T_SEQ, True, "frozen reverse"),
    ("RB loss (sequence_kl rb)", 1, True, "reverse"),
    ("kl_loss mc", T_SEQ, True, "reverse"),
    ("kl_loss rb", T_SEQ, True, "reverse"),
    ("kl_loss mc loo", T_SEQ, True, "reverse"),
    ("kl_loss rb loo", T_SEQ, True, "reverse"),
    # off-policy: drawn from P_old; rewards from the rollout, losses recomputed at θ as the libraries do
    ("k1 reward", T_SEQ, False, "neither"),
    ("k2 reward", T_SEQ, False, "neither"),
    ("k3 reward", T_SEQ, False, "neither"),
    ("RB reward (K_t only)", T_SEQ, False, "neither"),
    ("kl_rewards rb", T_SEQ, False, "neither"),
    ("k1 loss", T_SEQ, False, "neither"),
    ("k2 loss", T_SEQ, False, "neither"),
    ("k3 loss", T_SEQ, False, "neither"),
    ("RB loss (sequence_kl rb)", T_SEQ, False, "neither"),
    ("kl_loss mc", T_SEQ, False, "reverse"),
    ("kl_loss rb", T_SEQ, False, "reverse"),
    ("kl_loss mc loo", T_SEQ, False, "reverse"),
    ("kl_loss rb loo", T_SEQ, False, "reverse"),
    # the bounded off-policy default (per-token ratio, clipped, prefix weights truncated): biased, measured
    ("kl_loss mc clip", T_SEQ, False, "neither"),
    ("kl_loss rb clip", T_SEQ, False, "neither"),
    ("kl_loss rb clip loo", T_SEQ, False, "neither"),
    ("kl_loss rb token", T_SEQ, False, "neither"),
    ("kl_rewards rb full", T_SEQ, False, "neither"),
    ("kl_loss rb clip", T_SEQ, True, "reverse"),  # on-policy every ratio is 1: the same as without logp_old
]


def case_id(case):
    name, T, on, _ = case
    return f"{name} T={T} {'on' if on else 'off'}-policy".replace(" ", "_")


# ------------------------------------------------------------------ evaluation: Monte Carlo and exact

def make_batch(theta, tokens, on_policy):
    theta_q = tables()[1]
    st, m = states_and_mask(tokens)
    zq = logits_of(theta_q, st)
    zp = logits_of(theta, st)
    logp, logq, kl = tr.token_logprobs_and_kl(zp, zq, tokens, m)
    if on_policy:
        lpo, lqo, klo = logp.detach(), logq, kl.detach()
    else:
        lpo, lqo, klo = _rollout_terms(tokens)
    return Batch(logp, logq, kl, m, lpo, lqo, klo, on_policy)


_ROLLOUTS = {}


def _rollout_terms(tokens):
    """The old policy's per-step terms, as a rollout would store them (cached: the same draws serve every line)."""
    key = (tokens.data_ptr(), tuple(tokens.shape))
    if key not in _ROLLOUTS:
        st, m = states_and_mask(tokens)
        _, theta_q, theta_old = tables()
        _ROLLOUTS[key] = (tokens, tr.token_logprobs_and_kl(logits_of(theta_old, st), logits_of(theta_q, st), tokens, m))
    return _ROLLOUTS[key][1]


@cache
def draws(T, on_policy):
    theta_p, _, theta_old = tables()
    return sample(theta_p if on_policy else theta_old, M, T, seed=100 + 10 * T + on_policy)


def mc_gradients(name, T, on_policy):
    """(M, S·V) per-batch mean gradients of the surrogate wrt θ_P."""
    theta_p = tables()[0]
    theta = theta_p.expand(M, S, V).clone().requires_grad_()
    loss = SURROGATES[name](make_batch(theta, draws(T, on_policy), on_policy))
    (g,) = torch.autograd.grad(loss.mean(-1).sum(), theta)
    return g.reshape(M, -1)


def exact_expected_gradient(name, T, on_policy):
    """Σ_x μ(x)·∇surrogate(x) over every sequence, μ the sampling policy (no gradient through μ)."""
    theta_p, _, theta_old = tables()
    tok = all_sequences(T)
    mu = seq_logprob(theta_p if on_policy else theta_old, tok).exp()
    th = theta_p.clone().requires_grad_()
    b = make_batch(th, tok, on_policy)
    return torch.autograd.grad((mu * SURROGATES[name](b)).sum(), th)[0].reshape(-1)


def zscores(g, target):
    mean, se = g.mean(0), g.std(0) / math.sqrt(g.shape[0])
    diff = mean - target
    return torch.where(se > 0, diff / torch.where(se > 0, se, 1), torch.where(diff.abs() < 1e-12, 0.0, math.inf))


@cache
def evaluate(name, T, on_policy):
    g = mc_gradients(name, T, on_policy)
    targets = exact_targets(*tables()[:2], T)
    z = {k: zscores(g, v).abs().max().item() for k, v in targets.items()}
    exact = None if name in BATCH_COUPLED else exact_expected_gradient(name, T, on_policy)
    z_exact = None if exact is None else zscores(g, exact).abs().max().item()
    return {"z": z, "z_exact": z_exact, "exact": exact, "targets": targets, "var": g.var(0).mean().item() * B}


# ------------------------------------------------------------------ the table, one test per line

@pytest.mark.parametrize("case", TABLE, ids=[case_id(c) for c in TABLE])
def test_gradient_table(case):
    name, T, on_policy, claim = case
    r = evaluate(name, T, on_policy)
    if r["exact"] is not None:  # the Monte Carlo agrees with the estimator's exact expectation: sampling is right
        assert r["z_exact"] < Z_OK, (r["z_exact"], r)
    if claim == "neither":
        for k in ("reverse", "forward", "zero", "frozen reverse", "frozen forward"):
            assert r["z"][k] > Z_FAIL, (k, r["z"])
            if r["exact"] is not None:
                assert not torch.allclose(r["exact"], r["targets"][k], rtol=0.05, atol=1e-3), k
        return
    assert r["z"][claim] < Z_OK, (claim, r["z"])
    if r["exact"] is not None:
        torch.testing.assert_close(r["exact"], r["targets"][claim], rtol=1e-9, atol=1e-12)
    if claim != "zero":  # the check has the power to see a wrong gradient of this size
        assert r["z"]["zero"] > Z_FAIL, r["z"]
    if claim == "reverse" and T > 1:
        assert r["z"]["frozen reverse"] > Z_FAIL and r["z"]["forward"] > Z_FAIL, r["z"]


def test_biased_forms_fail_the_reverse_kl_check():
    """The issue's three claims, as the same z-check that the unbiased losses pass."""
    assert evaluate("k3 loss", T_SEQ, True)["z"]["reverse"] > Z_FAIL  # k3 as a loss is not the reverse KL's
    assert evaluate("k3 loss", 1, True)["z"]["forward"] < Z_OK  # … but the forward KL's, for one token
    assert evaluate("k1 loss", T_SEQ, True)["z"]["reverse"] > Z_FAIL  # k1 as a loss: zero in expectation
    assert evaluate("RB loss (sequence_kl rb)", T_SEQ, True)["z"]["reverse"] > Z_FAIL  # Σ∇KL_t only


# ------------------------------------------------------------------ values, the reference's gradient, the API's pieces

def test_kl_loss_values_are_the_estimators_and_unbiased():
    theta_p, theta_q, theta_old = tables()
    tok = all_sequences(T_SEQ)
    lp, lq = seq_logprob(theta_p, tok), seq_logprob(theta_q, tok)
    kl = float((lp.exp() * (lp - lq)).sum())
    for on_policy in (True, False):
        b = make_batch(theta_p.clone().requires_grad_(), tok, on_policy)
        mu = seq_logprob(theta_p if on_policy else theta_old, tok).exp()
        logr = None if on_policy else b.logp_old
        for est in ("mc", "rb"):
            v = kl_loss_api(est)(b)
            torch.testing.assert_close(kl_loss_api(est, "loo")(b), v, rtol=0, atol=1e-12)  # value untouched
            assert float((mu * v).sum().detach()) == pytest.approx(kl, rel=1e-10), (est, on_policy)  # unbiased, exactly
        rb = tr.sequence_kl(b.logp, b.logq, token_kl=b.kl, logr=logr, mask=b.mask, estimator="rb")
        torch.testing.assert_close(kl_loss_api("rb")(b), rb, rtol=1e-12, atol=1e-12)
    b = make_batch(theta_p, tok, True)
    torch.testing.assert_close(kl_loss_api("mc")(b), (b.logp - b.logq).sum(-1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("on_policy", [True, False], ids=["on-policy", "off-policy"])
@pytest.mark.parametrize("estimator", ["mc", "rb"])
def test_kl_loss_gradient_wrt_the_reference(estimator, on_policy):
    """A trained Q (distillation of Q towards P) gets ∇_Q KL(P‖Q) too: a pathwise gradient, no score."""
    theta_p, theta_q, _ = tables()
    tok = draws(T_SEQ, on_policy)
    st, m = states_and_mask(tok)
    tq = theta_q.expand(M, S, V).clone().requires_grad_()
    zp, zq = logits_of(theta_p.expand(M, S, V).clone().requires_grad_(), st), logits_of(tq, st)
    logp, logq, kl = tr.token_logprobs_and_kl(zp, zq, tok, m)
    old = None if on_policy else tr.token_logprobs_and_kl(logits_of(tables()[2], st), zq.detach(), tok, m)[0]
    loss = tr.kl_loss(logp, logq, m, token_kl=kl, estimator=estimator, logp_old=old, weights="full", min_ess=0)
    (g,) = torch.autograd.grad(loss.mean(-1).sum(), tq)
    target = exact_targets(theta_p, theta_q, T_SEQ)["reference: reverse"]
    assert zscores(g.reshape(M, -1), target).abs().max() < Z_OK


def test_kl_rewards_rb_is_kl_loss_rb_on_policy():
    """Shifted exact KLs as rewards plus the pathwise term: the same gradient as kl_loss, sample by sample."""
    theta_p = tables()[0]
    tok = draws(T_SEQ, True)[:50]
    grads = []
    for fn in (SURROGATES["kl_rewards rb"], kl_loss_api("rb")):
        th = theta_p.expand(50, S, V).clone().requires_grad_()
        grads.append(torch.autograd.grad(fn(make_batch(th, tok, True)).sum(), th)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    b = make_batch(theta_p.clone().requires_grad_(), tok, True)
    r = tr.kl_rewards(b.logp, b.logq, b.mask, token_kl=b.kl)
    torch.testing.assert_close(r.rewards.sum(-1) + b.kl[..., 0], kl_loss_api("rb")(b))  # + K_1 = the RB value
    assert not r.rewards.requires_grad and r.pathwise.requires_grad
    torch.testing.assert_close(r.pathwise, b.kl.sum(-1))
    mc = tr.kl_rewards(b.logp, b.logq, b.mask, estimator="mc")
    torch.testing.assert_close(mc.rewards, (b.logp - b.logq).detach())


def test_loo_baseline_and_weights_stay_finite_with_extreme_log_weights():
    g = torch.Generator().manual_seed(5)
    lp = (torch.randn(6, 40, generator=g, dtype=torch.float64) - 1).requires_grad_()
    lq, kl = torch.randn(6, 40, generator=g, dtype=torch.float64) - 1, torch.rand(6, 40, generator=g).double()
    old = lp.detach() + 30 * torch.randn(6, 40, generator=g, dtype=torch.float64)  # weights e^{±hundreds}
    for est in ("mc", "rb"):
        loss = tr.kl_loss(lp, lq, token_kl=kl, estimator=est, logp_old=old, baseline="loo")
        (grad,) = torch.autograd.grad(loss.sum(), lp)
        assert torch.isfinite(grad).all() or est == "mc"  # mc: W_≤t itself may overflow; never NaN from the ratio
        assert not torch.isnan(grad).any()
    # the log-space future sums equal the direct ones where those are representable
    lw, v = torch.randn(3, 7, generator=g).double(), torch.randn(3, 7, generator=g).double()
    ref = torch.randn(3, 7).double()
    for inclusive in (True, False):
        direct = tr._future(torch.exp(lw) * v, inclusive) / torch.exp(ref)
        torch.testing.assert_close(tr._future_relative(lw, v, ref, inclusive), direct)


def test_loo_baseline_respects_padding():
    lp = torch.randn(3, 4, requires_grad=True)
    kl = torch.rand(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    base = tr.kl_loss(lp, torch.zeros(3, 4), mask, token_kl=kl, baseline="loo")
    (g,) = torch.autograd.grad(base.sum(), lp)
    assert torch.all(g[~mask] == 0)
    torch.testing.assert_close(base, tr.kl_loss(lp, torch.zeros(3, 4), mask, token_kl=kl))


def test_token_logprobs_and_kl_matches_autograd_reference():
    g = torch.Generator().manual_seed(0)
    zp = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    zq = (torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_()
    tok = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.2
    tok = torch.where(mask, tok, torch.full_like(tok, -100))  # padding may hold the ignore index
    w = torch.randn(3, 3, 5, generator=g, dtype=torch.float64)

    def ours(a, b, chunk):
        out = tr.token_logprobs_and_kl(a, b, tok, mask, temperature=1.3, chunk_size=chunk)
        return sum((o * wi).sum() for o, wi in zip(out, w))

    def reference(a, b):
        la, lb = torch.log_softmax(a / 1.3, -1), torch.log_softmax(b / 1.3, -1)
        t = torch.where(mask, tok, 0)[..., None]
        out = (la.gather(-1, t)[..., 0] * mask, lb.gather(-1, t)[..., 0] * mask,
               tr.exact_token_kl(a, b, mask, temperature=1.3))
        return sum((o * wi).sum() for o, wi in zip(out, w))

    ref = torch.autograd.grad(reference(zp, zq), (zp, zq))
    for chunk in (1, 4, None):
        got = torch.autograd.grad(ours(zp, zq, chunk), (zp, zq))
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: ours(a, b, 4), (zp, zq))
    # low-precision logits: float32 outputs, gradients in the logits' dtype; a frozen reference gets none
    bp, bq = zp.detach().bfloat16().requires_grad_(), zq.detach().bfloat16()
    lp, lq, kl = tr.token_logprobs_and_kl(bp, bq, tok, mask)
    assert lp.dtype == lq.dtype == kl.dtype == torch.float32
    kl.sum().backward()
    assert bp.grad.dtype == torch.bfloat16
    torch.testing.assert_close(kl.double(), tr.exact_token_kl(bp.detach().double(), bq.double(), mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.*:DeprecationWarning")  # inside torch.compile
def test_token_logprobs_and_kl_compiled_equals_eager():
    """compile=True (inductor kernels): same values and gradients, −inf logits included (≈ 20 s: compiles)."""
    g = torch.Generator().manual_seed(0)
    zp, zq = torch.randn(3, 5, 11, generator=g) * 2, torch.randn(3, 5, 11, generator=g) * 2
    zp[0, 0, 3] = zq[0, 0, 3] = -math.inf  # a token neither model can produce
    tok = torch.randint(0, 11, (3, 5), generator=g)
    tok[0, 0] = 1
    mask = torch.rand(3, 5, generator=g) > 0.2
    w = torch.randn(3, 3, 5, generator=g)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        res = []
        for compiled in (False, True):
            a, b = zp.detach().to(dt).requires_grad_(), zq.detach().to(dt).requires_grad_()
            out = tr.token_logprobs_and_kl(a, b, tok, mask, temperature=1.3, chunk_size=4, compile=compiled)
            sum((o * wi).sum() for o, wi in zip(out, w)).backward()
            res.append([o.detach().float() for o in out] + [a.grad.float(), b.grad.float()])
        for x, y in zip(*res):
            assert torch.isfinite(y).all()
            torch.testing.assert_close(y, x, rtol=tol, atol=tol)

def test_token_logprobs_and_kl_saves_no_vocabulary_wide_float32_tensor():
    """Only the inputs themselves are kept for the backward pass: no (B, T, V) float32 activation."""
    zp = torch.randn(2, 16, 50, dtype=torch.bfloat16, requires_grad=True)
    zq = torch.randn(2, 16, 50, dtype=torch.bfloat16)
    saved = []

    def pack(x):
        saved.append((x.dtype, x.numel(), x.data_ptr()))
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, lq, kl = tr.token_logprobs_and_kl(zp, zq, torch.randint(0, 50, (2, 16)), chunk_size=4)
        loss = tr.kl_loss(lp, lq, token_kl=kl, baseline="loo")
    inputs = {zp.data_ptr(), zq.data_ptr()}
    wide = [s for s in saved if s[1] >= 2 * 16 * 50 and s[2] not in inputs]
    assert not wide, wide
    loss.sum().backward()


def test_bad_inputs_raise_naming_the_parameter():
    lp = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="estimator: unknown 'x'; allowed: mc, rb"):
        tr.kl_loss(lp, lp, estimator="x")
    with pytest.raises(ValueError, match="token_kl: estimator 'rb'"):
        tr.kl_loss(lp, lp)
    with pytest.raises(ValueError, match="baseline: unknown 'mean'"):
        tr.kl_loss(lp, lp, estimator="mc", baseline="mean")
    with pytest.raises(ValueError, match="logq: shape"):
        tr.kl_loss(lp, torch.zeros(4, 2), estimator="mc")
    with pytest.raises(ValueError, match="mask: shape"):
        tr.kl_loss(lp, lp, torch.ones(4, 2, dtype=torch.bool), estimator="mc")
    with pytest.raises(ValueError, match="logp: kl_loss needs torch tensors"):
        tr.kl_loss(lp.detach().numpy(), lp, estimator="mc")
    with pytest.raises(ValueError, match="logp: baseline 'loo' needs at least 2 sequences"):
        tr.kl_loss(lp[:1], lp[:1], estimator="mc", baseline="loo")
    with pytest.raises(ValueError, match="estimator: unknown 'k3'; allowed: mc, rb"):
        tr.kl_rewards(lp, lp, estimator="k3")
    with pytest.raises(ValueError, match="token_kl: estimator 'rb'"):
        tr.kl_rewards(lp, lp)
    z = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="tokens: values outside"):
        tr.token_logprobs_and_kl(z, z, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="tokens: shape"):
        tr.token_logprobs_and_kl(z, z, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="logits_q: shape"):
        tr.token_logprobs_and_kl(z, torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        tr.token_logprobs_and_kl(z, z, torch.zeros(2, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="chunk_size"):
        tr.token_logprobs_and_kl(z, z, torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    cols = ("reverse", "forward", "zero", "frozen reverse", "frozen forward")
    print(f"{'estimator':26s} {'T':>2s} {'policy':6s} {'claim':17s} {'|z| claim':>9s} "
          + " ".join(f"{c[:10]:>10s}" for c in cols) + f" {'|z| E':>6s} {'var':>7s}")
    for name, T, on, claim in TABLE:
        r = evaluate(name, T, on)
        zc = "" if claim == "neither" else f"{r['z'][claim]:.2f}"
        ze = "" if r["z_exact"] is None else f"{r['z_exact']:.2f}"
        print(f"{name:26s} {T:2d} {'on' if on else 'off':6s} {claim:17s} {zc:>9s} "
              + " ".join(f"{r['z'][c]:10.1f}" for c in cols) + f" {ze:>6s} {r['var']:7.3f}")


# ------------------------------------------------------------------ the off-policy default, the weights' report, NaN

def drifted_batch(seed=0, B=8, T=200, V=50, drift=0.45):
    """A later PPO epoch gone far (TRL num_iterations=2 in the issue): per-token log-ratios N(0, drift²) put about
    two thirds of the tokens outside PPO's clip [0.8, 1.2]."""
    g = torch.Generator().manual_seed(seed)
    zp = (torch.randn(B, T, V, generator=g) * 2).requires_grad_()
    zq = torch.randn(B, T, V, generator=g) * 2
    tok = torch.multinomial(torch.softmax(zp.detach(), -1).reshape(-1, V), 1, generator=g).reshape(B, T)
    logp, logq, kl = tr.token_logprobs_and_kl(zp, zq, tok)
    old = logp.detach() + drift * torch.randn(B, T, generator=g)
    return zp, logp, logq, kl, old


def test_offpolicy_default_stays_bounded_where_full_prefix_weights_blow_up():
    zp, logp, logq, kl, old = drifted_batch()
    w = tr.offpolicy_weights(logp, old)
    assert 0.6 < w.outside_clip < 0.7 and w.n == 8 and w.ess < 2  # the case: 65 % outside the clip
    eps = tr.RATIO_CLIP
    for est in ("rb", "mc"):
        loss = tr.kl_loss(logp, logq, token_kl=kl, estimator=est, logp_old=old)  # default: weights="clip"
        (g_lp,) = torch.autograd.grad(loss.sum(), logp, retain_graph=True)
        # ∂loss/∂log p_t = c_t·(the return still to come) + the pathwise part, c_t ≤ 1 + ε: bounded by the sums
        f = (logp - logq).detach()
        bound = (1 + eps) * torch.maximum(kl.detach().sum(-1), f.abs().sum(-1))[:, None] + 2 * f.abs()
        assert torch.all(g_lp.abs() <= bound), est
        if est == "rb":
            torch.testing.assert_close(loss, kl.sum(-1))  # the value: Σ_t K_t, the prefix weights truncated
        with pytest.warns(UserWarning, match=r"logp_old: the full-prefix weights have ESS"):
            full = tr.kl_loss(logp, logq, token_kl=kl, estimator=est, logp_old=old, weights="full")
        (g_full,) = torch.autograd.grad(full.sum(), zp, retain_graph=True)
        (g_clip,) = torch.autograd.grad(loss.sum(), zp, retain_graph=True)
        # what the issue saw (loss 4.9e6, grad-norm 5.9e10 against TRL's 0.16 and 6.7): orders of magnitude
        assert full.abs().max() > 1e3 * loss.abs().max() and g_full.norm() > 1e3 * g_clip.norm(), est
        on = tr.kl_loss(logp, logq, token_kl=kl, estimator=est)  # the same batch taken as on-policy
        (g_on,) = torch.autograd.grad(on.sum(), zp, retain_graph=True)
        assert torch.isfinite(g_clip).all() and g_clip.norm() < (1 + eps) * g_on.norm(), est
    r = tr.kl_rewards(logp, logq, token_kl=kl, logp_old=old)  # clip: the pathwise term is Σ_t K_t
    torch.testing.assert_close(r.pathwise, kl.sum(-1))


def test_offpolicy_weights_report():
    lp = torch.zeros(2, 3)
    old = torch.log(torch.tensor([[0.5, 1.0, 1.0], [1.0, 1.0, 2.0]]))  # ratios 2, 1, 1 and 1, 1, 0.5
    mask = torch.tensor([[True, True, True], [True, True, False]])
    w = tr.offpolicy_weights(lp, old, mask)
    assert w.n == 2 and w.max_ratio == pytest.approx(2) and w.min_ratio == pytest.approx(1)  # 0.5 is masked
    assert w.outside_clip == pytest.approx(1 / 5)
    assert w.ess == pytest.approx((2 + 1) ** 2 / (4 + 1))  # sequence weights 2 and 1
    with pytest.raises(ValueError, match="logp_old: needed"):
        tr.offpolicy_weights(lp, None)
    with pytest.raises(ValueError, match="weights: unknown 'seq'; allowed: clip, full"):
        tr.kl_loss(lp, lp, estimator="mc", weights="seq")
    with pytest.raises(ValueError, match="ratio_clip: must be > 0"):
        tr.kl_loss(lp, lp, estimator="mc", ratio_clip=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_inputs_raise_naming_the_argument(bad):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 5, generator=g)
    tok = torch.zeros(2, 3, dtype=torch.long)
    lp = torch.randn(2, 3, generator=g)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    zb = z.clone()
    zb[0, 2, 4] = bad  # position (0, 2) is masked below
    if bad == -math.inf:  # a token the model cannot produce: allowed in logits
        assert torch.isfinite(tr.token_logprobs_and_kl(zb, z, tok)[2]).all()
        tr.exact_token_kl(zb, z)
    else:
        with pytest.raises(ValueError, match="logits_p: NaN or \\+inf"):
            tr.token_logprobs_and_kl(zb, z, tok)  # issue 23: NaN logits returned NaN silently
        with pytest.raises(ValueError, match="logits_q: NaN or \\+inf"):
            tr.token_logprobs_and_kl(z, zb, tok)
        with pytest.raises(ValueError, match="logits_q: NaN or \\+inf"):
            tr.exact_token_kl(z.numpy(), zb.numpy())
        tr.token_logprobs_and_kl(zb, z, tok, mask)  # masked: not looked at
    lb = lp.clone()
    lb[0, 2] = bad
    for name in ("logp", "logq", "token_kl", "logp_old"):
        args = {"logp": lp, "logq": lp, "token_kl": lp.abs(), "logp_old": lp, name: lb}
        with pytest.raises(ValueError, match=f"{name}: NaN or infinite values at unmasked positions"):
            tr.kl_loss(args["logp"], args["logq"], token_kl=args["token_kl"], logp_old=args["logp_old"])
        tr.kl_loss(args["logp"], args["logq"], mask, token_kl=args["token_kl"], logp_old=args["logp_old"])
    with pytest.raises(ValueError, match="logq: NaN or infinite"):
        tr.kl_rewards(lp, lb, estimator="mc")
    with pytest.raises(ValueError, match="logp: NaN or infinite"):
        tr.k3(lb.numpy(), lp.numpy())
    with pytest.raises(ValueError, match="token_kl: NaN or infinite"):
        tr.sequence_kl(lp, lp, token_kl=lb)
    with pytest.raises(ValueError, match="temperature: must be a finite number"):
        tr.token_logprobs_and_kl(z, z, tok, temperature=math.inf)


@pytest.mark.parametrize("bad", [math.nan, math.inf, 0.5])
def test_a_mask_that_is_not_boolean_raises_naming_it(bad):
    """A float mask holding NaN counted as True (kl_loss) or crashed in torch.where (sequence_kl): each training
    function names `mask` instead; a 0 / 1 float mask is read as booleans."""
    lp = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 3)
    assert torch.equal(tr.kl_loss(lp, lp * 0.9, mask, estimator="mc"), tr.kl_loss(lp, lp * 0.9, estimator="mc"))
    mask[0, 1] = bad
    z = torch.randn(2, 3, 5)
    for call in (lambda: tr.kl_loss(lp, lp, mask, estimator="mc"), lambda: tr.kl_rewards(lp, lp, mask, estimator="mc"),
                 lambda: tr.sequence_kl(lp, lp, mask=mask, estimator="mc"), lambda: tr.k1(lp, lp, mask),
                 lambda: tr.token_logprobs_and_kl(z, z, torch.zeros(2, 3, dtype=torch.long), mask),
                 lambda: tr.exact_token_kl(z, z, mask)):
        with pytest.raises(ValueError, match="^mask: must hold booleans or 0 / 1"):
            call()
