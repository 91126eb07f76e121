#!/usr/bin/env bash
# The GPU check of issue 14, in one call: what the optimizer and the training step cost on a CUDA
# machine, and whether the device backend is correct and sync-free there. About 5 minutes on one
# recent GPU; every part prints what it runs or why it skips, and everything goes to one results
# file.
#
#   benchmarks/gpu_check.sh [--device cuda|cpu] [--quick] [--out FILE]
#
# Parts:
#   1. machine: GPU, driver, torch;
#   2. correctness on the device: the device backend against the float64 oracle with
#      torch.cuda.set_sync_debug_mode("error") around every step (routing log on and off), and
#      the device-backend tests (tests/test_optimizer_device.py);
#   3. optimizer step: MoLFAdamW (device backend, then eager) against fused and foreach AdamW,
#      smollm2-135m shapes, with host-device syncs per step with the routing log on and off;
#   4. operator calls and host reads per step at 10 and 30 layers (the CPU proxy, for reference);
#   5. training step (forward, backward, optimizer) in bfloat16 for smollm2-135m and 1B shapes;
#   6. with two or more GPUs, the distributed tests (DDP and FSDP2 over NCCL).
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

if [[ "$QUICK" == 1 ]]; then  # tiny sizes: the dry run checks the commands, not the numbers
  TINY=(--vocab 512)
  OPS=(--layers 1 2 "${TINY[@]}")
  OPT=(--layers 1 --steps 1 "${TINY[@]}")
  TRAIN=(--layers 1 --seq 16 --batch 1 --steps 1 "${TINY[@]}")
else
  OPS=(--layers 10 30)
  OPT=(--layers 30 --steps 20)
  TRAIN=(--steps 5)
fi

log() { echo "$*" | tee -a "$OUT"; }
section() { log ""; log "== $* =="; }
# Run a command, its output into the results file; a failing part is recorded and the check
# goes on, so one results file always comes back; the exit status says whether all passed.
FAILED=()
run() {
  local name="$1"; shift
  log "\$ $*"
  local start=$SECONDS
  if "$@" 2>&1 | tee -a "$OUT"; then
    log "-- $name: ok ($((SECONDS - start)) s)"
  else
    log "-- $name: FAILED ($((SECONDS - start)) s)"
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
  run device-tests "$PY" -m pytest -q -p no:cacheprovider tests/test_optimizer_device.py
else
  log "skipped the device tests: on CPU the test suite runs them, the CUDA ones need a GPU"
fi

section "optimizer step (smollm2-135m shapes, fp32)"
run optimizer-device "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --backend device "${OPT[@]}"
run optimizer-eager "$PY" benchmarks/optimizer_step.py --device "$DEVICE" --backend eager "${OPT[@]}"

section "operator calls and host reads per step (CPU proxy)"
run optimizer-ops "$PY" benchmarks/optimizer_ops.py "${OPS[@]}"

section "training step, bfloat16"
run train-smollm2 "$PY" benchmarks/train_step.py --device "$DEVICE" --dtype bfloat16 --shape smollm2-135m "${TRAIN[@]}"
run train-1b "$PY" benchmarks/train_step.py --device "$DEVICE" --dtype bfloat16 --shape 1b --target 1.05 "${TRAIN[@]}"

section "distributed (NCCL)"
if [[ "$DEVICE" == cuda && "$N_GPUS" -ge 2 ]]; then
  run distributed "$PY" -m pytest -q -p no:cacheprovider tests/test_distributed.py
else
  log "skipped the NCCL distributed tests: they need 2 GPUs ($N_GPUS here, device $DEVICE)"
fi

section "summary"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  log "failed parts: ${FAILED[*]}"
  log "results: $OUT"
  exit 1
fi
log "all parts passed; results: $OUT"
