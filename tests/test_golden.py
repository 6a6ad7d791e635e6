"""Golden outputs: every number and flag code a run saves is unchanged by refactors of the result types (issue 22).

Three small runs — the synthetic single-token run, the toy Markov ``--sequence`` run and a tiny-LM LLM run of both
directions over a 2-prompt set — are written to a folder; every number, every ``flag`` string and every flag code in
their saved files (results.json / summary.json / summary.csv) is compared with tests/golden/<name>.json, bit for bit.
Words (flag messages, reasons, advice) are left out: their wording may change where rendering must. Torch's CPU kernels
vectorise by the CPU's capability (AVX2, AVX-512), which changes the last bits: bit for bit on one kind of CPU; across
kinds, within 1e-12 for the float64 sequence run and 1e-3 (relative or absolute) for the LLM runs, whose float32
rounding is amplified by intervals over two prompts and control-variate fits to 8 sequences (measured: 2e-4 between
an AVX2 and an AVX-512 CPU). Flag codes and every bool stay exact.
Regenerate deliberately with ``GOLDEN_UPDATE=1 pytest tests/test_golden.py`` (the sequence and n = 60 cases are
marked slow: CI runs them).
"""
import csv
import json
import math
import os
from pathlib import Path

import pytest

from kl_estimation.cli import llm_main, synthetic_main
from tiny_lms import save_pair

GOLDEN = Path(__file__).parent / "golden"
WORDS = {"message", "reason", "advice", "covers", "versions", "text", "se_method", "std_error_method", "unit_note",
         "elapsed_s", "seconds", "time_s", "created", "output_dir", "p_model", "q_model", "models", "folder",
         "command", "text_start", "run_folder", "started", "finished", "threads"}


def flatten(x, path="", out=None) -> dict:
    """{path: value} of every number, bool and code-like string (flag, code) under x; words left out."""
    out = {} if out is None else out
    if isinstance(x, dict):
        for k, v in x.items():
            if k not in WORDS:
                flatten(v, f"{path}/{k}", out)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            flatten(v, f"{path}/{i}", out)
    elif isinstance(x, bool) or x is None:
        out[path] = x
    elif isinstance(x, (int, float)):
        out[path] = "nan" if isinstance(x, float) and math.isnan(x) else x
    elif isinstance(x, str) and path.rsplit("/", 1)[-1] in ("flag", "code", "estimator", "proposal", "proposal_key",
                                                             "direction", "name", "method", "family"):
        out[path] = x
    return out


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in WORDS} for r in csv.DictReader(f)]


def folder_numbers(folder: Path) -> dict:
    out = {}
    for name in ("results.json", "summary.json"):
        if (folder / name).is_file():
            out[name] = flatten(json.loads((folder / name).read_text()))
    if (folder / "summary.csv").is_file():
        out["summary.csv"] = csv_rows(folder / "summary.csv")
    return out


RTOL_FLOAT64, RTOL_FLOAT32 = 1e-12, 1e-3


def same(a, b, rtol: float) -> bool:
    """Equal, or (rtol > 0) numbers within rtol of each other; csv cells are strings of numbers."""
    if a == b or not rtol:
        return a == b
    try:
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        return False
    return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)


def check(name: str, got: dict, rtol: float = 0.0):
    path = GOLDEN / f"{name}.json"
    if os.environ.get("GOLDEN_UPDATE"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=0, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    got = json.loads(json.dumps(got))  # tuples → lists, as the file holds them
    for part in want:
        if isinstance(want[part], dict):
            missing = sorted(set(want[part]) - set(got[part]))[:5]
            changed = [(k, want[part][k], got[part][k]) for k in want[part] if k in got[part]
                       and not same(want[part][k], got[part][k], rtol)][:5]
            assert not missing and not changed, (name, part, missing, changed)
        else:
            assert len(want[part]) == len(got[part]), (name, part)
            for w, g in zip(want[part], got[part]):
                assert w.keys() == g.keys() and all(same(w[k], g[k], rtol) for k in w), (name, part, w, g)


def test_synthetic_run_numbers_unchanged(tmp_path, capsys):
    out = tmp_path / "syn"
    assert synthetic_main(["--vocab-size", "300", "--n-samples", "200", "--n-repeats", "2", "--divergence", "medium",
                           "--families", "zipf", "mixture", "--output-dir", str(out), "--no-plots"]) == 0
    check("synthetic", folder_numbers(out))


@pytest.mark.slow  # 2 s: the fast suite keeps the synthetic and the n = 8 LLM cases
def test_sequence_run_numbers_unchanged(tmp_path, capsys):
    out = tmp_path / "seq"
    assert synthetic_main(["--sequence", "--n-samples", "60", "--n-repeats", "2", "--families", "zipf",
                           "--vocab-size", "40", "--max-new-tokens", "5", "--alpha-values", "0.5", "--output-dir",
                           str(out), "--no-plots"]) == 0
    check("sequence", folder_numbers(out), rtol=RTOL_FLOAT64)


@pytest.mark.parametrize("n", [8, pytest.param(60, marks=pytest.mark.slow)])
def test_llm_run_of_both_directions_numbers_unchanged(tmp_path, capsys, n):
    """n = 8: the few-sequences case of issue 22 (nothing recommended, advice); n = 60: recommendations, Jeffreys."""
    paths = save_pair(tmp_path / "pair", seed=5)
    out = tmp_path / "llm"
    (tmp_path / "prompts.txt").write_text("a b\nc\n")
    code = llm_main(["--p-model", str(paths[0]), "--q-model", str(paths[1]), "--prompts", str(tmp_path / "prompts.txt"),
                     "--n-samples", str(n), "--max-new-tokens", "3", "--temperature", "1.0", "--batch-size", "32",
                     "--direction", "both", "--proposals", "P", "Geometric (β=0.5)", "Adaptive [prefix-aware]",
                     "--output-dir", str(out), "--no-plots",
                     "--head", "0"])  # the numbers of plain sampling (auto mode puts an exact head on cold prompts)
    assert code == 0
    got = folder_numbers(out)
    for d in ("", "reverse/"):
        for f in sorted((out / d).glob("*.json")) if (out / d).is_dir() else ():
            if f.name != "summary.json":
                doc = json.loads(f.read_text())
                got[d + f.name] = flatten({k: v for k, v in doc.items() if k != "sequences"})
    check(f"llm_n{n}", got, rtol=RTOL_FLOAT32)
