"""The fused two-model head against the logits path (training.token_logprobs_and_kl + log_softmax), with gradients."""
import pytest
import torch

from kl_estimation import training as tr
from kl_estimation.fused_head import fused_head_terms


def _case(dtype=torch.float64, B=2, T=5, H=6, V=11, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    hp, hq = r(B, T, H), r(B, T, H)
    wp, wq = r(V, H), r(V, H)
    bp, bq = (r(V), r(V)) if bias else (None, None)
    tok = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 2:] = False
    tok[1, -1] = -100  # padding may hold anything
    return hp, wp, bp, hq, wq, bq, tok, mask


def _logits(h, w, b, factor):
    z = h @ w.t()
    return (z if b is None else z + b) * factor


def _reference(hp, wp, bp, hq, wq, bq, tok, mask, factor, direction):
    """The logits path: full logits, token_logprobs_and_kl (the KL with the roles swapped for reverse)."""
    zp, zq = _logits(hp, wp, bp, factor), _logits(hq, wq, bq, factor).detach()
    lp, lq, kl = tr.token_logprobs_and_kl(zp, zq, tok, mask)
    if direction == "reverse":
        kl = tr.token_logprobs_and_kl(zq, zp, tok, mask)[2]
    lsm = torch.log_softmax(zp.to(lp.dtype), -1)
    ent = torch.where(mask, -(lsm.exp() * lsm).sum(-1), 0.0)
    return lp, lq, kl, ent


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients_match_the_logits_path(direction, bias):
    hp, wp, bp, hq, wq, bq, tok, mask = _case(bias=bias)
    leaves = [x.requires_grad_() for x in (hp, wp, bp) if x is not None]
    kw = {"bias_p": bp, "bias_q": bq, "logit_scale": 0.8, "temperature": 1.3, "direction": direction, "row_block": 3,
          "vocab_block": 4}
    got = fused_head_terms(hp, wp, hq, wq, tok, mask, **kw)
    want = _reference(hp, wp, bp, hq, wq, bq, tok, mask, 0.8 / 1.3, direction)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    coef = torch.randn(3, *tok.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grads(outs):
        return torch.autograd.grad(sum((c * o).sum() for c, o in zip(coef, (outs[0], outs[2], outs[3]))), leaves)

    g_got, g_want = grads(got), grads(want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_gradcheck(direction):
    hp, wp, bp, hq, wq, bq, tok, mask = _case(B=2, T=4, H=3, V=7)
    hp, wp, bp = (x.requires_grad_() for x in (hp, wp, bp))

    def f(hp, wp, bp):
        o = fused_head_terms(hp, wp, hq, wq, tok, mask, bias_p=bp, bias_q=bq, temperature=0.7,
                             direction=direction, row_block=3, vocab_block=3)
        return o.logp, o.kl, o.entropy

    assert torch.autograd.gradcheck(f, (hp, wp, bp))


def test_tied_head_gradient_reaches_the_embedding():
    """A head tied to the input embeddings: the gradient through hidden states and the head both land on it."""
    g = torch.Generator().manual_seed(2)
    V, H = 9, 5
    emb = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(H, H, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (2, 6), generator=g)
    ref = torch.randn(V, H, generator=g, dtype=torch.float64)
    tok = ids[:, 1:]

    def grad(fused):
        h = torch.tanh(emb[ids[:, :-1]] @ mix)  # a one-layer "backbone" on the tied embedding
        hq = h.detach() + 0.1
        if fused:
            o = fused_head_terms(h, emb, hq, ref, tok, row_block=4, vocab_block=4)
            lp, kl, ent = o.logp, o.kl, o.entropy
        else:
            lp, _, kl, ent = _reference(h, emb, None, hq, ref, None, tok, torch.ones_like(tok, dtype=torch.bool), 1.0,
                                        "forward")
        return torch.autograd.grad((lp + 0.5 * kl - 0.2 * ent).sum(), emb)[0]

    torch.testing.assert_close(grad(True), grad(False), rtol=1e-9, atol=1e-10)


def test_bfloat16_matches_the_logits_path():
    """bf16 weights and hidden states: the bf16 logits tile, then float32 softmax, as the model's own head gives."""
    hp, wp, _, hq, wq, _, tok, mask = _case(dtype=torch.bfloat16, T=40, H=32, V=300, bias=False)
    hp.requires_grad_()
    got = fused_head_terms(hp, wp, hq, wq, tok, mask, row_block=16, vocab_block=64)
    want = _reference(hp, wp, None, hq, wq, None, tok, mask, 1.0, "forward")
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    ga = torch.autograd.grad((got.logp + got.kl).sum(), hp)[0]
    gb = torch.autograd.grad((want[0] + want[2]).sum(), hp)[0]
    assert ga.dtype == torch.bfloat16
    torch.testing.assert_close(ga.float(), gb.float(), rtol=3e-2, atol=3e-2)


def test_compute_dtype_multiplies_in_bf16_and_returns_float32_gradients():
    """float32 parameters under mixed precision (TRL's bf16 autocast): the products of bf16-rounded operands, as with
    bf16 inputs, while the gradients keep the parameters' float32."""
    hp, wp, _, hq, wq, _, tok, mask = _case(dtype=torch.float32, T=40, H=32, V=300, bias=False)
    hp.requires_grad_()
    got = fused_head_terms(hp, wp, hq, wq, tok, mask, row_block=16, vocab_block=64, compute_dtype=torch.bfloat16)
    want = fused_head_terms(*(x.bfloat16() for x in (hp, wp, hq, wq)), tok, mask, row_block=16, vocab_block=64)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    ga = torch.autograd.grad((got.logp + got.kl).sum(), hp)[0]
    assert ga.dtype == torch.float32
    plain = fused_head_terms(hp, wp, hq, wq, tok, mask)
    assert (plain.logp - got.logp).abs().max() > 1e-4  # the bf16 rounding is real, so the test can fail


def test_keeps_no_vocabulary_wide_tensor_for_backward():
    hp, wp, _, hq, wq, _, tok, mask = _case(dtype=torch.float32, B=4, T=64, H=8, V=500)
    hp.requires_grad_()
    wp.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        o = fused_head_terms(hp, wp, hq, wq, tok, mask, row_block=32, vocab_block=128)
    (o.logp + o.kl).sum().backward()
    assert max(saved) <= max(wp.numel(), 32 * 500)  # the head itself, never (rows, V) for all rows


def test_bad_input_names_the_parameter():
    hp, wp, _, hq, wq, _, tok, _ = _case()
    with pytest.raises(ValueError, match="^direction: unknown"):
        fused_head_terms(hp, wp, hq, wq, tok, direction="both")
    with pytest.raises(ValueError, match="^weight_q: vocabulary"):
        fused_head_terms(hp, wp, hq, wq[:-1], tok)
    with pytest.raises(ValueError, match=r"^tokens: values outside"):
        fused_head_terms(hp, wp, hq, wq, tok)  # the -100 is unmasked now
