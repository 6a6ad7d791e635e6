"""Both directions (issue 17): KL(Q‖P) from sequences of Q on the swapped pair, and both in one run with their sum.

Ground truth by enumeration of the swapped pair, on tiny random GPT-2 pairs with EOS reachable and not (ignore_eos):
every unflagged row of either direction within 5 SE of its exact KL, across temperatures, through the run layer
(run_experiment: units, streams, verdicts per direction, rows carrying their direction); the Jeffreys row within 5
SE of the exact sum; a prompt set per direction; files and resume per direction; forward runs unchanged. The counts
land in DIRECTION_SUMMARY (printed with -s).
"""
import csv
import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import kl_estimation as kle
from kl_estimation import report
from kl_estimation.cli import llm_main
from kl_estimation.core.kinds import Estimator
from kl_estimation.core.results import Code, Flag, Row
from kl_estimation.core.streams import torch_stream
from kl_estimation.llm import engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.run import directions, units
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import run_experiment
from tiny_lms import save_pair

TOL_SE = 5.0
N = 1000
PROPOSALS = ("P", "Geometric (β=0.5)", "Fixed mixture (λ=0.9)", "Alpha-mixture (α=0.5) [prefix-aware]",
             "Exponential family (β=5)", "Adaptive", "Optimal [prefix-aware]")
# (name, save_pair keywords, ignore_eos, max_new_tokens)
PAIRS = (("eos", dict(seed=5), False, 4), ("no-eos", dict(seed=1, noise=0.8), True, 3))
TEMPERATURES = (0.5, 1.0, 1.5)
CLI_PROPOSALS = ["P", "Geometric (β=0.5)", "Adaptive [prefix-aware]"]
FILES = ("p.json", "geometric_beta-0.5.json", "adaptive_prefix-aware.json")
REVERSE_FILES = ("reverse/q.json", "reverse/geometric_beta-0.5.json", "reverse/adaptive_prefix-aware.json")
DIRECTION_SUMMARY: dict = {}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for name, kw, ignore_eos, T in PAIRS:
        paths = save_pair(tmp_path_factory.mktemp(name), **kw)
        out[name] = (paths, load_transformers_pair(*paths, prompts=["a b", "c"], temperature=1.0,
                                                   ignore_eos=ignore_eos), T)
    return out


@pytest.fixture(scope="module")
def tiny(pairs):
    return pairs["eos"][0]


def config(**kw) -> LLMConfig:
    base = dict(prompts=("a b",), n_samples=N, max_new_tokens=3, temperature=1.0, batch_size=500,
                proposals=PROPOSALS, direction="both")
    return LLMConfig(**{**base, **kw}).validate()


# ------------------------------------------------------------------------------------------------ the swapped pair

def test_swapped_pair_swaps_the_roles_and_enumerates_the_reverse_kl(pairs):
    for name, (_, pair, T) in pairs.items():
        swapped = engine.pair_view(pair, "reverse")
        rows = torch.tensor([0, 1])
        lp, lq, state = pair.start(rows)
        sq, sp, sstate = swapped.start(rows)
        assert torch.equal(lp, sp) and torch.equal(lq, sq)
        x = torch.tensor([1, 2])
        lp, lq, _ = pair.step(state, x)
        sq, sp, _ = swapped.step(sstate, x)
        assert torch.equal(lp, sp) and torch.equal(lq, sq)
        assert swapped.vocab_size == pair.vocab_size and swapped.eos_token_id == pair.eos_token_id
        assert engine.pair_view(pair, "forward") is pair
        # KL(Q‖P) from the swapped pair's enumeration = Σ_x Q(x) log Q(x)/P(x) over the forward pair's leaves
        leaves = enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), T)
        q = np.exp(leaves["log_q"])
        assert q.sum() == pytest.approx(1.0, abs=1e-9)
        direct = float(np.sum(q * (leaves["log_q"] - leaves["log_p"])))
        reverse = enumeration.exact_kl(pair, T, direction="reverse")
        assert reverse == pytest.approx(direct, rel=1e-9), name
        assert enumeration.exact_kl(pair, T) == pytest.approx(leaves["kl"])
        assert abs(reverse - leaves["kl"]) > 1e-3  # the two directions differ here
    with pytest.raises(ValueError, match="^direction: unknown direction 'up'"):
        engine.pair_view(pair, "up")


def test_reverse_streams_differ_and_forward_streams_are_the_seeds():
    fwd = engine.unit_generator(3, "P", 2, "cpu", 1)
    legacy = torch_stream(3, "P", 2, 1)  # the stream of a unit before directions existed
    rev = engine.unit_generator(3, "P", 2, "cpu", 1, "reverse")
    a, b, c = (torch.rand(8, generator=g) for g in (fwd, legacy, rev))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ truth grid

@pytest.fixture(scope="module")
def grid(pairs):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _grid(pairs)
    finally:
        torch.set_num_threads(threads)


def _z(est, se, truth):
    return abs(est - truth) / se if se > 0 else (0.0 if est == truth else math.inf)


def _grid(pairs):
    cells, recs, jeff = [], [], []
    for pname, (_, base, T) in pairs.items():
        for temp in TEMPERATURES:
            pair = dataclasses.replace(base, temperature=temp)
            exact = {d: enumeration.exact_kl(pair, T, direction=d) for d in engine.DIRECTIONS}
            cfg = config(max_new_tokens=T, temperature=temp, seed=len(recs))
            run = run_experiment(pair, cfg, {"p": pname, "q": pname}, exact_kl=exact)
            setting = f"{pname} temp={temp} T={T}"
            for r in run["rows"]:
                cells.append(dict(r, setting=setting, kl=exact[r["direction"]],
                                  z=_z(r["estimate"], r["std_error"], exact[r["direction"]])))
            for d, rec in run["recommended_by_direction"].items():
                recs.append((setting, d, rec, rec and _z(rec["estimate"], rec["std_error"], exact[d])))
            j = run["jeffreys"]
            total = exact["forward"] + exact["reverse"]
            jeff.append((setting, j, total, _z(j["estimate"], j["std_error"], total)))
    for d in engine.DIRECTIONS:
        mine = [c for c in cells if c["direction"] == d]
        ok = [c for c in mine if not c["flag"]]
        DIRECTION_SUMMARY[d] = dict(cells=len(mine), flagged=len(mine) - len(ok), unflagged=len(ok),
                                    max_z_unflagged=round(max(c["z"] for c in ok), 2),
                                    flagged_outside_5se=sum(c["z"] > TOL_SE for c in mine if c["flag"]))
    DIRECTION_SUMMARY["jeffreys"] = dict(settings=len(jeff), flagged=sum(bool(j["flag"]) for _, j, _, _ in jeff),
                                         max_z=round(max(z for *_, z in jeff), 2))
    print("\ndirection grid:", DIRECTION_SUMMARY)
    return dict(cells=cells, recs=recs, jeffreys=jeff)


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_every_unflagged_row_of_both_directions_within_5_se_of_enumeration(grid):
    bad = [c for c in grid["cells"] if not c["flag"] and not c["z"] <= TOL_SE]
    assert not bad, "\n".join(f"{c['setting']} {c['direction']} {c['proposal']} {c['estimator']}: "
                              f"{c['estimate']:.4g} ± {c['std_error']:.2g} vs {c['kl']:.4g} ({c['z']:.1f} SE)"
                              for c in bad)
    s = DIRECTION_SUMMARY
    for d in engine.DIRECTIONS:
        # 5 estimators per proposal, but no SNIS row for plain Monte Carlo (it repeats MC)
        assert s[d]["cells"] == len(PAIRS) * len(TEMPERATURES) * (len(PROPOSALS) * 5 - 1)
        assert s[d]["unflagged"] >= 0.5 * s[d]["cells"]  # the check has teeth: most rows are judged trustworthy


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_recommended_per_direction_and_jeffreys_within_5_se(grid):
    for setting, d, rec, z in grid["recs"]:
        assert rec is not None and z <= TOL_SE, (setting, d, rec, z)
    for setting, j, total, z in grid["jeffreys"]:
        assert not j["flag"] and z <= TOL_SE, (setting, j, total, z)
        assert j["std_error"] == pytest.approx(math.hypot(j["forward"]["std_error"], j["reverse"]["std_error"]))
        assert j["estimate"] == pytest.approx(j["forward"]["estimate"] + j["reverse"]["estimate"])


@pytest.mark.slow  # a grid or a resumed run: seconds of CPU (CI runs it)
def test_reverse_rows_are_named_for_what_they_sample(grid):
    reverse = [c for c in grid["cells"] if c["direction"] == "reverse"]
    assert {c["proposal"] for c in reverse} == {"Q"} | set(PROPOSALS[1:])
    flags = " ".join(c["flag"] for c in reverse)
    assert "with P RB" not in flags and "P's RB+CV" not in flags  # the reference of a reverse run is Q's
    forward = [c for c in grid["cells"] if c["direction"] == "forward"]
    assert "Q" not in {c["proposal"] for c in forward}


def test_a_prompt_set_per_direction(pairs):
    _, pair, _ = pairs["eos"]
    T = 3
    cfg = config(prompts=("a b", "c"), max_new_tokens=T, proposals=("P", "Adaptive [prefix-aware]"), seed=11)
    exact = {d: [enumeration.exact_kl(pair, T, i, d) for i in range(2)] for d in engine.DIRECTIONS}
    run = run_experiment(pair, cfg, {"p": "p", "q": "q"})
    for i, p in enumerate(run["per_prompt"]):
        assert set(p["recommended_by_direction"]) == set(engine.DIRECTIONS)
        for r in p["rows"]:
            if not r["flag"]:
                assert _z(r["estimate"], r["std_error"], exact[r["direction"]][i]) <= TOL_SE, (i, r)
        for d, rec in p["recommended_by_direction"].items():
            assert _z(rec["estimate"], rec["std_error"], exact[d][i]) <= TOL_SE, (i, d, rec)
        j = p["jeffreys"]
        truth = exact["forward"][i] + exact["reverse"][i]
        assert j["prompt"] == i and _z(j["estimate"], j["std_error"], truth) <= TOL_SE
    j = run["jeffreys"]
    total = np.mean(exact["forward"]) + np.mean(exact["reverse"])
    assert not j["flag"] and _z(j["estimate"], j["std_error"], total) <= TOL_SE
    sums = [p["jeffreys"]["estimate"] for p in run["per_prompt"]]  # the same rows here: RB+CV in both directions
    if all((p["jeffreys"]["proposal"], p["jeffreys"]["estimator"]) == (j["proposal"], j["estimator"])
           for p in run["per_prompt"]):
        assert j["std_error_population"] == pytest.approx(np.std(sums, ddof=1) / math.sqrt(2))


def test_jeffreys_is_flagged_when_a_direction_has_no_recommendation():
    def row(est, flags=(), d="forward"):
        return Row(engine.sequence_proposal("P"), Estimator.RB_CV, est, 0.1, direction=d, flags=flags)

    fwd = [row(1.0)]
    rev = [row(2.0, (Flag(Code.INCONSISTENT, {"test": "disagrees", "z": 5.0, "against": {
        "proposal_key": "p", "estimator": "RB", "estimate": 1.0, "std_error": 0.1}}),), "reverse")]
    j = directions.jeffreys_row({"forward": fwd, "reverse": rev}, {"forward": fwd[0], "reverse": None})
    assert j["estimate"] == pytest.approx(3.0) and j["std_error"] == pytest.approx(math.hypot(0.1, 0.1))
    assert j["flag"].startswith("reverse KL(Q‖P) has no trusted estimate; its Q RB+CV is used, flagged: INCONSISTENT")
    j = directions.jeffreys_row({"forward": fwd, "reverse": []}, {"forward": fwd[0], "reverse": None})
    assert math.isnan(j["estimate"]) and "no Q RB+CV row" in j["flag"]


# ------------------------------------------------------------------------------------------------ runs, files, resume

def run_cli(tmp_path, tiny, *extra, folder="out"):
    out = tmp_path / folder
    argv = ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "40", "--max-new-tokens",
            "4", "--temperature", "0.8", "--batch-size", "16", "--output-dir", str(out), "--proposals",
            *CLI_PROPOSALS, *extra]
    try:
        code = llm_main(argv)
    except SystemExit as e:
        code = e.code
    return code, out


def records(folder, name):
    return json.loads((folder / name).read_text())["sequences"]


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    """A run of both directions, as the console reports it, with its figures."""
    tmp = tmp_path_factory.mktemp("straight")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code, out = run_cli(tmp, tiny, "--direction", "both")
    assert code == 0
    return out, buf.getvalue()


def test_console_files_and_figures_say_the_direction(straight):
    out, stdout = straight
    lines = stdout.strip().splitlines()
    titles = [ln for ln in lines if ln.startswith("── ")]
    assert titles[0].startswith("── KL(P‖Q) forward: sequences from P, 40 sequences × 3 proposals")
    assert titles[1].startswith("── KL(Q‖P) reverse: sequences from Q, 40 sequences × 3 proposals")
    said = [ln for ln in lines if ln.startswith(("Recommended", "Jeffreys"))]  # the first line of each (wrapped)
    assert said[-3].startswith("Recommended for KL(P‖Q) (forward): ")
    assert said[-2].startswith("Recommended for KL(Q‖P) (reverse): ") and "P-based" not in stdout.split(said[-2])[1]
    assert said[-1].startswith("Jeffreys KL(P‖Q) + KL(Q‖P) = ") and "nats per sequence" in said[-1]
    for f in FILES + REVERSE_FILES:
        assert (out / f).exists(), f
    doc = json.loads((out / "reverse" / "q.json").read_text())
    assert doc["direction"] == "reverse" and doc["proposal"] == "Q" and doc["target"] == "KL(Q‖P)"
    assert doc["sampled_from"] == "Q" and "log_p" in doc["roles"] and doc["run_key"]["direction"] == "reverse"
    assert json.loads((out / "p.json").read_text())["direction"] == "forward"
    summary = json.loads((out / "summary.json").read_text())
    assert [r["direction"] for r in summary["rows"]] == ["forward"] * 14 + ["reverse"] * 14  # no SNIS row of MC
    assert set(summary["recommended_by_direction"]) == {"forward", "reverse"}
    assert summary["recommended"] == summary["recommended_by_direction"]["forward"]
    j = summary["jeffreys"]
    assert j["direction"] == "both" and j["unit"] == "nats per sequence"
    est, se = report.estimate_text(j["estimate"], j["std_error"])  # the digits the SE supports; lines wrapped
    assert f"= {est} nats per sequence (SE {se}, 95% CI " in " ".join(ln.strip() for ln in stdout.splitlines())
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[0] == "direction" and [r["direction"] for r in rows] == ["forward"] * 14 + [
        "reverse"] * 14 + ["both"]
    assert rows[-1]["proposal"] == j["proposal"] and float(rows[-1]["estimate"]) == pytest.approx(j["estimate"])
    plots = {p.name for p in (out / "plots").iterdir()}
    assert {"llm_1_estimates.png", "llm_1_estimates_reverse.png", "llm_4_ess_reverse.png"} <= plots
    index = (out / "plots" / "index.html").read_text()
    assert "KL(Q‖P) reverse (sequences from Q)" in index and "KL(Q‖P), reverse direction" in index


def test_resume_per_direction_gives_the_same_records(straight, tiny, tmp_path, monkeypatch, capsys):
    out, _ = straight
    real = units.sample_batch
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 14:  # forward done (9 batches), reverse Q done (3), reverse Geometric killed after 1
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(units, "sample_batch", dying)
    assert run_cli(tmp_path, tiny, "--direction", "both", "--no-plots", folder="killed")[0] == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": 4 of 6 proposals × directions complete, 16 sequences (1 batch) of reverse " in err, err
    assert err.startswith("LLM_experiments.py: interrupted: kept in "), err
    assert err.endswith("--resume")
    killed = tmp_path / "killed"
    assert (killed / "reverse" / "q.json").exists()
    assert (killed / "reverse" / "geometric_beta-0.5.partial.jsonl").exists()
    assert not (killed / "reverse" / "geometric_beta-0.5.json").exists()
    code, _ = run_cli(tmp_path, tiny, "--direction", "both", "--no-plots", folder="killed")
    assert code == 2 and "already holds results" in capsys.readouterr().err
    monkeypatch.setattr(units, "sample_batch", real)
    assert run_cli(tmp_path, tiny, "--direction", "both", "--no-plots", "--resume", folder="killed")[0] == 0
    for f in FILES + REVERSE_FILES:
        a, b = json.loads((out / f).read_text()), json.loads((killed / f).read_text())
        assert a["sequences"] == b["sequences"] and a["estimates"] == b["estimates"], f
    assert not list(killed.rglob("*.partial.jsonl"))
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads(
        (killed / "summary.json").read_text())["rows"]


def test_forward_records_unchanged_and_a_forward_folder_resumes_into_both(straight, tiny, tmp_path, monkeypatch):
    out, _ = straight
    assert run_cli(tmp_path, tiny, "--no-plots", folder="fwd")[0] == 0  # the default: forward
    fwd = tmp_path / "fwd"
    assert not (fwd / "reverse").exists()
    summary = json.loads((fwd / "summary.json").read_text())
    assert {r["direction"] for r in summary["rows"]} == {"forward"} and "jeffreys" not in summary
    for f in FILES:  # the forward part of a run of both directions is the forward run
        assert records(out, f) == records(fwd, f), f
    # a forward unit's records are those of its seed stream (the stream of a unit before directions existed)
    pair = load_transformers_pair(*tiny, prompts="a b", temperature=0.8)
    prop = engine.sequence_proposal("Geometric (β=0.5)")
    b = engine.sample_batch(pair, prop, 16, 4, [(torch_stream(0, prop.key, 1, 0), 16)])
    got = records(fwd, "geometric_beta-0.5.json")[16:32]
    assert [r["token_ids"] for r in got] == [list(b.token_ids[i, :len(r["token_ids"])]) for i, r in enumerate(got)]
    np.testing.assert_allclose(got[0]["log_p"], b.log_p[0, :len(got[0]["log_p"])])
    # resumed as a run of both directions: the forward files are reused, only the reverse units are drawn
    real, calls = units.sample_batch, {"n": 0}

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(units, "sample_batch", counting)
    assert run_cli(tmp_path, tiny, "--direction", "both", "--no-plots", "--resume", folder="fwd")[0] == 0
    assert calls["n"] == 9
    for f in FILES + REVERSE_FILES:
        assert records(out, f) == records(fwd, f), f


def test_reverse_only_run_and_overwrite(tiny, tmp_path, capsys):
    code, out = run_cli(tmp_path, tiny, "--direction", "reverse", "--no-plots", folder="rev")
    assert code == 0
    stdout = capsys.readouterr().out
    assert "── KL(Q‖P) reverse: sequences from Q" in stdout and "KL(P‖Q) forward" not in stdout
    said = [ln for ln in stdout.splitlines() if ln.startswith("Recommended")]
    assert len(said) == 1 and said[0].startswith("Recommended for KL(Q‖P) (reverse): ")
    assert not (out / "p.json").exists() and (out / "reverse" / "q.json").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recommended"]["direction"] == "reverse" and {r["direction"] for r in summary["rows"]} == {"reverse"}
    code, _ = run_cli(tmp_path, tiny, "--direction", "reverse", "--no-plots", folder="rev")
    assert code == 2 and "already holds results (reverse/q.json)" in capsys.readouterr().err
    (out / "reverse" / "notes.txt").write_text("mine")
    assert run_cli(tmp_path, tiny, "--overwrite", "--no-plots", "--proposals", "P", folder="rev")[0] == 0
    assert {p.name for p in (out / "reverse").iterdir()} == {"notes.txt"}  # the run's files went, the user's stayed


def test_direction_is_validated(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^direction: unknown direction 'sideways'; allowed: forward, reverse, both$"):
        kle.estimate_kl(*tiny, "a b", direction="sideways", n_samples=4, max_new_tokens=2, progress=False)
    code = llm_main(["--p-model", tiny[0], "--q-model", tiny[1], "--direction", "up", "--output-dir",
                     str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--direction: unknown direction 'up'; allowed: forward, reverse, both" in err
    assert not (tmp_path / "o").exists()


def test_api_rows_carry_the_direction(tiny):
    kw = dict(n_samples=200, max_new_tokens=3, proposals=("P", "Adaptive"), temperature=1.0, progress=False)
    both = kle.estimate_kl(*tiny, ["a b", "c"], direction="both", **kw)
    assert {r.direction for r in both.rows} == {"forward", "reverse"} and both.directions == ("forward", "reverse")
    assert [r.proposal for r in both.rows_for("reverse")].count("Q") == 4  # MC, RB, RB+CV, k3 (no SNIS of MC)
    assert both.recommended == both.recommended_by_direction["forward"]
    assert both.recommended_by_direction["reverse"].direction == "reverse"
    assert both.jeffreys.direction == "both" and both.jeffreys.details["unit"] == "nats per sequence"
    assert both.jeffreys.estimate == pytest.approx(both.recommended_by_direction["forward"].estimate
                                                   + both.recommended_by_direction["reverse"].estimate)
    assert all(p["jeffreys"].direction == "both" for p in both.per_prompt)
    assert "direction" in both.to_pandas().columns and len(both.to_pandas(per_prompt=True)) == 36
    json.dumps(both.to_dict(), allow_nan=True)
    text = str(both)
    assert "KL(P‖Q) forward: sequences from P" in text and "KL(Q‖P) reverse: sequences from Q" in text
    assert text.split("\n\n")[-1].startswith("Jeffreys KL(P‖Q) + KL(Q‖P) = ")  # the last paragraph (wrapped)
    forward = kle.estimate_kl(*tiny, ["a b", "c"], **kw)  # the default direction: the forward part of `both`
    assert [(r.proposal, r.estimator, r.estimate) for r in forward.rows] == [
        (r.proposal, r.estimator, r.estimate) for r in both.rows_for("forward")]
    assert forward.jeffreys is None and list(forward.recommended_by_direction) == ["forward"]


def test_reverse_with_a_dependent_sampler(pairs):
    """Stratified draws in reverse: the units' randomizations give the SEs, as forward; within 5 SE of the truth."""
    _, pair, T = pairs["no-eos"]
    cfg = config(proposals=("P", "Adaptive"), sampler="stratified", batch_size=50, n_samples=1000,
                 direction="reverse", max_new_tokens=T)
    run = run_experiment(pair, cfg, {"p": "p", "q": "q"})
    exact = enumeration.exact_kl(pair, T, direction="reverse")
    assert "randomizations" in run["docs"][0]["estimates"]["RB"]["std_error_method"]
    unflagged = [r for r in run["rows"] if not r["flag"]]
    assert len(unflagged) >= 5 and all(_z(r["estimate"], r["std_error"], exact) <= TOL_SE for r in unflagged)
    assert run["recommended"]["direction"] == "reverse" and "jeffreys" not in run
