"""The Python API, tested like the CLI: estimate_kl against enumeration, loaded models, files only when asked,
errors that name parameters; the package namespace."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

import kl_estimation as kle
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from tiny_lms import save_pair

PROMPTS = ["a b", "c"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("api"), seed=4)


@pytest.fixture(scope="module")
def truth(tiny):
    pair = load_transformers_pair(*tiny, prompts=PROMPTS, temperature=1.0)
    return [enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), 3, prompt_index=i)["kl"]
            for i in range(len(PROMPTS))]


def test_estimate_kl_from_paths_agrees_with_enumeration_and_writes_nothing(tiny, truth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = kle.estimate_kl(*tiny, PROMPTS, n_samples=800, max_new_tokens=3, proposals=("P", "Fixed mixture (λ=0.5)"),
                          temperature=1.0, seed=1, batch_size=400)
    assert list(tmp_path.iterdir()) == []
    rec = res.recommended
    assert rec is not None and not rec.flag and rec.ci[0] < rec.estimate < rec.ci[1]
    assert abs(rec.estimate - np.mean(truth)) < 5 * rec.std_error
    assert len(res.rows) == 9 and not res.rows[0].flag  # P: MC, RB, RB+CV, k3 (its SNIS is MC); the other 5
    assert sum(r.recommended for r in res.rows) == 1 and res.recommended.recommended
    assert [p["prompt"] for p in res.per_prompt] == [0, 1] and res.per_prompt[1]["text"] == "c"
    for p, kl in zip(res.per_prompt, truth):
        assert abs(p["recommended"].estimate - kl) < 5 * p["recommended"].std_error
    df = res.to_pandas()
    assert {"proposal", "estimator", "estimate", "std_error", "ci_low", "ci_high", "flag"} <= set(df.columns)
    assert len(res.to_pandas(per_prompt=True)) == 18
    json.dumps(res.to_dict(), allow_nan=True)  # plain data
    assert "RB+CV" in str(res) and "proposal" in str(res)


def test_loaded_models_give_the_same_rows_as_paths(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    q = AutoModelForCausalLM.from_pretrained(tiny[1]).eval()
    tok = AutoTokenizer.from_pretrained(tiny[0])
    a = kle.estimate_kl(p, q, "a b", tokenizer=tok, n_samples=64, max_new_tokens=3, temperature=0.7, device="cpu")
    b = kle.estimate_kl(*tiny, "a b", n_samples=64, max_new_tokens=3, temperature=0.7, device="cpu")
    assert [(r.estimator, r.estimate) for r in a.rows] == [(r.estimator, r.estimate) for r in b.rows]
    assert a.per_prompt == [] and math.isnan(a.rows[0].std_error_population)


def test_output_folder_is_written_and_resumable(tiny, tmp_path):
    kw = dict(n_samples=32, max_new_tokens=3, batch_size=16, proposals="P", output_dir=str(tmp_path / "run"))
    a = kle.estimate_kl(*tiny, PROMPTS, **kw)
    assert (tmp_path / "run" / "summary.csv").exists() and (tmp_path / "run" / "p.json").exists()
    with pytest.raises(ValueError, match="^output_dir: .* already holds results"):
        kle.estimate_kl(*tiny, PROMPTS, **kw)
    b = kle.estimate_kl(*tiny, PROMPTS, resume=True, **kw)
    assert a.to_dict()["rows"] == b.to_dict()["rows"]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(n_samples=1), "^n_samples: must be an integer ≥ 2"),
    (dict(n_sample=10), "^n_sample: not a setting of an LLM run; did you mean 'n_samples'"),
    (dict(max_new_tokens=-1), "^max_new_tokens: "),
    (dict(temperature=0.0), "^temperature: "),
    (dict(proposals=("Nope",)), "^proposals: unknown proposal 'Nope'"),
    (dict(prompts=[]), "^prompts: "),
    (dict(prompts=["ok", " "]), "^prompts: prompt 1 is empty"),
    (dict(device="cuda:9"), "^device: "),
])
def test_errors_name_the_parameter(tiny, kwargs, needle):
    args = dict(prompts=PROMPTS, n_samples=4, max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        kle.estimate_kl(*tiny, args.pop("prompts"), **args)


def test_loaded_models_need_a_tokenizer(tiny):
    from transformers import AutoModelForCausalLM

    p = AutoModelForCausalLM.from_pretrained(tiny[0])
    with pytest.raises(ValueError, match="^tokenizer: "):
        kle.estimate_kl(p, p, "a")
    with pytest.raises(ValueError, match="^q_model: "):
        kle.estimate_kl(p, tiny[1], "a")


def test_namespace_is_documented_and_light():
    import subprocess
    import sys

    for name in kle.__all__:
        assert getattr(kle, name).__doc__, name
        assert name in kle.__doc__, f"{name} is exported but not described in the package docstring"
    code = "import sys, kl_estimation; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.slow
def test_cli_and_api_give_the_same_numbers_by_default(tiny, tmp_path, capsys):
    """One set of defaults: only the models and the output folder are given, on both sides."""
    from kl_estimation.cli import llm_main

    assert llm_main(["--p-model", tiny[0], "--q-model", tiny[1], "--output-dir", str(tmp_path / "cli"),
                     "--no-plots"]) == 0
    capsys.readouterr()
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    api = kle.estimate_kl(Path(tiny[0]), Path(tiny[1]), progress=False)  # Path objects are model folders
    assert [(r["proposal"], r["estimator"], r["estimate"]) for r in summary["rows"]] == \
        [(r.proposal, r.estimator, r.estimate) for r in api.rows]
    assert summary["config"]["n_samples"] == 1000 and summary["config"]["max_new_tokens"] == 20


def test_api_inputs_behave_as_a_user_expects(tiny, tmp_path):
    one = kle.estimate_kl(*tiny, "a b", proposals="P", n_samples=8, max_new_tokens=2, progress=False)
    assert {r.proposal for r in one.rows} == {"P"}  # one proposal name, not its letters
    default = kle.estimate_kl(*tiny, proposals="P", n_samples=8, max_new_tokens=2, progress=False)
    assert default.config["prompts"] == ["An interesting fact is that"]
    f = tmp_path / "prompts.txt"
    f.write_text("a\nb c\n")
    from_file = kle.estimate_kl(*tiny, f, proposals="P", n_samples=8, max_new_tokens=2, progress=False)
    assert from_file.config["prompts"] == ["a", "b c"]
    with pytest.raises(ValueError, match="^prompts: a string, a list of strings or a path"):
        kle.estimate_kl(*tiny, 42, proposals="P")
    with pytest.raises(ValueError, match=r"^max_new_tokens: .* allowed here: `max_new_tokens` ≤ 5$"):
        kle.estimate_kl(*tiny, "a " * 60, proposals="P", n_samples=8, max_new_tokens=10, progress=False)
    with pytest.raises(ValueError, match=r"^prompts: prompt 1 alone is 70 tokens; the models take 64"):
        kle.estimate_kl(*tiny, ["a", "a " * 70], proposals="P", n_samples=8, max_new_tokens=2, progress=False)


def test_default_pair_is_public():
    assert callable(kle.default_pair) and "offline default pair" in kle.default_pair.__doc__


def test_q_adapter_alone_puts_q_on_p_at_p_revision():
    """Q = P's base + the adapter: the same base at the same revision (else the base loads twice, at two revisions)."""
    from kl_estimation.llm.corpus.config import CorpusConfig

    for cls in (kle.LLMConfig, CorpusConfig):
        cfg = cls(p_model="org/base", p_revision="abc123", q_adapter="./lora")
        assert (cfg.q_model, cfg.q_revision) == ("org/base", "abc123"), cls
    with pytest.raises(ValueError, match="^contxt: not a setting of a corpus run; did you mean 'context'"):
        CorpusConfig.from_settings(contxt=256)


def test_console_files_and_to_pandas_hold_the_same_interval(tiny, tmp_path, capsys):
    """Issue 22: the console, summary.json, summary.csv and to_pandas() give one interval. With two prompts the
    population interval (t, 1 df) reaches below 0: it is shown as stored, never clipped, and the line says so."""
    import csv
    import re

    from kl_estimation import report
    from kl_estimation.cli import llm_main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    kw = {"n_samples": 200, "max_new_tokens": 3, "proposals": "P"}
    assert llm_main(["--p-model", tiny[0], "--q-model", tiny[1], "--prompts-file", str(prompts), "--n-samples", "200",
                     "--max-new-tokens", "3", "--proposals", "P", "--no-plots",
                     "--output-dir", str(tmp_path / "o")]) == 0
    console = " ".join(capsys.readouterr().out.split())
    res = kle.estimate_kl(*tiny, PROMPTS, progress=False, **kw)
    rec = res.recommended.to_dict(records=False)
    assert rec["ci_population_low"] < 0  # the case that was clipped on the console only
    key = ("proposal", "estimator", "direction")
    stored = next(r for r in json.loads((tmp_path / "o" / "summary.json").read_text())["rows"]
                  if all(r[k] == rec[k] for k in key))
    with open(tmp_path / "o" / "summary.csv") as fh:
        table = next(r for r in csv.DictReader(fh) if all(r[k] == rec[k] for k in key))
    frame = res.to_pandas().set_index(list(key)).loc[tuple(rec[k] for k in key)]
    for col in ("estimate", "std_error", "ci_low", "ci_high", "std_error_population", "ci_population_low",
                "ci_population_high"):
        assert stored[col] == float(table[col]) == frame[col] == rec[col], col
    shown = re.search(r"for the population the prompts were drawn from SE \S+, 95% CI \[(\S+), (\S+)\]", console)
    d = report.se_decimals(rec["std_error_population"])
    assert abs(float(shown[1]) - rec["ci_population_low"]) <= 0.5 * 10 ** -d and float(shown[1]) < 0
    assert abs(float(shown[2]) - rec["ci_population_high"]) <= 0.5 * 10 ** -d
    assert report.BELOW_ZERO in console and "clipped at 0" not in console


def test_a_run_folder_loads_back_into_the_same_result(tiny, tmp_path):
    from kl_estimation.runio import jsonable

    res = kle.estimate_kl(*tiny, PROMPTS, n_samples=32, max_new_tokens=3, batch_size=16, proposals=("P", "Adaptive"),
                          direction="both", progress=False, output_dir=str(tmp_path / "run"))
    back = kle.KLResult.load(tmp_path / "run")
    assert jsonable(back.to_dict()) == jsonable(res.to_dict())
    assert jsonable(back.docs) == jsonable(res.docs) and back.directions == ("forward", "reverse")
    assert jsonable(back.to_pandas().to_dict("records")) == jsonable(res.to_pandas().to_dict("records"))
    with pytest.raises(ValueError, match="^folder: .* is not a complete LLM run folder"):
        kle.KLResult.load(tmp_path)
