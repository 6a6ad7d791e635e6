"""kl_estimation.integrations.trl: a few GRPO steps on a tiny random model with each kl_estimator (needs trl)."""
import math

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import GRPOConfig

from kl_estimation.integrations.trl import GRPOTrainer, _surrogate
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


def _train(tmp_path, kl_estimator, num_iterations, loss_type="dapo", steps=3):
    tok = tokenizer(WORDS)
    tok.pad_token = "<eos>"
    data = Dataset.from_dict({"prompt": ["a b", "c d", "e f", "g h"] * 4})
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=6, max_steps=steps, beta=0.1, num_iterations=num_iterations,
                      learning_rate=5e-3, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      loss_type=loss_type, seed=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=_model(tmp_path / "model"), reward_funcs=_reward, args=args, train_dataset=data,
                          processing_class=tok, kl_estimator=kl_estimator)
    trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


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
