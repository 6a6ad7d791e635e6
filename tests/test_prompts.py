"""Prompt sets: loading, left padding that changes nothing, per-prompt and overall KL against enumeration, resume."""
import json
import math

import numpy as np
import pytest
import torch

from kl_estimation.cli import llm_main
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.prompts import load_prompts
from kl_estimation.llm.run import units
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import run_experiment
from kl_estimation.llm.run.units import plan_units, sample_units
from tiny_lms import save_pair

PROMPTS = ["a", "a b c b", "c b"]  # different lengths: the batch is left-padded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tinyp"), seed=3)


@pytest.fixture(scope="module")
def pair(tiny):
    return load_transformers_pair(*tiny, prompts=PROMPTS, temperature=0.9)


def test_padded_prompts_give_the_distributions_they_give_alone(tiny, pair):
    rows = torch.tensor([1, 0, 2, 1, 0])
    lp, lq, state = pair.start(rows)
    tokens = torch.tensor([2, 3, 1, 1, 2])
    lp2, lq2, _ = pair.step(state, tokens)
    for i, r in enumerate(rows.tolist()):
        alone = load_transformers_pair(*tiny, prompts=PROMPTS[r], temperature=0.9)
        ap, aq, st = alone.start(torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(lp[i], ap[0], atol=2e-6, rtol=0)
        torch.testing.assert_close(lq[i], aq[0], atol=2e-6, rtol=0)
        ap2, aq2, _ = alone.step(st, tokens[i:i + 1])
        torch.testing.assert_close(lp2[i], ap2[0], atol=2e-6, rtol=0)
        torch.testing.assert_close(lq2[i], aq2[0], atol=2e-6, rtol=0)


def test_records_do_not_depend_on_packing(pair):
    cfg = LLMConfig(p_model="x", q_model="y", prompts=tuple(PROMPTS), n_samples=8, max_new_tokens=4, batch_size=8)
    prop = engine.sequence_proposal("Geometric (β=0.5)")
    units = plan_units(3, 8, 8)
    together = sample_units(pair, prop, units, cfg)
    alone = [r for u in units for r in sample_units(pair, prop, [u], cfg)]
    assert [r["token_ids"] for r in together] == [r["token_ids"] for r in alone]
    assert [r["prompt"] for r in together] == [0] * 8 + [1] * 8 + [2] * 8
    np.testing.assert_allclose([r["log_weight"] for r in together], [r["log_weight"] for r in alone], atol=1e-5)


@pytest.mark.parametrize("name", ["P", "Geometric (β=0.5)", "Adaptive [prefix-aware]"])
def test_overall_and_per_prompt_estimates_agree_with_enumeration(pair, name):
    T, n = 3, 1500
    truth = [enumeration.enumerate_sequences(pair, engine.sequence_proposal(name), T, prompt_index=i)["kl"]
             for i in range(len(PROMPTS))]
    cfg = LLMConfig(p_model="x", q_model="y", prompts=tuple(PROMPTS), n_samples=n, max_new_tokens=T, batch_size=500,
                        proposals=(name,), seed=5)
    doc = run_experiment(pair, cfg, {"p": "x", "q": "y"})["docs"][0]
    main = ("MC", "RB", "RB+CV") if name == "P" else ("IS", "RB-IS", "RB-IS+CV")
    for est in main:
        o = doc["estimates"][est]
        assert abs(o["estimate"] - np.mean(truth)) < 4 * o["std_error"], (est, o["estimate"], np.mean(truth))
        assert o["std_error_population"] > 0 and o["n"] == 3 * n
        for i, per in enumerate(doc["per_prompt"]):
            e = per["estimates"][est]
            assert per["n_sequences"] == n and abs(e["estimate"] - truth[i]) < 4 * e["std_error"], (est, i)
    # the fixed-set SE is the per-prompt SEs combined; the population SE is the spread of per-prompt estimates
    e = np.array([p["estimates"][main[0]]["estimate"] for p in doc["per_prompt"]])
    se = np.array([p["estimates"][main[0]]["std_error"] for p in doc["per_prompt"]])
    assert doc["estimates"][main[0]]["std_error"] == pytest.approx(math.sqrt(np.sum(se ** 2)) / 3)
    o = doc["estimates"][main[0]]
    assert o["std_error_population"] == pytest.approx(e.std(ddof=1) / math.sqrt(3))
    # the population interval rests on 3 per-prompt estimates: Student t on 2 degrees of freedom, not z = 1.96
    assert o["ci_population_high"] - o["estimate"] == pytest.approx(4.302653 * o["std_error_population"], rel=1e-6)


def test_prompt_files_of_every_kind(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond one\n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x y"}\n{"prompt": "z", "other": 1}\n')
    (tmp_path / "p.csv").write_text("id,text\n1,hello there\n2,\"a, b\"\n")
    assert load_prompts(prompts_file=tmp_path / "p.txt") == ["first prompt", "second one"]
    assert load_prompts(prompts_file=tmp_path / "p.jsonl") == ["x y", "z"]
    assert load_prompts(prompts_file=tmp_path / "p.csv", prompt_field="text", n_prompts=1) == ["hello there"]
    import datasets

    datasets.DatasetDict({"eval": datasets.Dataset.from_dict({"q": ["u v", "w"]})}).save_to_disk(tmp_path / "ds")
    assert load_prompts(dataset=str(tmp_path / "ds"), split="eval", prompt_field="q") == ["u v", "w"]
    with pytest.raises(ValueError, match="split: .* has no split 'train'"):
        load_prompts(dataset=str(tmp_path / "ds"), prompt_field="q")
    with pytest.raises(ValueError, match="prompt_field: .* no field 'prompt'"):
        load_prompts(prompts_file=tmp_path / "p.csv")


def cli(tmp_path, tiny, *extra, folder="o"):
    argv = ["--p-model", tiny[0], "--q-model", tiny[1], "--n-samples", "16", "--max-new-tokens", "3",
            "--batch-size", "8", "--output-dir", str(tmp_path / folder), "--proposals", "P", "Adaptive", *extra]
    try:
        return llm_main(argv)
    except SystemExit as e:
        return e.code


def test_cli_prompt_set_per_prompt_results_and_resume(tmp_path, tiny, monkeypatch, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert cli(tmp_path, tiny, "--prompts", str(f), folder="straight") == 0
    doc = json.loads((tmp_path / "straight" / "p.json").read_text())
    assert [p["prompt"] for p in doc["per_prompt"]] == [0, 1, 2] and doc["config"]["prompts"] == PROMPTS
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert [p["text"] for p in summary["per_prompt"]] == PROMPTS and len(summary["per_prompt"][0]["rows"]) == 9
    assert (tmp_path / "straight" / "summary_per_prompt.csv").exists()
    assert "std_error_population" in doc["estimates"]["RB"]
    real, calls = units.sample_batch, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 8:  # P done (6 forward batches), Adaptive killed in its second
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(units, "sample_batch", dying)
    assert cli(tmp_path, tiny, "--prompts", str(f), folder="killed") == 130
    monkeypatch.setattr(units, "sample_batch", real)
    assert cli(tmp_path, tiny, "--prompts", str(f), "--resume", folder="killed") == 0
    for name in ("p.json", "adaptive.json"):
        a = json.loads((tmp_path / "straight" / name).read_text())
        b = json.loads((tmp_path / "killed" / name).read_text())
        assert a["sequences"] == b["sequences"] and a["per_prompt"] == b["per_prompt"]
    # a different prompt set is other settings: --resume refuses
    capsys.readouterr()
    assert cli(tmp_path, tiny, "--prompts", str(f), "--n-prompts", "2", "--resume", folder="killed") == 2
    assert "other settings" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--prompts", "/nonexistent.txt"], "--prompts-file: no file /nonexistent.txt"),
    (["--prompts", "prompts.md"], "--prompts-file: "),
    (["--n-prompts", "0", "--prompts", "x.txt"], "--n-prompts"),
    (["--chat-template"], "--chat-template: the tokenizer has no chat template"),
    (["--dataset", "/nonexistent/ds"], "--dataset: cannot load"),
])
def test_bad_prompt_input(args, needle, tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.txt").write_text("a\n")
    (tmp_path / "prompts.md").write_text("a\n")
    code = cli(tmp_path, tiny, *args)
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_chat_template_wraps_each_prompt(tiny):
    from transformers import AutoTokenizer

    from kl_estimation.llm.loading import tokenize_prompts

    tok = AutoTokenizer.from_pretrained(tiny[0])
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }} c{% endfor %}"
                         "{% if add_generation_prompt %} b{% endif %}")
    ids = tokenize_prompts(tok, ["a b"], chat_template=True)
    assert ids == [[1, 2, 3, 2]]


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_resume_extends_a_finished_run_unit_by_unit(tmp_path, tiny):
    """A finished run with fewer --n-reps is extended: its whole units are kept (by prompt and batch), a short
    last unit is redrawn, and the records equal those of a straight run with the larger --n-reps."""
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS[:2]) + "\n")
    assert cli(tmp_path, tiny, "--prompts", str(f), "--n-samples", "20", folder="grown") == 0
    assert cli(tmp_path, tiny, "--prompts", str(f), "--n-samples", "32", "--resume", folder="grown") == 0
    assert cli(tmp_path, tiny, "--prompts", str(f), "--n-samples", "32", folder="straight") == 0
    for name in ("p.json", "adaptive.json"):
        a = json.loads((tmp_path / "straight" / name).read_text())["sequences"]
        b = json.loads((tmp_path / "grown" / name).read_text())["sequences"]
        assert [(r["prompt"], r["batch"]) for r in a] == [(i, j) for i in range(2) for j in range(4) for _ in range(8)]
        assert a == b
