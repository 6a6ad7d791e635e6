"""kl_estimation.integrations.trl: a few GRPO and RLOO steps on a tiny random model with each kl_estimator (needs
trl)."""
import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import GRPOConfig, RLOOConfig

from kl_estimation.integrations.trl import GRPOTrainer, RLOOTrainer, _surrogate
from tiny_lms import tokenizer

WORDS = ("<eos>", *"abcdefghijklmnop")


def _model(folder):
    """A tiny random GPT-2 saved as a folder: TRL loads the reference from the policy's path."""
    torch.manual_seed(0)  # transformers initialises from the global generator
    cfg = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                     eos_token_id=0, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    return str(folder)


def _reward(completions, **kwargs):
    return [float(c.count("a")) for c in completions]


def _trainer(tmp_path, kl_estimator, num_iterations, loss_type="dapo", steps=3, trainer="grpo", beta=0.1, **extra):
    tok = tokenizer(WORDS)
    tok.pad_token = "<eos>"
    data = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 4})
    common = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=6, max_steps=steps, beta=beta, num_iterations=num_iterations,
                  learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                  disable_tqdm=True, **extra)
    if trainer == "grpo":
        cls, args = GRPOTrainer, GRPOConfig(loss_type=loss_type, **common)
    else:
        cls, args = RLOOTrainer, RLOOConfig(**common)
    return cls(model=_model(tmp_path / "model"), reward_funcs=_reward, args=args, train_dataset=data,
               processing_class=tok, kl_estimator=kl_estimator)


def _train(tmp_path, kl_estimator, num_iterations, loss_type="dapo", steps=3, trainer="grpo"):
    t = _trainer(tmp_path, kl_estimator, num_iterations, loss_type, steps, trainer)
    t.train()
    return [h for h in t.state.log_history if "loss" in h]


@pytest.mark.slow  # about 3 s of CPU each
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("kl_estimator", ["rb", "mc", "k3"])
def test_grpo_steps_stay_finite_and_bounded(tmp_path, kl_estimator, num_iterations):
    logs = _train(tmp_path, kl_estimator, num_iterations)
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"]) and abs(h["loss"]) < 100
        assert math.isfinite(h["grad_norm"]) and h["grad_norm"] < 1e3
        assert h["kl"] >= 0
        if kl_estimator != "k3":
            assert h["kl/rb"] >= 0 and h["kl/k3"] >= 0 and math.isfinite(h["kl/se"])
            if num_iterations == 2:
                assert 0 < h["kl/prefix_ess"] <= 1 + 1e-6 and h["kl/max_ratio"] > 0


def test_refuses_length_normalised_loss_and_unknown_estimator(tmp_path):
    with pytest.raises(ValueError, match="^loss_type: 'grpo' divides each sequence"):
        _train(tmp_path, "rb", 1, loss_type="grpo")
    with pytest.raises(ValueError, match="^kl_estimator: unknown 'k2'"):
        _train(tmp_path, "k2", 1)
    with pytest.raises(ValueError, match="^kl_estimator: unknown 'k3'; allowed: rb, mc, k1; TRL's own KL is 'k1' in"):
        _train(tmp_path, "k3", 1, trainer="rloo")


# RLOO: about 2 s of CPU each; "rb" (the default) stays in the fast suite as the smoke test
@pytest.mark.parametrize("num_iterations", [1, 2])
@pytest.mark.parametrize("kl_estimator", ["rb", pytest.param("mc", marks=pytest.mark.slow),
                                          pytest.param("k1", marks=pytest.mark.slow)])
def test_rloo_steps_stay_finite_and_bounded(tmp_path, kl_estimator, num_iterations):
    logs = _train(tmp_path, kl_estimator, num_iterations, steps=2, trainer="rloo")
    assert len(logs) == 2
    for h in logs:
        assert math.isfinite(h["loss"]) and abs(h["loss"]) < 100
        assert math.isfinite(h["grad_norm"]) and h["grad_norm"] < 1e3
        # TRL's k1 (a token mean that can be negative) is logged at rollout only: not on a second iteration's step
        assert math.isfinite(h["kl"]) if "kl" in h else (kl_estimator, num_iterations) == ("k1", 2)
        if kl_estimator != "k1":
            assert h["kl/rb"] >= 0 and h["kl/k3"] >= 0 and math.isfinite(h["kl/se"])
            if num_iterations == 2:
                assert 0 < h["kl/prefix_ess"] <= 1 + 1e-6 and h["kl/max_ratio"] > 0


def test_rloo_rb_kl_matches_trl_k1_and_its_gradient_is_beta_times_the_surrogate(tmp_path):
    """On one rollout batch: the logged ``kl`` (TRL's k1) equals TRL's own, ``kl/rb`` equals the exact KL of the
    tiny model's full softmax; with a zero task reward and β = 1, the loss's gradient is ∇ mean_i Σ_t s_t."""
    # float32 throughout (TRL's configs default to bf16 autocast, on CPU too): the check is to float32 rounding
    t_ours = _trainer(tmp_path / "a", "rb", 1, trainer="rloo", beta=1.0, bf16=False)
    t_trl = _trainer(tmp_path / "b", "k1", 1, trainer="rloo", beta=1.0, bf16=False)
    for t in (t_ours, t_trl):
        t.reward_funcs = [lambda completions, **kw: [0.0] * len(completions)]
        t.model.train()
        with torch.no_grad():  # move the policy away from the reference, the same way in both
            for p in t.model.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    torch.manual_seed(1)
    batch = [{"prompt": "a b"}] * 4
    inputs = t_ours._generate_and_score_completions(batch)
    torch.manual_seed(1)
    inputs_trl = t_trl._generate_and_score_completions(batch)
    assert torch.equal(inputs["completion_ids"], inputs_trl["completion_ids"])
    t_ours.model.zero_grad()
    loss = t_ours._compute_loss(t_ours.model, inputs)
    loss.backward()
    m = t_ours._metrics["train"]
    torch.testing.assert_close(m["kl"][-1], t_trl._metrics["train"]["kl"][-1], rtol=1e-5, atol=1e-6)
    # the exact KL from full logits
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    T = inputs["completion_ids"].size(1)
    with torch.no_grad():
        lsp = torch.log_softmax(t_ours.model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1], -1)
        lsq = torch.log_softmax(t_ours.ref_model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1], -1)
    mask = inputs["completion_mask"].bool()
    kl = (lsp.exp() * (lsp - lsq)).sum(-1)
    torch.testing.assert_close(m["kl/rb"][-1], (kl[mask].sum() / mask.sum()).item(), rtol=1e-4, atol=1e-6)
    assert m["kl/rb"][-1] > 0.01
    # zero advantages: the whole gradient is β ∇ mean_i Σ_t s_t, here from the full logits
    got = [p.grad.clone() for p in t_ours.model.parameters()]
    t_ours.model.zero_grad()
    lsp = torch.log_softmax(t_ours.model(input_ids=ids, attention_mask=att).logits[:, -T - 1:-1], -1)
    tok = inputs["completion_ids"]
    lp, lq = (x.gather(-1, tok[..., None])[..., 0] for x in (lsp, lsq))
    s = _surrogate("rb", lp, lq, (lsp.exp() * (lsp - lsq)).sum(-1), mask)
    (s * mask).sum(-1).mean().backward()
    for a, p in zip(got, t_ours.model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["rb", "mc"])
def test_surrogate_gradient_is_the_sequence_kl_gradient(kind):
    """Enumerate every sequence of a 2-step, 3-token chain: E[Σ_t ∇s_t] under π_θ equals ∇ KL(π_θ‖π_ref)."""
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(1 + 3, 3, generator=g, dtype=torch.float64, requires_grad=True)  # rows: start, after token v
    ref = torch.randn(4, 3, generator=g, dtype=torch.float64)
    seqs = torch.cartesian_prod(torch.arange(3), torch.arange(3))  # (9, 2)
    rows = torch.stack([torch.zeros(9, dtype=torch.long), 1 + seqs[:, 0]], 1)
    lsp, lsq = torch.log_softmax(theta, -1)[rows], torch.log_softmax(ref, -1)[rows]  # (9, 2, 3)
    lp, lq = lsp.gather(-1, seqs[..., None])[..., 0], lsq.gather(-1, seqs[..., None])[..., 0]
    kl = (lsp.exp() * (lsp - lsq)).sum(-1)
    prob = lp.sum(-1).exp().detach()
    mask = torch.ones(9, 2, dtype=torch.bool)
    expected = (prob * _surrogate(kind, lp, lq, kl, mask).sum(-1)).sum()
    exact = (lp.sum(-1).exp() * (lp - lq).sum(-1)).sum()
    g1, g2 = (torch.autograd.grad(x, theta, retain_graph=True)[0] for x in (expected, exact))
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected, exact)
