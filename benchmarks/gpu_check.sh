#!/usr/bin/env bash
# The GPU check of issue 14, in one call: what the optimizer and the training step cost on a CUDA
# machine, and whether the device backend is correct and sync-free there. Under ten minutes: each
# part has a time limit, and a part that would start after BUDGET seconds (default 540) is
# skipped with a note. Every part prints what it runs or why it skips; everything goes to one
# results file, and the exit status is 0 only if every part that ran passed.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out FILE]
#
# Parts, most important first:
#   1. machine: GPU, driver, torch;
#   2. correctness on the device: tests/test_optimizer_device.py, which on CUDA checks the device
#      backend against the float64 oracle with torch.cuda.set_sync_debug_mode("error") around
#      every step, routing log on and off;
#   3. optimizer step: MoLFAdamW's device backend against fused and foreach AdamW, smollm2-135m
#      shapes, with host-device syncs per step with the routing log on and off;
#   4. training step (forward, backward, optimizer) in bfloat16 for smollm2-135m and 1B shapes;
#   5. with two or more GPUs, the distributed tests (DDP and FSDP2 over NCCL);
#   6. the eager backend's optimizer step, for comparison;
#   7. what torch.compile of the device backend's step functions costs and saves.
# --device cpu --quick is the dry run the test suite makes: the same commands on CPU at tiny sizes.
set -euo pipefail

DEVICE=cuda
QUICK=0
OUT=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1
if [[ -z "$OUT" ]]; then
  mkdir -p benchmarks/results
  OUT="benchmarks/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).txt"
fi
: > "$OUT"

BUDGET="${BUDGET:-540}"
if [[ "$QUICK" == 1 ]]; then  # tiny sizes: the dry run checks the commands, not the numbers
  TINY=(--vocab 512)
  OPT=(--layers 1 --steps 1 "${TINY[@]}")
  TRAIN=(--layers 1 --seq 16 --batch 1 --steps 1 "${TINY[@]}")
else
  OPT=(--layers 30 --steps 20)
  TRAIN=(--steps 5)
fi

log() { echo "$*" | tee -a "$OUT"; }
section() { log ""; log "== $* =="; }
# Run a part within LIMIT seconds, its output into the results file; a failing part is recorded
# and the check goes on, so one results file always comes back; the exit status says whether
# all passed. A part that would start after BUDGET seconds is skipped.
FAILED=()
run() {
  local name="$1" limit="$2"; shift 2
  if (( SECONDS > BUDGET )); then
    log "-- $name: skipped, the check has used its ${BUDGET} s"
    return
  fi
  log "\$ $*"
  local start=$SECONDS
  if timeout "$limit" "$@" 2>&1 | tee -a "$OUT"; then
    log "-- $name: ok ($((SECONDS - start)) s)"
  else
    log "-- $name: FAILED or over its ${limit} s ($((SECONDS - start)) s)"
    FAILED+=("$name")
  fi
}

section "machine"
log "date: $(date -u +%FT%TZ), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT"
else
  log "skipped nvidia-smi: not installed here"
fi
VERSIONS=$("$PY" -c "import torch; print(torch.cuda.device_count(), 'torch', torch.__version__, 'cuda', torch.version.cuda)")
N_GPUS="${VERSIONS%% *}"
log "${VERSIONS#* }, $N_GPUS CUDA devices"
if [[ "$DEVICE" == cuda && "$N_GPUS" -lt 1 ]]; then
  log "no CUDA device: run with --device cpu for a dry run"
  exit 2
fi

section "correctness on $DEVICE"
if [[ "$DEVICE" == cuda ]]; then
  run device-tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_optimizer_device.py
else
  log "skipped the device tests: on CPU the test suite runs them, the CUDA ones need a GPU"
fi

section "optimizer step, device backend (smollm2-135m shapes, fp32)"
run optimizer-device 150 "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --backend device "${OPT[@]}"

section "training step, bfloat16"
run train-1b 150 "$PY" benchmarks/train_step.py --device "$DEVICE" --dtype bfloat16 --shape 1b --target 1.05 "${TRAIN[@]}"
run train-smollm2 120 "$PY" benchmarks/train_step.py --device "$DEVICE" --dtype bfloat16 --shape smollm2-135m "${TRAIN[@]}"

section "distributed (NCCL)"
if [[ "$DEVICE" == cuda && "$N_GPUS" -ge 2 ]]; then
  run distributed 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py
else
  log "skipped the NCCL distributed tests: they need 2 GPUs ($N_GPUS here, device $DEVICE)"
fi

section "optimizer step, eager backend, for comparison"
run optimizer-eager 150 "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --backend eager "${OPT[@]}"

section "torch.compile of the device backend's step functions"
if [[ "$QUICK" == 1 ]]; then
  log "skipped in --quick: compiling takes minutes on a CPU (inductor builds C++)"
else
  run compile-cost 150 "$PY" benchmarks/compile_cost.py --device "$DEVICE" --layers 1
fi

section "summary"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "failed parts: ${FAILED[*]}"
  log "results: $OUT"
  exit 1
fi
log "all parts passed; results: $OUT"
