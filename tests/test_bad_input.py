"""The bad-input table (issue 23): what a new user mistypes in the three scripts — Synthetic_tests.py,
LLM_experiments.py (sampled and corpus runs) and visualize_proposals.py. Each case: exit status 2, exactly one line on
stderr naming the flag, no traceback, nothing written (neither the output folder nor a default folder under the
working directory). In-process (cli.*_main with capsys) so the table is fast; a handful through the scripts
themselves."""
import subprocess
import sys
from pathlib import Path

import pytest

from kl_estimation.cli import llm_main, synthetic_main, visualize_main
from tiny_lms import save_pair

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("<eos>", "a", "b", "c")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Everything the cases point at: a tiny model pair, one with another tokenizer, corpora, prompt files, a synthetic
    run folder stand-in."""
    d = tmp_path_factory.mktemp("bad")
    p, q = save_pair(d / "pair", words=WORDS, n_positions=64)
    other = save_pair(d / "other", words=WORDS + ("d",))[1]
    (d / "corpus.txt").write_text(" ".join(["a b c"] * 60))
    (d / "short.txt").write_text("a b c")
    (d / "empty.txt").write_text(" \n\n")
    (d / "corpus.pdf").write_text("a b c")
    (d / "empty_prompts.txt").write_text("\n\n")
    (d / "prompts.txt").write_text("a b\nb c\n")
    (d / "nodoc.jsonl").write_text('{"body": "a b c"}\n')
    (d / "not_json.jsonl").write_text("a b c\n")
    (d / "a_file").write_text("x")
    (d / "empty_folder").mkdir()
    return {"p": p, "q": q, "other": other, **{k: str(d / f) for k, f in (
        ("corpus", "corpus.txt"), ("short", "short.txt"), ("empty", "empty.txt"), ("pdf", "corpus.pdf"),
        ("empty_prompts", "empty_prompts.txt"), ("prompts", "prompts.txt"), ("nodoc", "nodoc.jsonl"),
        ("not_json", "not_json.jsonl"), ("a_file", "a_file"), ("empty_folder", "empty_folder"))}}


# (script, arguments with {placeholders} from `files`, the flag the line must name)
SYNTHETIC = [
    (["--vocab-size", "1"], "--vocab-size"),
    (["--vocab-size", "abc"], "--vocab-size"),
    (["--vocab-size", "10", "--families", "mixture"], "--vocab-size"),
    (["--n-samples", "1"], "--n-samples"),
    (["--n-samples", "-5"], "--n-samples"),
    (["--n-samples", "1e3"], "--n-samples"),
    (["--n-repeats", "0"], "--n-repeats"),
    (["--divergence", "extreme"], "--divergence"),
    (["--families", "pareto"], "--families"),
    (["--alpha-values", "1.5"], "--alpha-values"),
    (["--alpha-values", "nan"], "--alpha-values"),
    (["--alpha-values", "inf"], "--alpha-values"),
    (["--rb-top-k", "-1"], "--rb-top-k"),
    (["--rb-top-k", "3000"], "--rb-top-k"),
    (["--seed", "-3"], "--seed"),
    (["--bogus"], "--bogus"),
    (["--sequence", "--order", "3"], "--order"),
    (["--sequence", "--sampler", "bogus"], "--sampler"),
    (["--sequence", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["--sequence", "--threads", "0"], "--threads"),
    (["--order", "2"], "--order"),  # a sequence-run flag without --sequence
    (["--sampler", "sobol"], "--sampler"),
    (["--threads", "2"], "--threads"),
]

VISUALIZE = [
    (["{empty_folder}/missing"], "is not a folder"),
    (["{empty_folder}"], "is not a run folder"),
    (["{a_file}"], "is not a folder"),
    ([], "run_folder"),
    (["{empty_folder}", "--bogus"], "--bogus"),
]

SAMPLED = [
    (["--n-samples", "1"], "--n-samples"),
    (["--n-samples", "abc"], "--n-samples"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "0"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature: must be a finite number > 0"),
    (["--temperature", "-1"], "--temperature"),
    (["--prompt", " "], "--prompt"),
    (["--proposals", "Nope"], "--proposals"),
    (["--proposals", "P", "P"], "--proposals"),
    (["--proposals", "Geometric (β=-1)"], "--proposals"),
    (["--proposals", "Geometric(0.5) [prefix-aware]"], "--proposals"),
    (["--batch-size", "0"], "--batch-size"),
    (["--dtype", "int8"], "--dtype"),
    (["--device", "cuda:7"], "--device"),
    (["--device", "tpu"], "--device"),
    (["--direction", "sideways"], "--direction"),
    (["--sampler", "bogus"], "--sampler"),
    (["--sampler", "sobol", "--batch-size", "64"], "--batch-size"),
    (["--head", "-1"], "--head"),
    (["--head", "8", "--sampler", "sobol", "--batch-size", "2"], "--head"),
    (["--seed", "-1"], "--seed"),
    (["--threads", "0"], "--threads"),
    (["--n-prompts", "0"], "--n-prompts"),
    (["--resume", "--overwrite"], "--resume"),
    (["--prompts-file", "{empty_prompts}"], "--prompts-file"),
    (["--prompts-file", "{empty_folder}/none.txt"], "--prompts-file"),
    (["--max-new-tokens", "1000"], "--max-new-tokens"),
    (["--bogus"], "--bogus"),
    (["--context", "32"], "--n-samples: a setting of sampled runs; --context makes this a corpus run"),
    (["--text-field", "body"], "--text-field"),
    (["--q-model", "{other}"], "--q-model: its tokenizer differs from --p-model's"),
    (["--q-model", "/nonexistent/model"], "--q-model"),
]

NO_PAIR = [  # cases without the base pair
    (["--p-model", "{p}"], "--q-model"),
    (["--p-model", "/nonexistent/model", "--q-model", "{q}"], "--p-model"),
    (["--output-dir", "{a_file}/sub", "--p-model", "{p}", "--q-model", "{q}"], "--output-dir"),
    (["--context", "256", "--n-samples", "10"], "--n-samples: a setting of sampled runs; --context makes this a "
                                                "corpus run"),
]

CORPUS = [
    (["--corpus", "{empty}"], "--corpus"),
    (["--corpus", "{empty_folder}/none.txt"], "--corpus"),
    (["--corpus", "{pdf}"], "--corpus"),
    (["--corpus", "{short}"], "--corpus"),
    (["--corpus", "{nodoc}"], "--text-field"),
    (["--corpus", "{not_json}"], "--corpus"),
    (["--corpus", "{corpus}", "--n-samples", "100"], "--n-samples: a setting of sampled runs; --corpus makes this a "
                                                     "corpus run"),
    (["--corpus", "{corpus}", "--temperature", "0.5"], "--temperature"),
    (["--corpus", "{corpus}", "--proposals", "P"], "--proposals"),
    (["--corpus", "{corpus}", "--direction", "both"], "--direction"),
    (["--corpus", "{corpus}", "--chat-template"], "--chat-template"),
    (["--corpus", "{corpus}", "--prompts-file", "{prompts}"], "--prompts-file"),
    (["--corpus", "{corpus}", "--head", "0"], "--head"),
    (["--corpus", "{corpus}", "--context", "2"], "--context"),
    (["--corpus", "{corpus}", "--context", "100"], "--context"),
    (["--corpus", "{corpus}", "--score", "half"], "--score"),
    (["--corpus", "{corpus}", "--cluster-by", "page"], "--cluster-by"),
    (["--corpus", "{corpus}", "--base-storage", "int4"], "--base-storage"),
    (["--corpus", "{corpus}", "--token-ids", "{corpus}"], "--token-ids"),
    (["--corpus", "{corpus}", "--n-windows", "0"], "--n-windows"),
    (["--corpus", "{corpus}", "--n-bootstrap", "0"], "--n-bootstrap"),
    (["--corpus", "{corpus}", "--batch-size", "0"], "--batch-size"),
    (["--corpus", "{corpus}", "--save-base-dtype", "bfloat16"], "--save-base-dtype"),
    (["--corpus", "{corpus}", "--q-model", "{other}"], "--q-model: its tokenizer differs from --p-model's"),
    (["--corpus", "{corpus}", "--q-model", "{q}", "{q}"], "--q-model"),
    (["--corpus", "{corpus}", "--group-field", "kind"], "--group-field"),
]


def fill(args, files):
    return [a.format(**files) for a in args]


def call(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


def check(code, out, err, needle, before, folder, cwd):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0], lines[0]
    assert not folder.exists(), "wrote the output folder"
    assert sorted(cwd.iterdir()) == before, "wrote under the working directory"


@pytest.mark.parametrize("args,needle", SYNTHETIC, ids=[" ".join(a) for a, _ in SYNTHETIC])
def test_synthetic(args, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, o, e = call(synthetic_main, args + ["--no-plots", "--output-dir", str(out)], capsys)
    check(code, o, e, needle, [], out, tmp_path)


@pytest.mark.parametrize("args,needle", VISUALIZE, ids=[" ".join(a) for a, _ in VISUALIZE])
def test_visualize(args, needle, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, o, e = call(visualize_main, fill(args, files), capsys)
    check(code, o, e, needle, [], tmp_path / "out", tmp_path)
    assert not (Path(files["empty_folder"]) / "plots").exists()


@pytest.mark.parametrize("args,needle", SAMPLED, ids=[" ".join(a) for a, _ in SAMPLED])
def test_sampled(args, needle, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    base = ["--p-model", files["p"], "--q-model", files["q"], "--n-samples", "4", "--max-new-tokens", "2",
            "--no-plots", "--output-dir", str(out)]
    args = fill(args, files)
    if "--q-model" in args:
        i = base.index("--q-model")
        base = base[:i] + base[i + 2:]
    code, o, e = call(llm_main, base + args, capsys)
    check(code, o, e, needle, [], out, tmp_path)


@pytest.mark.parametrize("args,needle", NO_PAIR, ids=[" ".join(a) for a, _ in NO_PAIR])
def test_sampled_without_the_pair(args, needle, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, o, e = call(llm_main, fill(args, files) + ["--no-plots"], capsys)
    check(code, o, e, needle, [], tmp_path / "out", tmp_path)


@pytest.mark.parametrize("args,needle", CORPUS, ids=[" ".join(a) for a, _ in CORPUS])
def test_corpus(args, needle, files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    args = fill(args, files)
    base = ["--p-model", files["p"], *([] if "--q-model" in args else ["--q-model", files["q"]]), "--context", "16",
            "--no-plots", "--output-dir", str(out)]
    code, o, e = call(llm_main, base + args, capsys)
    check(code, o, e, needle, [], out, tmp_path)


SCRIPTS = [
    ("Synthetic_tests.py", ["--n-repeats", "0"], "--n-repeats"),
    ("LLM_experiments.py", ["--context", "256", "--n-samples", "10"], "--n-samples: a setting of sampled runs"),
    ("LLM_experiments.py", ["--temperature", "inf"], "--temperature: must be a finite number > 0"),
    ("LLM_experiments.py", ["--corpus", "{empty}", "--p-model", "{p}", "--q-model", "{q}"], "--corpus"),
    ("visualize_proposals.py", ["{empty_folder}/missing"], "is not a folder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script,args,needle", SCRIPTS, ids=[s + " " + " ".join(a) for s, a, _ in SCRIPTS])
def test_scripts(script, args, needle, files, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / script), *fill(args, files)], capture_output=True, text=True,
                       cwd=tmp_path)
    check(r.returncode, r.stdout, r.stderr, needle, [], tmp_path / "out", tmp_path)


def test_the_table_is_large_enough():
    assert len(SYNTHETIC) + len(VISUALIZE) + len(SAMPLED) + len(NO_PAIR) + len(CORPUS) + len(SCRIPTS) >= 60


def test_the_api_and_the_command_line_say_a_mode_mixup_alike(files, capsys):
    """One rule for both (settings.other_mode over the two config classes): the API names the parameter, the
    command line the flag and the flag that chose the mode."""
    import kl_estimation as kle
    from kl_estimation.cli import as_flag

    with pytest.raises(ValueError) as api:
        kle.corpus_kl(files["p"], files["q"], files["corpus"], n_samples=100)
    assert str(api.value).startswith("n_samples: a setting of sampled runs; not of a corpus run, which scores")
    with pytest.raises(ValueError, match="^context: a setting of corpus runs; not of an LLM run, which samples"):
        kle.estimate_kl(files["p"], files["q"], "a b", context=256)
    code, _, err = call(llm_main, ["--corpus", files["corpus"], "--n-samples", "100"], capsys)
    tail = str(api.value).split(", which ", 1)[1]
    assert code == 2 and err.strip().endswith("--n-samples: a setting of sampled runs; --corpus makes this a corpus "
                                              f"run, which {tail}")
    assert as_flag(str(api.value)).startswith("--n-samples: a setting of sampled runs")


def test_a_proposal_written_with_its_value_alone_is_that_proposal():
    """'Geometric(0.5)' is Geometric (β=0.5) (each family has one parameter), not "did you mean 'Geometric (β=0.3)'";
    a misspelt family keeps the value given in its suggestion."""
    from kl_estimation.llm.run.config import LLMConfig

    cfg = LLMConfig(proposals=("P", "Geometric(0.5)", "Alpha-mixture (0.7) [prefix-aware]")).validate()
    assert cfg.proposals == ("P", "Geometric (β=0.5)", "Alpha-mixture (α=0.7) [prefix-aware]")
    with pytest.raises(ValueError, match=r"did you mean 'Geometric \(β=0.5\)'\?"):
        LLMConfig(proposals=("Geometrik(0.5)",)).validate()
    with pytest.raises(ValueError, match="^proposals: Geometric β must be in"):
        LLMConfig(proposals=("Geometric(-2)",)).validate()
