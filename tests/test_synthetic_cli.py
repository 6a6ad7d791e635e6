"""Synthetic_tests.py from the outside: error paths, run folder contents, determinism."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_checks import call
from kl_estimation.cli import synthetic_main

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--vocab-size", "300", "--n-samples", "50", "--n-repeats", "3", "--divergence", "low", "--no-plots"]


def run_main(argv, capsys):
    return call(synthetic_main, argv, capsys)


@pytest.mark.parametrize("argv,flag", [
    (["--vocab-size", "1"], "--vocab-size"),
    (["--vocab-size", "150", "--families", "zipf-cutoff"], "--vocab-size"),
    (["--vocab-size", "10", "--families", "mixture"], "--vocab-size"),
    (["--vocab-size", "abc"], "--vocab-size"),
    (["--n-samples", "1"], "--n-samples"),
    (["--n-repeats", "0"], "--n-repeats"),
    (["--divergence", "extreme"], "--divergence"),
    (["--families", "pareto"], "--families"),
    (["--alpha-values", "1.5"], "--alpha-values"),
    (["--alpha-values", "-0.2"], "--alpha-values"),
    (["--alpha-values", "nan"], "--alpha-values"),
    (["--rb-top-k", "-1"], "--rb-top-k"),
    (["--rb-top-k", "3000"], "--rb-top-k"),
    (["--seed", "-3"], "--seed"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_input_one_line_exit_2_nothing_written(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(argv + ["--no-plots", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "results").exists()


def test_unwritable_output_dir(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run_main(SMALL + ["--output-dir", str(blocker / "sub")], capsys)
    assert code == 2 and "--output-dir" in err and len(err.strip().splitlines()) == 1


def test_script_exit_status_and_single_line():
    p = subprocess.run([sys.executable, str(ROOT / "Synthetic_tests.py"), "--n-repeats", "0"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--n-repeats" in p.stderr


def test_run_folder_contents(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = run_main(SMALL + ["--output-dir", str(out), "--alpha-values", "0.5"], capsys)
    assert code == 0
    assert f"run folder: {out}" in stdout and "true KL(P‖Q)" in stdout and "top 5: exact variance" in stdout
    assert max(len(line) for line in stdout.splitlines()) <= 120
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert cfg["seed"] == 0 and cfg["vocab_size"] == 300 and cfg["versions"]["numpy"]
    assert [(p["family"], p["divergence"]) for p in res["pairs"]] == [
        ("zipf", "low"), ("zipf-cutoff", "low"), ("mixture", "low")]
    npz = np.load(out / "distributions.npz")
    for p in res["pairs"]:
        assert p["true_kl"] > 0 and p["theoretical_variance"] > 0
        assert set(p["rankings"]) == {"by_accuracy", "by_variance", "by_exact_variance", "by_combined"}
        key = f"{p['family']}/{p['divergence']}"
        P, Q = npz[f"{key}/P"], npz[f"{key}/Q"]
        assert p["true_kl"] == pytest.approx(float(np.sum(P * np.log(P / Q))), rel=1e-12)
        for m in p["methods"]:
            assert len(m["estimates"]) == 3 and m["exact_variance"] >= 0
            for field in ("name", "abs_error", "rel_error_pct", "variance_reduction_exact_pct", "combined_score",
                          "mse", "bias", "ess_pct", "max_weight", "khat", "std_errors", "flags"):
                assert field in m
            r = npz[f"{key}/r/{m['name']}"]
            assert r.shape == P.shape and r.sum() == pytest.approx(1.0)
            for ranking in p["rankings"].values():
                assert m["name"] in ranking
    import csv
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == sum(len(p["methods"]) for p in res["pairs"])


def test_degenerate_method_never_crowned(capsys, tmp_path):
    """The issue's example: Exp family β=5 looks calm in a 300-sample run while its exact variance is enormous."""
    out = tmp_path / "run"
    code, stdout, _ = run_main(["--no-plots", "--output-dir", str(out), "--families", "zipf"], capsys)
    assert code == 0
    p = json.loads((out / "results.json").read_text())["pairs"][0]
    m = next(m for m in p["methods"] if m["name"] == "Exponential family (β=5)")
    assert m["exact_variance"] > 1e6 * p["theoretical_variance"]
    assert any(f["code"] == "SAMPLE_VAR_COLLAPSE" and "degenerate" in f["message"] for f in m["flags"])
    unflagged = [x["name"] for x in p["methods"] if not x["flags"]]
    for ranking in p["rankings"].values():
        assert ranking.index("Exponential family (β=5)") >= len(unflagged)
    assert "Exponential family (β=5) — SAMPLE_VAR_COLLAPSE: degenerate weights" in stdout


def test_same_seed_same_results(capsys, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run_main(SMALL + ["--output-dir", str(a)], capsys)[0] == 0
    assert run_main(SMALL + ["--output-dir", str(b)], capsys)[0] == 0
    assert run_main(SMALL + ["--output-dir", str(c), "--seed", "1"], capsys)[0] == 0
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    assert (a / "results.json").read_bytes() != (c / "results.json").read_bytes()


def test_narrowing_families_keeps_numbers(capsys, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_main(SMALL + ["--output-dir", str(a)], capsys)
    run_main(SMALL + ["--output-dir", str(b), "--families", "mixture"], capsys)
    pa = json.loads((a / "results.json").read_text())["pairs"][2]
    pb = json.loads((b / "results.json").read_text())["pairs"][0]
    assert pa == pb


def test_default_timestamped_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_main(SMALL, capsys)
    assert code == 0
    runs = list((tmp_path / "results" / "synthetic").iterdir())
    assert len(runs) == 1 and (runs[0] / "results.json").exists()
