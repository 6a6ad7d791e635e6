"""The cost of a long run, said before it is spent (issue 23): the flagship-shaped command prints one line with its
estimated time and the cheapest reduction before its first batch's output; the estimate is on the API's result; the
probe is the run's own work (the records do not change: tests/test_golden.py stays bit for bit); the progress bar
counts work units from the start; corpus runs likewise."""
import re

import numpy as np
import pytest

import kl_estimation as kle
from kl_estimation import cost
from kl_estimation.cli import llm_main
from tiny_lms import save_pair

PROMPTS = ["a b", "b c", "c a", "a a b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))


def test_the_flagship_command_prints_its_cost_before_the_first_batch(tiny, tmp_path, monkeypatch, capsys):
    """LLM_experiments.py --p-model … --q-model … --prompts-file (4 prompts) --direction both, default proposals: the
    threshold set to 0 so that a tiny run counts as long."""
    monkeypatch.setattr(cost, "COST_LINE_SECONDS", 0.0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    code = llm_main(["--p-model", tiny[0], "--q-model", tiny[1], "--prompts-file", str(prompts), "--direction", "both",
                     "--n-samples", "16", "--batch-size", "8", "--max-new-tokens", "4", "--no-plots",
                     "--output-dir", str(tmp_path / "o")])
    out, err = capsys.readouterr()
    assert code == 0
    lines = err.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.startswith("about ")]
    assert len(said) == 1, err
    line = lines[said[0]]
    assert re.search(r": 7 prop\w* × 2 dir\w* × 4 prompts × 16 seq\w*; --proposals P ≈ \d+ s$", line), line
    assert len(line) <= 80, line
    first_batch = next(i for i, ln in enumerate(lines) if " (n=" in ln)  # the first line a finished batch updates
    assert said[0] < first_batch, err
    assert lines[0].startswith("sampling: 0/3584 token"), lines[0]  # 7 × 2 × 4 × 16 sequences × 4 tokens, at once
    assert "about " not in out


def test_a_short_run_says_nothing_and_the_api_result_holds_the_estimate(tiny, capsys):
    res = kle.estimate_kl(*tiny, PROMPTS[:2], n_samples=16, batch_size=8, max_new_tokens=4, proposals=["P", "Adaptive"],
                          progress=True)
    err = capsys.readouterr().err
    assert "about " not in err  # well under COST_LINE_SECONDS
    e = res.cost_estimate
    assert e is not None and e.seconds > 0 and e.work == 2 * 2 * 16 * 4 and e.unit == "sequence-tokens"
    assert e.probe_work == 8 * min(3, cost.PROBE_STEPS)  # the steps after the first, of the first batch
    assert e.plan == ((2, "proposals"), (2, "prompts"), (16, "sequences"))
    assert e.reduction[:2] == ("proposals", "P") and e.reduction[2] == pytest.approx(e.seconds / 2)
    assert e.line(flags=False).endswith(f"proposals='P' ≈ {cost.duration(e.seconds / 2)}")
    assert kle.estimate_kl(*tiny, PROMPTS[:2], n_samples=16, batch_size=8, max_new_tokens=4, proposals=["P"],
                           progress=False).cost_estimate is not None


def test_the_probe_changes_no_number(tiny):
    """The probe is the run's first steps, not extra draws: the records are those of a run without a meter."""
    from kl_estimation.llm.loading import load_transformers_pair
    from kl_estimation.llm.run.config import LLMConfig
    from kl_estimation.llm.run.runner import run_experiment

    cfg = LLMConfig(p_model=tiny[0], q_model=tiny[1], prompts=tuple(PROMPTS[:2]), n_samples=12, batch_size=8,
                    max_new_tokens=4, proposals=("P", "Geometric (β=0.5)"), head=0).validate()
    pair = load_transformers_pair(*tiny, prompts=cfg.prompt_set, temperature=cfg.temperature)
    a = run_experiment(pair, cfg, {}, progress=True, say=lambda e: None)
    b = run_experiment(pair, cfg, {}, progress=False)
    for da, db in zip(a["docs"], b["docs"]):
        assert da["sequences"] == db["sequences"] and da["estimates"] == db["estimates"]


@pytest.mark.parametrize("seconds,expected", [(12, "12 s"), (400, "7 min"), (2331, "39 min"), (9000, "2.5 h")])
def test_durations_and_the_line_fits_80_columns(seconds, expected):
    assert cost.duration(seconds) == expected
    e = cost.CostEstimate(seconds, ((7, "proposals"), (2, "directions"), (4, "prompts"), (1000, "sequences")), 1, "x",
                          1, 1.0, ("proposals", "P", seconds / 7))
    assert len(e.line()) <= 80 and e.line().startswith(f"about {expected}")


def test_the_meter_estimates_from_its_probe(monkeypatch):
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(cost.time, "perf_counter", lambda: next(clock))
    told = []
    m = cost.Meter(None, total=1000, probe=10, make=lambda per, done, spent: cost.CostEstimate(
        per * 1000, ((1000, "units"),), 1000, "units", done, spent), say=told.append)
    m.begin()
    m.update(4)
    assert m.estimate is None
    m.update(6)  # 10 units in 2 s: 1000 in 200 s, over COST_LINE_SECONDS
    assert m.estimate.seconds == pytest.approx(200.0) and told == [m.estimate] and m.estimate.announced


def test_a_corpus_run_prints_its_cost_and_keeps_it_in_timing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cost, "COST_LINE_SECONDS", 0.0)
    words = ("<eos>", "a", "b", "c")
    p, q = save_pair(tmp_path / "pair", words=words)
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(["a", "b", "c"], 400)))
    capsys.readouterr()
    assert llm_main(["--corpus", str(corpus), "--p-model", p, "--q-model", q, "--context", "16", "--batch-size", "4",
                     "--no-plots", "--output-dir", str(tmp_path / "o")]) == 0
    lines = capsys.readouterr().err.splitlines()
    said = [i for i, ln in enumerate(lines) if ln.startswith("about ")]
    assert len(said) == 1 and " 25 windows × 2 model passes; --n-windows " in lines[said[0]], lines
    assert lines[0].startswith("corpus windows, P: 0/50 window"), lines
    res = kle.CorpusResult.load(tmp_path / "o")
    assert res.timing["cost_estimate"]["work"] == 50 and res.timing["cost_estimate"]["probe_work"] == 4  # batch 2


def test_the_probe_leaves_out_the_first_step(monkeypatch):
    """The first step reads the prompts and pays for every first call: timed, it doubled a short real run's estimate
    (SmolLM2 on CPU). The probe times the steps after it."""
    clock = iter([0.0, 30.0, 32.0])  # begin; the first step done at 30 s; the probe done 2 s later
    monkeypatch.setattr(cost.time, "perf_counter", lambda: next(clock))
    m = cost.Meter(None, total=1000, probe=10, make=lambda per, done, spent: cost.CostEstimate(
        per * 1000, ((1000, "units"),), 1000, "units", done, spent), warmup=5)
    m.begin()
    m.update(5)
    m.update(10)
    assert m.estimate.seconds == pytest.approx(200.0) and m.estimate.probe_work == 10
