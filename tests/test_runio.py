"""The run folder cannot be lost (issue 22): one run at a time on a folder (a lock held across processes), --resume
only of a run that is there, Ctrl-C at any moment (while the package imports, early, mid-run) one line and status
130 with nothing kept lost; and runio's helpers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_checks import call, one_line
from kl_estimation import runio
from kl_estimation.cli import llm_main, synthetic_main
from tiny_lms import save_pair

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
SMALL = ["--vocab-size", "300", "--n-samples", "50", "--n-repeats", "2", "--divergence", "low", "--families", "zipf",
         "--no-plots"]
HOLD = ("import sys, time\nfrom kl_estimation.runio import RunFolder\nwith RunFolder(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))


def llm_args(tiny, out, *extra):
    return ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "24", "--max-new-tokens",
            "3", "--batch-size", "8", "--proposals", "P", "--no-plots", "--output-dir", str(out), *extra]


def hold(folder):
    """Another process holding `folder`, as a run in progress does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def held(tmp_path):
    """A folder held by another process; the holder is killed at the end."""
    proc = hold(tmp_path / "busy")
    yield tmp_path / "busy"
    proc.kill()
    proc.wait()


# ------------------------------------------------------------------------------------------------ RunFolder

def test_run_folder_is_one_runs_at_a_time_and_leaves_no_trace(tmp_path):
    new = tmp_path / "new"
    with runio.RunFolder(new) as folder:
        assert folder == new and (new / runio.LOCK).exists()
        with pytest.raises(ValueError, match=f"^output_dir: {new} is in use by another run"), runio.RunFolder(new):
            pass
    assert not new.exists()  # created for the run, nothing written: gone
    with runio.RunFolder(new) as folder:
        runio.write_text(folder / "x.txt", "kept")
    assert [p.name for p in new.iterdir()] == ["x.txt"]  # the lock file goes, what was written stays
    with pytest.raises(KeyboardInterrupt), runio.RunFolder(tmp_path / "cut"):
        raise KeyboardInterrupt
    assert not (tmp_path / "cut").exists()


def test_a_second_run_on_a_folder_in_use_is_refused_naming_it(held, tiny, capsys):
    """Two processes: a synthetic run (a real script), an LLM run and a corpus run on a folder another process
    holds."""
    p = subprocess.run([sys.executable, "Synthetic_tests.py", *SMALL, "--output-dir", str(held)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=120, check=False)
    one_line(p.returncode, p.stderr, f"--output-dir: {held} is in use by another run")
    code, _, err = call(llm_main, llm_args(tiny, held), capsys)
    one_line(code, err, f"--output-dir: {held} is in use by another run")
    corpus = held.parent / "text.txt"
    corpus.write_text("a b " * 40)
    code, _, err = call(llm_main, ["--p-model", tiny[0], "--q-model", tiny[1], "--corpus", str(corpus), "--context",
                                   "16", "--no-plots", "--output-dir", str(held)], capsys)
    one_line(code, err, f"--output-dir: {held} is in use by another run")
    assert [f.name for f in held.iterdir()] == [runio.LOCK]  # none wrote anything there


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, capsys):
    folder = tmp_path / "o"
    proc = hold(folder)
    assert call(synthetic_main, SMALL + ["--output-dir", str(folder)], capsys)[0] == 2
    proc.kill()  # killed: no cleanup ran, its lock file stays, but the OS dropped the lock
    proc.wait()
    assert (folder / runio.LOCK).exists()
    code, _, err = call(synthetic_main, SMALL + ["--output-dir", str(folder)], capsys)
    assert code == 0 and (folder / runio.RESULTS).exists() and not (folder / runio.LOCK).exists(), err


# ------------------------------------------------------------------------------------------------ --resume

def test_resume_of_a_missing_folder_is_refused(tiny, tmp_path, capsys):
    code, _, err = call(llm_main, llm_args(tiny, tmp_path / "missing", "--resume"), capsys)
    one_line(code, err, f"--resume: {tmp_path / 'missing'} does not exist")
    assert not (tmp_path / "missing").exists()


def test_resume_of_a_folder_without_this_run_is_refused(tiny, tmp_path, capsys):
    other = tmp_path / "synthetic"
    assert call(synthetic_main, SMALL + ["--output-dir", str(other)], capsys)[0] == 0
    before = sorted(p.name for p in other.iterdir())
    code, _, err = call(llm_main, llm_args(tiny, other, "--resume"), capsys)
    one_line(code, err, f"--resume: {other} holds no files of this run's proposals")
    assert sorted(p.name for p in other.iterdir()) == before


def test_resume_of_another_runs_config_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    assert call(llm_main, llm_args(tiny, out), capsys)[0] == 0
    doc = (out / "p.json").read_text()
    code, _, err = call(llm_main, llm_args(tiny, out, "--resume", "--temperature", "0.9"), capsys)
    one_line(code, err, "--resume: ")
    assert "written with other settings" in err and "temperature" in err
    assert (out / "p.json").read_text() == doc  # the earlier run's files untouched


# ------------------------------------------------------------------------------------------------ Ctrl-C

def _interrupt(argv, after: float):
    """Ctrl-C as a terminal sends it: SIGINT to the script's whole process group (its workers too)."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.parametrize("script", ["Synthetic_tests.py", *(pytest.param(s, marks=pytest.mark.slow) for s in (
    "LLM_experiments.py", "visualize_proposals.py"))])  # each a fresh interpreter importing torch: 2–3 CPU-s
def test_ctrl_c_at_1_s(script, tmp_path, capsys):
    """At 1 s a script is still importing (torch, scipy) or has just begun: one line, status 130, nothing left."""
    if script == "visualize_proposals.py":  # a real folder, whose figures take many seconds to draw
        assert call(synthetic_main, SMALL + ["--output-dir", str(tmp_path / "run")], capsys)[0] == 0
        argv = [script, str(tmp_path / "run")]
    else:
        argv = [script, "--output-dir", str(tmp_path / "o")]
    code, err = _interrupt(argv, 1.0)
    one_line(code, err, "interrupted: ", status=130)
    assert not (tmp_path / "run" / "plots").exists()
    # an idle machine finishes the default synthetic run (0.5 s) before 1 s: then the folder is whole, never partial
    out = tmp_path / "o"
    assert not out.exists() or ("is complete" in err and (out / "results.json").exists()), err


@pytest.mark.slow
def test_synthetic_ctrl_c_at_5_s_loses_nothing_kept(tmp_path):
    """At 5 s the default run computes or draws its figures: either nothing was written, or the folder is complete
    (it loads) and the line names the command that draws the figures."""
    from kl_estimation.synthetic.experiment import SyntheticResult

    out = tmp_path / "o"
    code, err = _interrupt(["Synthetic_tests.py", "--output-dir", str(out)], 5.0)
    one_line(code, err, "interrupted: ", status=130)
    if "nothing was written" in err:
        assert not out.exists()
    else:
        assert f"the run folder {out} is complete but its figures are not" in err and "visualize_proposals.py" in err
        assert SyntheticResult.load(out).results["pairs"] and not (out / runio.LOCK).exists()


@pytest.mark.slow
def test_llm_ctrl_c_at_5_s_then_the_printed_command_finishes(tiny, tmp_path):
    out = tmp_path / "o"
    argv = ["LLM_experiments.py", *llm_args(tiny, out)]
    argv[argv.index("24")] = "4000"
    code, err = _interrupt(argv, 5.0)
    one_line(code, err, "interrupted: ", status=130)
    last = err.strip().splitlines()[-1]
    if "continue with: " in last:  # batches were kept: the command it names resumes them
        import shlex

        resume = shlex.split(last.split("continue with: ", 1)[1])
        done = subprocess.run([sys.executable, *resume[1:]], cwd=ROOT, env=ENV, capture_output=True, text=True,
                              timeout=300, check=False)
        assert done.returncode == 0, done.stderr
        assert json.loads((out / "p.json").read_text())["n_sequences"] == 4000
    else:  # interrupted before a batch finished: nothing of the run is left, the same command starts afresh
        assert "run the same command again" in last and not out.exists()


def test_a_ctrl_c_python_drops_still_ends_with_status_130(tmp_path, capsys, monkeypatch):
    """Python ignores an exception raised in an at-fork hook or a finalizer: the command still ends with 130."""
    import signal

    from kl_estimation import cli

    def swallowed(folder, *a, **k):
        try:  # what a Ctrl-C landing in logging's at-fork hook does
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        except KeyboardInterrupt:
            pass
        return Path(folder) / "plots" / "index.html"

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(cli, "draw_figures", swallowed)
    code, _, err = call(cli.visualize_main, [str(tmp_path / "run")], capsys)
    one_line(code, err, "interrupted: the signal came as the work ended", status=130)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_ctrl_c_in_a_finalizer_stops_the_work_after_it(tmp_path, capsys, monkeypatch):
    """A Ctrl-C landing in a finalizer (here a __del__, in CI regex's) is delivered again once the finalizer returns:
    the work stops there, with the usual line and no "Exception ignored" traceback."""
    import gc

    from kl_estimation import cli

    class Finalized:
        def __del__(self):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)

    steps = []

    def work(folder, *a, **k):
        Finalized()
        gc.collect()
        for i in range(10**6):  # the redelivered signal lands here, at the first bytecodes after the finalizer
            steps.append(i)
        return Path(folder) / "plots" / "index.html"

    (tmp_path / "run").mkdir()
    monkeypatch.setattr(cli, "draw_figures", work)
    code, _, err = call(cli.visualize_main, [str(tmp_path / "run")], capsys)
    one_line(code, err, "interrupted: ", status=130)
    assert "came as the work ended" not in err and "Exception ignored" not in err and len(steps) < 10**6


def test_files_written_together_land_all_or_none(tmp_path):
    """An interruption before the end leaves the folder as it was (no temp file either); a Ctrl-C during the renames
    is held back until they and `done` have run, so a caller can tell that everything was written."""
    (tmp_path / "a.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with runio.files_together():
            runio.write_json(tmp_path / "a.json", {"new": 1})
            runio.write_text(tmp_path / "b.txt", "b")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and (tmp_path / "a.json").read_text() == "old"

    import torch

    torch.ones(512, 512) @ torch.ones(512, 512)  # worker threads, which a signal mask in the main thread would miss
    seen = []

    def done(name):
        seen.append(name)
        if name == "outer":  # Ctrl-C now: held back until every file is in place
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        with runio.files_together(done=lambda: done("outer")):
            runio.write_json(tmp_path / "a.json", {"new": 1})
            with runio.files_together(done=lambda: done("inner")):
                runio.write_text(tmp_path / "b.txt", "b")
            assert not (tmp_path / "b.txt").exists() and seen == []  # the inner block waits for the outer one
    assert seen == ["outer", "inner"] and json.loads((tmp_path / "a.json").read_text()) == {"new": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.txt"]
