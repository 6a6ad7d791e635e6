"""Every console line fits an 80-column terminal (COLUMNS=80): the three scripts — a synthetic run, a sampled LLM run of
both directions over a prompt set, a corpus run with several candidates, figures drawn from a run folder — print no
line longer than the terminal, on stdout or stderr (progress lines included). Prose is wrapped, wide tables are split,
nothing is cut with "…" where the cut would hide a number. Numbers are shown to the digits their SE supports.

The fast tests call the scripts' functions in this process (tiny models, few samples); the slow one runs the scripts
themselves as a user would, figures included."""
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from kl_estimation import report
from kl_estimation.cli import llm_main, synthetic_main
from tiny_lms import save_pair

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = 80
WORDS = ("<eos>", "<s>", "a", "b", "c", "d", "e")


def too_long(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if len(ln) > COLUMNS]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("width")
    p, q = save_pair(root / "a", words=WORDS)
    q2 = save_pair(root / "b", words=WORDS, noise=0.8)[1]
    (root / "prompts.txt").write_text("a b\nc d\nb\ne a c\n")
    (root / "c.txt").write_text(" ".join(np.random.default_rng(0).choice(list("abcde"), 200)))
    return root, p, q, q2


def argv_of(root, p, q, q2, out):
    return {
        "synthetic": ["--n-samples", "100", "--n-repeats", "2", "--output-dir", str(out / "syn")],
        "sequence": ["--sequence", "--n-samples", "32", "--n-repeats", "2", "--vocab-size", "30",
                     "--max-new-tokens", "5", "--output-dir", str(out / "seq")],
        "sampled": ["--p-model", p, "--q-model", q, "--prompts-file", str(root / "prompts.txt"), "--direction", "both",
                    "--n-samples", "16", "--max-new-tokens", "2", "--output-dir", str(out / "llm")],
        "corpus": ["--corpus", str(root / "c.txt"), "--p-model", p, "--q-model", q, q2, "--context", "16",
                   "--n-bootstrap", "50", "--output-dir", str(out / "corpus")],
    }


@pytest.mark.parametrize("kind", ["synthetic", "sequence", "sampled", "corpus"])
def test_every_line_fits_80_columns(kind, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", str(COLUMNS))
    argv = argv_of(*models, tmp_path)[kind] + ["--no-plots"]
    if kind in ("synthetic", "sequence"):
        argv += ["--families", "zipf"]
    assert (synthetic_main if kind in ("synthetic", "sequence") else llm_main)(argv) == 0
    out, err = capsys.readouterr()
    assert not too_long(out) and not too_long(err), (too_long(out) + too_long(err))[:5]
    if kind == "synthetic":  # the wide table is split in two, both with the methods' names; messages never cut
        assert out.count("method (! = flagged)") == 2 and "…" not in out
    if kind == "sampled":
        assert out.count("Jeffreys KL(P‖Q) + KL(Q‖P)") == 5 and "Over 4 prompts" in out
    if kind == "corpus":  # llama.cpp's labels as it prints them; its 125-column per-window table only in llama.txt
        assert out.count("Mean    KLD: ") == 2 and "chunk             PPL" not in out
        assert "chunk             PPL" in (tmp_path / "corpus" / "candidates").joinpath(
            next(p.name for p in (tmp_path / "corpus" / "candidates").iterdir()), "llama.txt").read_text()


def test_wide_terminals_keep_one_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "120")
    assert synthetic_main(["--n-samples", "100", "--n-repeats", "2", "--families", "zipf", "--no-plots",
                           "--output-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert out.count("method (! = flagged)") == 1 and max(map(len, out.splitlines())) <= 120


def test_jeffreys_line_digits_from_its_se():
    j = dict(estimate=32.4544, std_error=1.2, ci_low=30.10, ci_high=34.81, std_error_population=0.312,
             ci_population_low=7.7061, ci_population_high=9.1852, unit="nats per sequence",
             forward=dict(proposal="P", estimator="RB"), reverse=dict(proposal="Q", estimator="RB"))
    line = report.jeffreys_line(j, columns=200)
    assert "= 32.5 nats per sequence (SE 1.2, 95% CI [30.1, 34.8]" in line
    assert "SE 0.31, 95% CI [7.71, 9.19]" in line and "32.4544" not in line
    assert max(map(len, report.jeffreys_line(j, columns=80).splitlines())) <= 80
    j["estimate"] = math.nan
    j["flag"] = "no reverse row"
    assert report.jeffreys_line(j).startswith("Jeffreys KL(P‖Q) + KL(Q‖P): none")


def test_corpus_block_digits_from_the_clustered_se():
    from kl_estimation.llm.corpus import stats

    rng = np.random.default_rng(1)
    W, T = 12, 16
    arrays = {k: rng.gamma(2.0, 0.1, (W, T)) for k in ("kl_forward", "kl_reverse")}
    arrays.update(logp_p=-rng.gamma(2.0, 1.0, (W, T)), logp_q=-rng.gamma(2.0, 1.0, (W, T)),
                  top1_agree=rng.random((W, T)) < 0.7, delta_p=rng.normal(0, 0.1, (W, T)), mask=np.ones((W, T), bool))
    s = stats.summarize(arrays)
    text = stats.format_llama(s)
    extra = text.split("====== kl_estimation")[1]
    assert all(len(ln) <= COLUMNS for ln in extra.splitlines())
    m = s["means"]["kl_forward"]
    d = report.se_decimals(m["se_cluster"])
    row = next(ln for ln in extra.splitlines() if ln.startswith("KL(base||Q) "))
    assert row.split()[1] == f"{m['mean']:.{d}f}"


@pytest.mark.slow
def test_the_scripts_fit_80_columns(models, tmp_path):
    """The three scripts as a user runs them (figures included), and visualize_proposals.py on a run folder."""
    env = {**os.environ, "COLUMNS": str(COLUMNS), "PYTHONPATH": str(ROOT / "src")}
    out = Path(tempfile.mkdtemp(prefix="w", dir="/tmp"))  # paths are printed whole: keep them short
    argv = argv_of(*models, out)
    runs = [["Synthetic_tests.py", *argv["synthetic"]], ["LLM_experiments.py", *argv["sampled"]],
            ["LLM_experiments.py", *argv["corpus"]], ["visualize_proposals.py", str(out / "llm")]]
    for run in runs:
        p = subprocess.run([sys.executable, *run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        long = too_long(p.stdout) + too_long(p.stderr)
        assert not long, (run[0], long[:5])
    shutil.rmtree(out)
