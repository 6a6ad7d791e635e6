"""The CUDA code paths (marker ``cuda``: skipped without a GPU; bench/gpu_check.sh runs them on one): a run on the
GPU in float32 agrees with the exact KL, bf16 models and a device map run end to end, the fused KL loss matches its
CPU values and gradients, and the head search finds the same head on either device."""
import dataclasses

import pytest
import torch

from kl_estimation.llm import engine, enumeration
from kl_estimation.llm import head as hd
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import run_experiment
from tiny_lms import save_pair

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("cuda"), seed=0)


def run(pair, **kw):
    cfg = LLMConfig(p_model="P", q_model="Q", prompt="a b", n_samples=400, max_new_tokens=4,
                    temperature=pair.temperature, proposals=("P", "Geometric (β=0.5)"), batch_size=200,
                    device=str(pair.device), **kw).validate()
    return run_experiment(pair, cfg, {})


def test_float32_on_the_gpu_agrees_with_the_exact_kl(paths):
    pair = load_transformers_pair(*paths, prompts="a b", temperature=0.8, device="cuda", dtype="float32")
    kl = enumeration.exact_kl(load_transformers_pair(*paths, prompts="a b", temperature=0.8), 4)
    rec = run(pair)["recommended"]
    assert rec is not None and abs(rec["estimate"] - kl) <= 5 * rec["std_error"]


@pytest.mark.parametrize("placement", [dict(dtype="bfloat16"), dict(dtype="bfloat16", device_map="auto")])
def test_bf16_and_device_maps_run_end_to_end(paths, placement):
    pair = load_transformers_pair(*paths, prompts="a b", temperature=0.8, device="cuda", **placement)
    rows = run(pair)["rows"]
    assert rows and all(torch.isfinite(torch.tensor(r["estimate"])) for r in rows)


def test_fused_loss_matches_cpu_values_and_gradients():
    from kl_estimation.training import kl_loss, token_logprobs_and_kl

    gen = torch.Generator().manual_seed(0)
    B, T, V = 2, 16, 151_936
    zp, zq = (torch.randn(B, T, V, generator=gen) * 2 for _ in range(2))
    tok = torch.randint(V, (B, T), generator=gen)
    out = {}
    for dev in ("cpu", "cuda"):
        p = zp.to(dev).requires_grad_()
        lp, lq, kl = token_logprobs_and_kl(p, zq.to(dev), tok.to(dev))
        kl_loss(lp, lq, token_kl=kl).mean().backward()
        out[dev] = (lp.detach().cpu(), kl.detach().cpu(), p.grad.cpu())
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_the_head_is_the_same_on_either_device(paths):
    P = engine.sequence_proposal("P")
    heads = [hd.search_head(load_transformers_pair(*paths, prompts="a b", temperature=0.2, device=d), P, 4, 32)
             for d in ("cpu", "cuda")]
    assert heads[0].forwards == heads[1].forwards
    assert heads[0].rb == pytest.approx(heads[1].rb, rel=1e-5) and heads[0].mass == pytest.approx(heads[1].mass)
    assert dataclasses.fields(heads[1]) and heads[1].tok.device.type == "cuda"
