#!/usr/bin/env bash
# One prepared check for a machine with CUDA (DESIGN.md §6): install, build, run the CUDA-only
# tests (Triton kernels compiled for real, green-context lanes, the device path of generate)
# and short measurements, then print one summary. Under 8 minutes on an H100/H200.
# Without CUDA it says so and exits 0.
#   bash scripts/gpu_check.sh [OUT_DIR]          (OUT_DIR default: gpu_check_out)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}

if ! command -v nvidia-smi > /dev/null 2>&1 || ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu_check: no CUDA device here (nvidia-smi finds none); nothing to check. Exit 0."
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

start=$(date +%s)
step() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }

step "install (the machine's own CUDA torch is kept; the package and its test extra on top)"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2> /dev/null; then
  $PY -m pip install -q "torch>=2.13,<3" || exit 1
fi
$PY -m pip install -q -e ".[test,gpu]" > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

step "CUDA-only tests"
# Triton kernels compiled for real (no interpreter), green-context lanes, the device path.
TRITON_INTERPRET=0 timeout 300 $PY -m pytest -q -x tests/store/test_kernels.py tests/engine/test_lanes.py tests/runtime/test_generate.py \
  -k "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
tests_rc=${PIPESTATUS[0]}

step "green-context lanes: SMs granted per split"
timeout 120 $PY - <<'PYEOF' 2>&1 | tee "$OUT/lanes.txt"
import torch
from magicpig.engine.lanes import make_lanes
lanes = make_lanes(torch.device("cuda"))
print(lanes.kind, "-", lanes.description)
lanes.close()
PYEOF

step "end-to-end generate on the GPU (embedded model, 4k-token prompt, dense and magicpig)"
timeout 180 $PY - <<'PYEOF' 2>&1 | tee "$OUT/generate.txt"
import time, torch
from magicpig import LongContextModel, MagicPIGConfig
m = LongContextModel.from_pretrained(device="cuda")
prompt = "The lighthouse keeper wrote the weather into his logbook. " * 330 + "What did he write?"
for config in (MagicPIGConfig(method="dense"), MagicPIGConfig(K=10, L=400, min_collisions=4)):
    m.generate(prompt, max_new_tokens=4, config=config)  # warm-up
    torch.cuda.synchronize(); t = time.perf_counter()
    r = m.generate(prompt, max_new_tokens=64, config=config)
    torch.cuda.synchronize()
    print(f"{config.method:9s} prompt {r.stats.prompt_tokens} new {len(r.token_ids)} "
          f"prefill {r.stats.prefill_seconds:.3f} s decode {r.stats.decode_tokens_per_second:.1f} tok/s "
          f"cost {r.stats.computation_cost:.3f} total {time.perf_counter() - t:.2f} s: {r.text[:60]!r}")
PYEOF

step "summary"
echo "tests: $(tail -1 "$OUT/tests.log")"
echo "lanes: $(head -1 "$OUT/lanes.txt")"
cat "$OUT/generate.txt" | grep -E "^(dense|magicpig)" || echo "generate: failed (see $OUT/generate.txt)"
echo "elapsed: $(( $(date +%s) - start )) s; logs in $OUT/"
exit $tests_rc
