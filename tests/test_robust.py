"""A run never dies with a traceback or loses work: bad sizes, context overflow, Ctrl-C, read-only folders, the
offline default pair under concurrency, --overwrite, progress in logs, --help; and LLM runs get their figures."""
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_checks import call, one_line
from kl_estimation import cli, progress
from kl_estimation.cli import llm_main, synthetic_main, visualize_main
from kl_estimation.llm import default_pair, engine, enumeration
from kl_estimation.llm.loading import load_transformers_pair
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.runner import load_pair, run_experiment
from tiny_lms import save_pair

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))  # GPT-2 with 64 positions; "a b" is 2 tokens


def llm_args(tiny, out, *extra):
    return ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "24", "--max-new-tokens", "3",
            "--batch-size", "8", "--output-dir", str(out), *extra]


# ------------------------------------------------------------------------------------------------ --help

@pytest.mark.parametrize("make", [
    lambda: cli.synthetic_parser("Synthetic_tests.py", {}),
    lambda: cli.llm_parser("LLM_experiments.py", {}),
    lambda: cli.visualize_parser("visualize_proposals.py", {}),
])
def test_every_option_has_help_and_its_default(make):
    p = make()
    fmt = p._get_formatter()
    for a in p._actions:
        if a.dest == "help":
            continue
        text = fmt._expand_help(a) if a.help else ""
        assert text.strip(), f"{a.option_strings or a.dest} has no help text"
        if a.option_strings and a.nargs != 0:
            assert "(default" in text, f"{a.option_strings}: no default in {text!r}"
    page = p.format_help()
    assert "(default: None)" not in page and "default: False" not in page


@pytest.mark.slow
def test_llm_help_shows_the_script_default_folder():
    p = subprocess.run([sys.executable, str(ROOT / "LLM_experiments.py"), "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    page = " ".join(p.stdout.split())
    assert p.returncode == 0 and "a new folder under tests2/" in page and "(default: 0)" in page  # --seed
    assert "(default: P 'Geometric (β=0.5)'" in page  # proposal names as typed


# ------------------------------------------------------------------------------------------------ sizes

@pytest.mark.parametrize("argv,flag", [
    (["--vocab-size", "1000000000"], "--vocab-size"),
    (["--n-repeats", "99999999999999999999"], "--n-repeats"),
    (["--n-samples", "99999999999999"], "--n-samples"),
    (["--sequence", "--n-repeats", "99999999999"], "--n-repeats"),
])
def test_sizes_that_cannot_fit_are_refused_before_work(argv, flag, tmp_path, capsys):
    code, _, err = call(synthetic_main, argv + ["--output-dir", str(tmp_path / "o"), "--no-plots"], capsys)
    one_line(code, err, f"{flag}: ")
    assert "of memory" in err and not (tmp_path / "o").exists()


def test_llm_records_that_cannot_fit_are_refused_before_loading(tmp_path, capsys):
    argv = ["--p-model", "/nonexistent/p", "--q-model", "/nonexistent/q", "--n-samples", str(10 ** 12),
            "--max-new-tokens", "50", "--output-dir", str(tmp_path / "o")]
    code, _, err = call(llm_main, argv, capsys)
    one_line(code, err, "--n-samples: ")
    assert "memory" in err and "--max-new-tokens" in err and not (tmp_path / "o").exists()


def test_llm_batch_that_cannot_fit_is_refused(tiny, tmp_path, capsys):
    code, _, err = call(llm_main, llm_args(tiny, tmp_path / "o", "--batch-size", str(10 ** 13)), capsys)
    one_line(code, err, "--batch-size: ")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ context

def test_t_length_beyond_the_context_is_refused_and_the_bound_is_exact(tiny, tmp_path, capsys):
    code, _, err = call(llm_main, llm_args(tiny, tmp_path / "o", "--max-new-tokens", "64"), capsys)
    one_line(code, err, "--max-new-tokens: 64 new tokens after a prompt of 2 tokens need 65 positions")
    assert "--max-new-tokens ≤ 63" in err and not (tmp_path / "o").exists()
    pair = load_transformers_pair(*tiny, prompts="a b", temperature=1.0, ignore_eos=True)
    assert pair.context_length == 64
    prop = engine.sequence_proposal("P")
    b = engine.sample_batch(pair, prop, 2, 63, engine.unit_generator(0, "P", 0, "cpu"))  # the bound itself runs
    assert b.mask.sum() == 2 * 63
    with pytest.raises(IndexError):  # one more and the models run out of positions: the check is not too strict
        engine.sample_batch(pair, prop, 2, 64, engine.unit_generator(0, "P", 0, "cpu"))


# ------------------------------------------------------------------------------------------------ folders

def test_synthetic_default_folder_that_cannot_be_created_fails_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "results").write_text("a file where the default folder should go")
    code, _, err = call(synthetic_main, ["--vocab-size", "300", "--n-samples", "20", "--families", "zipf",
                                         "--alpha-values", "0.5"], capsys)
    one_line(code, err, "--output-dir: not given, and the default folder results/synthetic cannot be created")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_synthetic_from_a_read_only_folder(tmp_path, monkeypatch, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.chdir(ro)
    try:
        code, _, err = call(synthetic_main, ["--vocab-size", "300", "--families", "zipf"], capsys)
    finally:
        ro.chmod(0o755)
    one_line(code, err, "--output-dir: not given")


def test_p_model_folder_that_is_not_a_model_says_what_is_missing(tmp_path, tiny, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = call(llm_main, ["--p-model", str(empty), "--q-model", tiny[1], "--output-dir",
                                   str(tmp_path / "o")], capsys)
    one_line(code, err, "it is not a model folder: config.json and the weights (model.safetensors or "
                        "pytorch_model.bin) and the tokenizer files")
    assert err.rstrip().endswith(")")  # a complete sentence, not cut
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text((Path(tiny[0]) / "config.json").read_text())
    code, _, err = call(llm_main, ["--p-model", str(half), "--q-model", tiny[1], "--output-dir",
                                   str(tmp_path / "o")], capsys)
    one_line(code, err, "it is not a model folder: the weights (model.safetensors or pytorch_model.bin) and the "
                        "tokenizer files (tokenizer.json or tokenizer_config.json) missing")


def test_overwrite_with_fewer_proposals_leaves_no_earlier_file(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, _ = call(llm_main, llm_args(tiny, out, "--proposals", "P", "Geometric (β=0.5)", "--no-plots"), capsys)
    assert code == 0 and (out / "geometric_beta-0.5.json").exists()
    (out / "notes.json").write_text('{"mine": 1}')  # a user's own file is not the run's
    (out / "adaptive.partial.jsonl").write_text('{"run_key": {}}\n')  # an earlier interrupted proposal
    (out / "summary_per_prompt.csv").write_text("prompt\n0\n")  # an earlier prompt-set run's
    code, _, _ = call(llm_main, llm_args(tiny, out, "--proposals", "P", "--overwrite"), capsys)
    assert code == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["notes.json", "p.json", "plots", "summary.csv", "summary.json"], names
    assert [r["proposal"] for r in json.loads((out / "summary.json").read_text())["rows"]] == ["P"] * 4  # no SNIS


def test_threads_flag(tiny, tmp_path, capsys):
    from kl_estimation.core.resources import set_threads

    code, _, err = call(llm_main, llm_args(tiny, tmp_path / "o", "--threads", "0"), capsys)
    one_line(code, err, "--threads: must be an integer ≥ 1")
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------ Ctrl-C

def test_synthetic_ctrl_c_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from kl_estimation.synthetic import experiment as synthetic

    def interrupted(cfg, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "run", interrupted)
    code, _, err = call(synthetic_main, ["--vocab-size", "300", "--output-dir", str(tmp_path / "o")], capsys)
    one_line(code, err, "interrupted: nothing was written", status=130)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_llm_sigint_keeps_work_and_prints_the_resume_command(tiny, tmp_path):
    """A real SIGINT to a real run: one line naming what was kept and the command; that command finishes the run."""
    out = tmp_path / "o"
    argv = [sys.executable, "LLM_experiments.py", *llm_args(tiny, out, "--n-samples", "600", "--batch-size", "20",
                                                             "--proposals", "P", "--no-plots")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = out / "p.partial.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.exists() and partial.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert "interrupted: kept in " in last and " sequences (" in last and last.endswith("--resume"), last
    assert not (out / "p.json").exists() and partial.exists()
    import shlex

    resume = shlex.split(last.split("continue with: ", 1)[1])
    assert resume[1:] == argv[1:] + ["--resume"]
    done = subprocess.run([sys.executable, *resume[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "p.json").read_text())["n_sequences"] == 600 and not partial.exists()


# ------------------------------------------------------------------------------------------------ progress

def test_progress_off_a_terminal_is_whole_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)
    with progress.bar(total=3, desc="work", unit="step") as b:
        for i in range(3):
            b.update(1)
            b.set_postfix_str(f"x {i}")
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines()[0].startswith("work: 0/3 step")
    assert err.splitlines()[-1].startswith("work: 3/3 step (100%)") and err.endswith("x 2\n")


def test_progress_off_a_terminal_prints_a_heartbeat_while_a_step_takes_long(capsys):
    """A batch of a big model can take minutes: the log still gets a line now and then (every HEARTBEAT intervals),
    not one per interval saying the same thing."""
    with progress.bar(total=2, desc="slow", unit="batch", interval=0.02):
        time.sleep(0.02 * progress.HEARTBEAT * 2.5)
    lines = capsys.readouterr().err.splitlines()
    assert 3 <= len(lines) <= 4 and all(ln.startswith("slow: 0/2 batch") for ln in lines), lines


def test_progress_off_a_terminal_every_interval_or_tenth_never_the_same_state_twice(monkeypatch, capsys):
    """Issue 23: off a terminal, a line when the count moved by a tenth of the total or an interval passed with
    something new — not 16/750 then 17/750 a second apart, nor two lines of one state (a description set, a close)."""
    clock = [0.0]
    monkeypatch.setattr(progress, "_clock", lambda: clock[0])
    b = progress.bar(total=100, desc="work", unit="step", interval=1000.0)  # the ticker never fires here
    for _ in range(100):
        clock[0] += 0.01
        b.update(1)
        b.set_postfix_str("x")
        b.set_description_str("work")
    b.close()
    lines = capsys.readouterr().err.splitlines()
    counts = [int(ln.split(": ")[1].split("/")[0]) for ln in lines]
    assert counts == [0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100], lines  # every tenth, each once
    capsys.readouterr()
    clock[0] = 0.0
    b = progress.bar(total=1000, desc="slow", unit="step", interval=5.0)
    for _ in range(20):
        clock[0] += 1.0  # one step a second: a line every 5 s, never for the same count twice
        b.update(1)
        b.refresh()
    b.close()
    lines = capsys.readouterr().err.splitlines()
    assert [int(ln.split(": ")[1].split("/")[0]) for ln in lines] == [0, 5, 10, 15, 20], lines
    assert len(set(lines)) == len(lines)


# ------------------------------------------------------------------------------------------------ default pair

def _fake_build(seed=default_pair.SEED):
    """Stands in for training: slow enough for a race, writes what a build writes, counts builds."""
    from kl_estimation import runio

    with open(os.environ["BUILD_LOG"], "a") as fh:
        fh.write(f"{os.getpid()}\n")
    with runio.replaced_folder(default_pair.cache_dir()) as tmp:
        time.sleep(0.5)
        for name in ("p", "q"):
            (tmp / name).mkdir()
        (tmp / "built.json").write_text(json.dumps({"version": default_pair.VERSION, "seed": seed}))
    return default_pair.paths()


def _ensure_in_child(q):
    default_pair.build = _fake_build
    q.put(default_pair.ensure())


@pytest.mark.slow
def test_default_pair_is_built_once_under_concurrency_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_ESTIMATION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BUILD_LOG", str(tmp_path / "builds.log"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / ".building-killed").mkdir()  # left by a killed build
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(q,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert len((tmp_path / "builds.log").read_text().split()) == 1  # one build; the others waited and reused it
    assert len(set(results)) == 1 and default_pair.info()["seed"] == default_pair.SEED
    assert not list((tmp_path / "cache").glob(".building-*"))
    # a cache built with another seed (older versions used --seed) is rebuilt with the pair's own
    (default_pair.cache_dir() / "built.json").write_text(json.dumps({"version": default_pair.VERSION, "seed": 7}))
    monkeypatch.setattr(default_pair, "build", _fake_build)
    default_pair.ensure()
    assert default_pair.info()["seed"] == default_pair.SEED
    assert len((tmp_path / "builds.log").read_text().split()) == 2


def test_failed_or_interrupted_build_leaves_no_building_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KL_ESTIMATION_CACHE", str(tmp_path / "cache"))

    def dies():
        raise KeyboardInterrupt

    monkeypatch.setattr(default_pair, "_corpus", dies)
    with pytest.raises(KeyboardInterrupt):
        default_pair.ensure()
    assert not list((tmp_path / "cache").glob(".building-*")) and default_pair.info() is None


# ------------------------------------------------------------------------------------------------ warnings

def test_no_past_key_values_future_warning(tiny):
    pair = load_transformers_pair(*tiny, prompts=["a b", "c"], temperature=1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.sample_batch(pair, engine.sequence_proposal("P"), 4, 5, engine.unit_generator(0, "P", 0, "cpu"),
                            prompt_rows=torch.tensor([0, 1, 0, 1]))
    bad = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, [str(w.message) for w in bad]


# ------------------------------------------------------------------------------------------------ LLM figures

LLM_FIGURES = {"llm_1_estimates.png", "llm_2_per-step.png", "llm_3_log-weights.png", "llm_4_ess.png"}


@pytest.mark.slow
def test_llm_run_draws_its_figures_and_visualize_redraws_them(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code, stdout, _ = call(llm_main, llm_args(tiny, out, "--proposals", "P", "Geometric (β=0.5)",
                                              "Adaptive [prefix-aware]"), capsys)
    assert code == 0 and f"figures: {out / 'plots' / 'index.html'}" in stdout
    files = {p.name for p in (out / "plots").iterdir()}
    assert files == LLM_FIGURES | {"index.html"}
    index = (out / "plots" / "index.html").read_text()
    for f in LLM_FIGURES:
        assert (out / "plots" / f).read_bytes().startswith(PNG) and f"src='{f}'" in index
    (out / "plots").rename(tmp_path / "first")
    code, _, _ = call(visualize_main, [str(out), "--format", "svg", "--methods", "P", "Geometric (β=0.5)"], capsys)
    assert code == 0 and {p.name for p in (out / "plots").iterdir()} == {
        f.replace(".png", ".svg") for f in LLM_FIGURES} | {"index.html"}
    code, _, err = call(visualize_main, [str(out), "--pairs", "zipf/medium"], capsys)
    one_line(code, err, "--pairs: an LLM run folder has no pairs")
    code, _, err = call(visualize_main, [str(out), "--methods", "Nope"], capsys)
    one_line(code, err, "--methods: unknown proposal 'Nope'")
    (out / "p.json").write_text("{cut")
    code, _, err = call(visualize_main, [str(out)], capsys)
    one_line(code, err, "p.json (proposal 'P') is missing or corrupt")


@pytest.mark.slow
def test_llm_figures_with_prompt_set_and_exact_reference(tiny, tmp_path):
    """A prompt set gets the per-prompt figure; a run given the exact KL (enumerated here) records and draws it."""
    from kl_estimation.figures import llm as plots_llm

    cfg = LLMConfig(p_model=tiny[0], q_model=tiny[1], prompts=("a b", "c", "b a c"), n_samples=40, max_new_tokens=3,
                        temperature=1.0, proposals=("P", "Exponential family (β=1)"), batch_size=32)
    pair, models = load_pair(cfg)
    exact = np.mean([enumeration.enumerate_sequences(pair, engine.sequence_proposal("P"), 3, prompt_index=i)["kl"]
                     for i in range(3)])
    run = run_experiment(pair, cfg, models, tmp_path / "o", exact_kl=exact)
    assert run["meta"]["exact_kl"] == pytest.approx(exact)
    index = plots_llm.draw_all(tmp_path / "o")
    files = {p.name for p in index.parent.iterdir()}
    assert files == LLM_FIGURES | {"llm_5_per-prompt.png", "index.html"}
    rb = next(r for r in run["rows"] if r["proposal"] == "P" and r["estimator"] == "RB")
    assert abs(rb["estimate"] - exact) < 4 * rb["std_error"]  # the reference the figure draws is the right one
    # the per-step curve's running sum is the RB estimate itself (the figure's right panel ends there)
    loaded = plots_llm.load_llm_run(tmp_path / "o")
    c = plots_llm.step_contributions(plots_llm._arrays(loaded, loaded.docs[0])).sum(1).mean()
    assert c == pytest.approx(np.mean([p["estimates"]["RB"]["estimate"] for p in run["docs"][0]["per_prompt"]]))
