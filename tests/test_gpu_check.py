"""bench/gpu_check.sh cannot rot: its dry run (CPU, tiny shapes) runs every step it can here and writes the summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_dry_run_runs_and_writes_its_summary(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] and [s["name"] for s in doc["steps"]] == ["cuda_tests", "bench_llm", "bench_kl_loss"]
    assert all(s["ok"] for s in doc["steps"]), [(s["name"], s["tail"][-5:]) for s in doc["steps"] if not s["ok"]]
    assert "tokens/s" in (tmp_path / "bench_llm.log").read_text()
    assert "step" in r.stdout.splitlines()[-5] or "step" in r.stdout
