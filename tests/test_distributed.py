"""Data parallel under torchrun (gloo on CPU): the same records as one process, whatever the number of ranks, and
a resume that picks up every rank's finished batches whatever the earlier and the new world size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kl_estimation.cli import llm_main
from kl_estimation.llm.run import distributed, units
from tiny_lms import save_pair

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROPOSALS = ["P", "Geometric (β=0.5)", "Adaptive [prefix-aware]"]
FILES = ("p.json", "geometric_beta-0.5.json", "adaptive_prefix-aware.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("tiny"))


def argv(tiny, out, *extra):
    return ["--p-model", tiny[0], "--q-model", tiny[1], "--prompt", "a b", "--n-samples", "40", "--max-new-tokens", "4",
            "--temperature", "0.8", "--batch-size", "16", "--output-dir", str(out), "--proposals", *PROPOSALS,
            *extra]


def torchrun(n: int, args: list, launcher_args=(), **env):
    """`torchrun --standalone --nproc-per-node n tests/dist_entry.py args` on CPU (gloo)."""
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
         "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **env}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           *launcher_args, str(ROOT / "tests" / "dist_entry.py"), *args],
                          env=e, capture_output=True, text=True, timeout=300)


def records(folder: Path, name: str) -> list[dict]:
    return json.loads((folder / name).read_text())["sequences"]


def without_rank(recs):
    return [{k: v for k, v in r.items() if k != "rank"} for r in recs]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    assert llm_main(argv(tiny, out)) == 0
    return out


@pytest.mark.parametrize("n_batches", [1, 2, 5, 9])
def test_ranks_take_each_forward_batch_once_in_the_one_process_packing(n_batches):
    batches = list(range(n_batches))
    for world in (1, 2, 3, 4):
        shares = [distributed.Shard(k, world).mine(batches) for k in range(world)]
        assert sorted(b for s in shares for b in s) == batches
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced to one batch


def test_without_torchrun_nothing_is_initialised(one_process, monkeypatch):
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    assert distributed.from_env("auto") is distributed.ONE
    assert not torch.distributed.is_initialized()
    doc = json.loads((one_process / "p.json").read_text())
    assert doc["config"]["world_size"] == 1 and {r["rank"] for r in doc["sequences"]} == {0}
    assert not list(one_process.glob("*.partial.jsonl"))


def test_fewer_gpus_than_ranks_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.local_gpus(4) == [2, 3]  # two GPUs per rank for --device-map auto
    with pytest.raises(ValueError, match="torchrun started 2 processes on this node but only 1 GPUs"):
        distributed.local_gpus(1)


def test_killed_one_process_run_resumed_by_two_ranks_is_identical(tiny, one_process, tmp_path, monkeypatch):
    real, calls = units.sample_batch, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # one forward batch of P drawn by the one-process run, 8 left for the two ranks
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(units, "sample_batch", dying)
    out = tmp_path / "run"
    assert llm_main(argv(tiny, out)) == 130  # Ctrl-C: what was kept, exit 130
    assert (out / "p.partial.jsonl").exists()
    r = torchrun(2, argv(tiny, out, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("output folder:") == 1  # rank 0 alone reports
    for f in FILES:
        got = records(out, f)
        assert without_rank(got) == without_rank(records(one_process, f)), f
        assert json.loads((out / f).read_text())["estimates"] == json.loads((one_process / f).read_text())[
            "estimates"]
    assert {r["rank"] for r in records(out, FILES[2])} == {0, 1}  # the work was shared
    assert json.loads((out / "summary.json").read_text())["config"]["world_size"] == 2
    assert not list(out.glob("*.partial.jsonl"))


def test_killed_two_rank_run_resumed_by_one_process_is_identical(tiny, one_process, tmp_path):
    out = tmp_path / "run"
    r = torchrun(2, argv(tiny, out), KL_TEST_DIE_AFTER="2")  # rank 0 dies at its 2nd batch, rank 1 at its 3rd
    assert r.returncode != 0
    left = sorted(p.name for p in out.glob("*.partial.jsonl"))
    assert left == ["p.rank0.partial.jsonl", "p.rank1.partial.jsonl"] and not (out / "p.json").exists()
    kept = [json.loads(ln) for f in left for ln in (out / f).read_text().splitlines()[1:]]
    assert {tuple(u) for ln in kept for u in ln["units"]} == {(0, 0, 16), (0, 1, 16)}  # one batch per rank
    code = llm_main(argv(tiny, out))
    assert code == 2  # the CLI still refuses to clobber rank files without --resume
    assert llm_main(argv(tiny, out, "--resume")) == 0
    for f in FILES:
        assert without_rank(records(out, f)) == without_rank(records(one_process, f)), f
    assert [r["rank"] for r in records(out, "p.json")][::16] == [0, 1, 0]  # kept from the ranks that drew them
    assert not list(out.glob("*.partial.jsonl"))


def test_cuda_backend_without_gpus_fails_on_every_rank(tiny, tmp_path):
    out, logs = tmp_path / "run", tmp_path / "logs"
    # the agent looks every 5 s, not 0.1 s: a rank still importing is not stopped by the other's failure before it
    # fails on its own (its stderr was empty in 2 of 5 runs on a fast host)
    r = torchrun(2, argv(tiny, out, "--device", "cuda"),
                 ["--log-dir", str(logs), "--redirects", "2", "--monitor-interval", "5"])
    assert r.returncode != 0 and not out.exists()
    per_rank = sorted(logs.rglob("stderr.log"))  # each rank's own stderr (torchrun adds its own report)
    assert len(per_rank) == 2
    for f in per_rank:
        err = f.read_text().strip().splitlines()
        assert len(err) == 1 and err[0].startswith("LLM_experiments.py: error: --device: cuda"), err


def test_both_directions_under_two_ranks_match_one_process(tiny, tmp_path):
    """The reverse units are sharded like the forward ones: the same records in reverse/ whatever the world size."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert llm_main(argv(tiny, one, "--direction", "both", "--no-plots")) == 0
    r = torchrun(2, argv(tiny, two, "--direction", "both", "--no-plots"))
    assert r.returncode == 0, r.stderr[-3000:]
    for f in FILES + ("reverse/q.json", "reverse/geometric_beta-0.5.json", "reverse/adaptive_prefix-aware.json"):
        assert without_rank(records(two, f)) == without_rank(records(one, f)), f
    assert {r["rank"] for r in records(two, "reverse/q.json")} == {0, 1}
    assert json.loads((two / "summary.json").read_text())["jeffreys"] == json.loads(
        (one / "summary.json").read_text())["jeffreys"]
    assert not list(two.rglob("*.partial.jsonl"))
