"""llm/run/store.py: a proposal's files (partial lines, then the final document) read back into units, refusing
files of other settings; what an interrupted run kept; the folder checks of a new and a resumed run; an earlier
run's files found (and a user's left alone)."""
import json

import numpy as np
import pytest

from kl_estimation import runio
from kl_estimation.llm.run.config import LLMConfig
from kl_estimation.llm.run.store import (
    ProposalFiles,
    check_folder,
    drop_unfinished,
    earlier_run_files,
    kept,
    records_to_arrays,
)
from kl_estimation.llm.run.units import Unit, plan_units

KEY = {"models": "x", "seed": 0}


def recs(u: Unit):
    return [{"prompt": u.prompt, "batch": u.batch, "i": i} for i in range(u.rows)]


def test_records_to_arrays_pads_after_the_last_step():
    r = [{"log_p": [-1.0, -2.0], "log_q": [-1.5, -2.5], "log_r": [-1.0, -2.0], "kl_step": [0.1, 0.2]},
         {"log_p": [-3.0], "log_q": [-3.5], "log_r": [-3.0], "kl_step": [0.3]}]
    a = records_to_arrays(r, 3)
    np.testing.assert_array_equal(a["mask"], [[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(a["log_q"], [[-1.5, -2.5, 0], [-3.5, 0, 0]])


def test_partial_lines_resume_and_the_final_document_replaces_them(tmp_path):
    units = plan_units(2, 5, 2)
    f = ProposalFiles(tmp_path, "p")
    f.start(KEY, {}, resume=False)
    f.append(units[:2], recs(units[0]) + recs(units[1]))
    with open(f.partial, "a") as fh:
        fh.write('{"units": [[0, 2, 1]], "seq')  # a line cut short by a kill
    done = ProposalFiles(tmp_path, "p").read_done(KEY, units, resume=True)
    assert done == {units[0]: recs(units[0]), units[1]: recs(units[1])}
    assert ProposalFiles(tmp_path, "p").read_done(KEY, units, resume=False) == {}
    with pytest.raises(ValueError, match="^resume: .* written with other settings \\(seed: 0 then, 1 now\\)"):
        f.read_done(dict(KEY, seed=1), units, resume=True)
    f.finish({"run_key": KEY, "sequences": [r for u in units for r in recs(u)]})
    assert f.final.exists() and not f.earlier_partials()
    fewer = plan_units(2, 3, 2)  # a run asking for fewer sequences per prompt reuses the first ones
    assert ProposalFiles(tmp_path, "p").read_done(KEY, fewer, resume=True) == {u: recs(u) for u in fewer}


def test_kept_and_drop_unfinished(tmp_path):
    units = plan_units(1, 4, 2)
    a, b = ProposalFiles(tmp_path, "p"), ProposalFiles(tmp_path, "alpha-mixture_alpha-0.5")
    a.start(KEY, {}, resume=False)
    a.append(units[:1], recs(units[0]))
    b.start(KEY, {}, resume=False)  # interrupted before its first batch: a header only
    parts = [("forward", "P"), ("forward", "Alpha-mixture (α=0.5)")]
    assert kept(tmp_path, parts) == ([], 1, 2)
    drop_unfinished(tmp_path, parts)
    assert a.partial.exists() and not b.partial.exists()


def _cfg(folder, **kw):
    return LLMConfig(prompt="a b", proposals=("P",), output_dir=str(folder), **kw)


def test_check_folder_new_and_resumed_runs(tmp_path):
    check_folder(_cfg(tmp_path / "new"))  # a new folder is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="^resume: .* holds no files of this run's proposals"):
        check_folder(_cfg(tmp_path / "other", resume=True))
    runio.write_json(tmp_path / "other" / "p.json", {"run_key": KEY})
    with pytest.raises(ValueError, match="^output_dir: .* already holds results \\(p.json\\)"):
        check_folder(_cfg(tmp_path / "other"))
    check_folder(_cfg(tmp_path / "other", resume=True))
    check_folder(_cfg(tmp_path / "other", overwrite=True))


def test_earlier_run_files_leave_a_users_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "config.json").write_text(json.dumps({"lr": 1}))  # a user's JSON: no run_key
    runio.write_json(tmp_path / "p.json", {"run_key": KEY})
    runio.write_json(tmp_path / "summary.json", {})
    (tmp_path / "reverse").mkdir()
    runio.write_json(tmp_path / "reverse" / "q.json", {"run_key": KEY})
    found = {p.relative_to(tmp_path).as_posix() for p in earlier_run_files(tmp_path)}
    assert found == {"p.json", "summary.json", "reverse"}
    (tmp_path / "reverse" / "mine.txt").write_text("mine")
    found = {p.relative_to(tmp_path).as_posix() for p in earlier_run_files(tmp_path)}
    assert found == {"p.json", "summary.json", "reverse/q.json"}
    runio.remove(earlier_run_files(tmp_path))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "mine.txt", "notes.txt", "reverse"]
