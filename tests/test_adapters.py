"""Models given as base + PEFT/LoRA adapter, device maps, per-model dtypes and the tokenizer checks, on tiny random
GPT-2 models: an adapter pair against the merged-weights pair (merge_and_unload) and against enumeration."""
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from kl_estimation.cli import llm_main
from kl_estimation.core.estimators import sequence_estimates
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.pair import AdapterView
from tiny_lms import save_pair, tokenizer

# The tests build adapters with peft directly, and peft calls a transformers API deprecated in 5.x (the library
# silences it where it calls peft itself).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

peft = pytest.importorskip("peft")
T = 3


def save_lora(base_dir, out, seed=0, scale=0.8):
    """A LoRA adapter with random (non-zero) A and B on every GPT-2 linear layer, and the merged model."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "lora_" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * scale)
    model.save_pretrained(out / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(out / "merged")
    tokenizer().save_pretrained(out / "merged")
    return str(out / "adapter"), str(out / "merged")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    return save_lora(tiny[0], tmp_path_factory.mktemp("lora"))


def load(p, q, **kw):
    return load_transformers_pair(p, q, prompts=["a b", "c"], temperature=0.8, **kw)


def walk(pair, steps=3, rows=(0, 1, 0, 1)):
    """log P_t, log Q_t along fixed tokens on the KV caches: start, then `steps` steps."""
    lp, lq, state = pair.start(torch.tensor(rows))
    out = [(lp, lq)]
    for t in range(steps):
        lp, lq, state = pair.step(state, torch.tensor([1, 2, 3, 1])[: len(rows)].roll(t))
        out.append((lp, lq))
    return torch.stack([torch.stack(x) for x in out])  # (steps + 1, 2, B, V)


def test_q_as_p_plus_adapter_loads_the_base_once_and_matches_merged_weights(tiny, lora):
    adapter, merged = lora
    shared = load(tiny[0], None, q_adapter=adapter)
    assert isinstance(shared.q_model, AdapterView) and shared.p_model.peft_model is shared.q_model.peft_model
    reference = load(tiny[0], merged)
    a, b = walk(shared), walk(reference)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=0)  # P adapter-off = base, Q adapter-on = merged
    assert (a[:, 0] - a[:, 1]).abs().max() > 0.1  # the adapter changes Q: the check above can fail
    plain_p = walk(load(tiny[0], tiny[0]))[:, 0]
    torch.testing.assert_close(a[:, 0], plain_p, atol=1e-6, rtol=0)


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_adapter_kl_matches_enumeration_and_the_sampler(tiny, lora):
    adapter, merged = lora
    shared = load(tiny[0], None, q_adapter=adapter)
    reference = load(tiny[0], merged)
    for prompt in (0, 1):
        prop = engine.sequence_proposal("P")
        exact = enumeration.enumerate_sequences(reference, prop, T, prompt_index=prompt)["kl"]
        leaves = enumeration.enumerate_sequences(shared, prop, T, prompt_index=prompt)
        assert leaves["kl"] == pytest.approx(exact, rel=1e-5) and exact > 0.05
    prop = engine.sequence_proposal("Geometric (β=0.5)")
    leaves = enumeration.enumerate_sequences(shared, prop, T)
    r = np.exp(leaves["log_r"])
    var = float(np.sum(r * (leaves["rb"] - leaves["kl"]) ** 2))  # exact variance of RB-IS under the proposal
    N = 3000
    b = engine.sample_batch(shared, prop, N, T, engine.unit_generator(2, prop.name, 0, "cpu"))
    est = sequence_estimates(b.log_p, b.log_q, b.log_r, b.kl_step, b.mask, False)["RB-IS"]
    assert abs(est["estimate"] - leaves["kl"]) < 4 * math.sqrt(var / N)


def test_adapter_on_p_and_both_sides(tiny, lora, tmp_path):
    adapter, merged = lora
    other, other_merged = save_lora(tiny[0], tmp_path, seed=1)
    on_p = walk(load(tiny[0], None, p_adapter=adapter))
    torch.testing.assert_close(on_p, walk(load(merged, tiny[0])), atol=2e-5, rtol=0)
    both = load(tiny[0], None, p_adapter=adapter, q_adapter=other)
    assert both.p_model.peft_model is both.q_model.peft_model  # one base, two adapters switched per forward
    torch.testing.assert_close(walk(both), walk(load(merged, other_merged)), atol=2e-5, rtol=0)


def test_device_map_and_per_model_dtypes(tiny):
    pytest.importorskip("accelerate")
    mapped = load(*tiny, device_map="auto")  # no GPU here: accelerate keeps everything in CPU memory
    assert mapped.device == torch.device("cpu")
    torch.testing.assert_close(walk(mapped), walk(load(*tiny)), atol=1e-6, rtol=0)
    mixed = load(*tiny, p_dtype="bfloat16")
    assert mixed.p_model.dtype == torch.bfloat16 and mixed.q_model.dtype == torch.float32
    lp, lq, _ = mixed.start(torch.tensor([0, 1]))
    assert lp.dtype == lq.dtype == torch.float32


def test_tokenizer_checks(tiny, tmp_path):
    wide = save_pair(tmp_path / "wide", extra_rows=9)  # same tokenizer, more padded logit rows
    with pytest.warns(UserWarning, match="padding"):
        load(tiny[0], wide[1])
    other_eos = tmp_path / "eos"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny[1]).save_pretrained(other_eos)
    tok = tokenizer()
    tok.eos_token = "c"
    tok.save_pretrained(other_eos)
    with pytest.raises(ValueError, match="EOS token"):
        load(tiny[0], str(other_eos))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tiny[0], str(other_eos), ignore_eos=True)  # fixed-length continuations: EOS plays no part


def run_cli(tmp_path, *args):
    out = tmp_path / "o"
    try:
        code = llm_main(["--prompt", "a b", "--n-samples", "8", "--max-new-tokens", "2", "--output-dir", str(out),
                         *args])
    except SystemExit as e:
        code = e.code
    return code, out


def test_cli_q_adapter_records_the_adapter(tiny, lora, tmp_path, capsys):
    code, out = run_cli(tmp_path, "--p-model", tiny[0], "--q-adapter", lora[0], "--proposals", "P")
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "p.json").read_text())
    assert doc["models"]["q_adapter"] == lora[0] and doc["models"]["q"] == tiny[0]


def test_adapter_on_a_variant_of_its_base_is_applied_with_a_warning(tiny, lora, tmp_path, capsys):
    """`--q-model VARIANT --q-adapter LORA`: the adapter names the base's folder, Q is another model of the same shapes
    (a quantized or merged variant): applied, with a warning, and Q is the variant with the adapter merged in."""
    from transformers import AutoModelForCausalLM

    adapter, _ = lora
    with pytest.warns(UserWarning, match="was made for .* every weight shape fits"):
        pair = load(tiny[0], tiny[1], q_adapter=adapter)
    merged = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny[1]), adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "variant_merged")
    tokenizer().save_pretrained(tmp_path / "variant_merged")
    torch.testing.assert_close(walk(pair), walk(load(tiny[0], str(tmp_path / "variant_merged"))), atol=2e-5, rtol=0)
    with pytest.warns(UserWarning, match="was made for"):
        code, out = run_cli(tmp_path, "--p-model", tiny[0], "--q-model", tiny[1], "--q-adapter", adapter,
                            "--proposals", "P")
    assert code == 0, capsys.readouterr().err
    doc = json.loads((out / "p.json").read_text())
    assert doc["models"]["q_adapter"] == adapter and doc["models"]["q"] == tiny[1]


@pytest.mark.parametrize("case", ["wrong shapes", "no accelerate", "no peft", "offload alone", "bad q dtype"])
def test_bad_input(case, tiny, lora, tmp_path, monkeypatch, capsys):
    args, needle = ["--p-model", tiny[0]], None
    if case == "wrong shapes":
        wide = save_pair(tmp_path / "wide", n_embd=16)
        ad, _ = save_lora(wide[0], tmp_path / "wl")
        cfg = json.loads((tmp_path / "wl" / "adapter" / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = tiny[0]  # names the right base, but was made on another shape
        (tmp_path / "wl" / "adapter" / "adapter_config.json").write_text(json.dumps(cfg))
        args, needle = args + ["--q-adapter", ad], "does not fit the given model"
    elif case == "no accelerate":
        monkeypatch.setitem(sys.modules, "accelerate", None)
        args, needle = args + ["--q-model", tiny[1], "--device-map", "auto"], "--device-map: sharding a model"
    elif case == "no peft":
        monkeypatch.setitem(sys.modules, "peft", None)
        args, needle = args + ["--q-adapter", lora[0]], "--q-adapter: an adapter needs the peft package"
    elif case == "offload alone":
        args, needle = args + ["--q-model", tiny[1], "--offload"], "--offload: only with --device-map auto"
    elif case == "bad q dtype":
        args, needle = args + ["--q-model", tiny[1], "--q-dtype", "int4"], "--q-dtype: unknown dtype"
    capsys.readouterr()  # drop what building the models printed
    code, out = run_cli(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert not out.exists()
