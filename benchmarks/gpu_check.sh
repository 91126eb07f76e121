#!/usr/bin/env bash
# The GPU check of issue 14, in one call: what the optimizer and the training step cost on a CUDA
# machine, and whether the device backend is correct and sync-free there. Made for a lent
# machine: python3 (no `python` needed), no network, one command of at most ten minutes, and
# results read back from one folder only.
#
#   benchmarks/gpu_check.sh --out DIR [--device cuda|cpu] [--quick] [--limit SECONDS]
#
# Everything goes to DIR/gpu_check.txt (DIR is created; nothing else is written outside it but
# caches). --limit (default 540) is a hard wall-clock limit for the whole script: each part runs
# under a timeout of its own limit or the time left, whichever is shorter (killed 5 s after
# that), and a part that would start with less than 15 s left is not started; the summary is
# written in the 10 s kept for it. A performance target a benchmark reports as MISSED is listed
# in the summary. Exit status:
#   0  every part ran and passed, and every target was met
#   1  a part failed or ran out of time
#   2  bad arguments, or --device cuda without a CUDA device
#   3  every part that ran passed, but a performance target was missed
#   4  every part that ran passed and met its targets, but the limit left parts unrun
# (in that order of precedence: a failure hides a missed target, which hides an unrun part).
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
# --device cpu --quick is the dry run the test suite makes: the same commands on CPU at tiny
# sizes, whose numbers mean nothing, so their targets are shown but not counted.
# PYTHON=/path/to/python overrides the interpreter (default: python3, else python).
set -uo pipefail

DEVICE=cuda
QUICK=0
OUT_DIR=""
LIMIT=540
usage() { echo "gpu_check.sh: $1 (see --help)" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) [[ $# -ge 2 ]] || usage "--device needs a value"; DEVICE="$2"; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --out) [[ $# -ge 2 ]] || usage "--out needs a directory"; OUT_DIR="$2"; shift 2 ;;
    --limit) [[ $# -ge 2 ]] || usage "--limit needs seconds"; LIMIT="$2"; shift 2 ;;
    -h|--help) sed -n '2,35p' "$0"; exit 0 ;;
    *) usage "unknown argument $1" ;;
  esac
done
[[ -n "$OUT_DIR" ]] || usage "--out DIR is required: the results go there"
[[ "$DEVICE" == cuda || "$DEVICE" == cpu ]] || usage "--device must be cuda or cpu"
[[ "$LIMIT" =~ ^[0-9]+$ ]] && (( LIMIT >= 30 )) || usage "--limit must be a whole number of seconds >= 30"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$OUT_DIR" || usage "cannot create $OUT_DIR"
OUT="$(cd "$OUT_DIR" && pwd)/gpu_check.txt"
cd "$ROOT"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
: > "$OUT"

RESERVE=10      # seconds kept for the summary
MIN_START=15    # a part is not started with less time than this left
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
FAILED=()
NOT_RUN=()
MISSED=()
MET=0
# Run a part under a timeout of min(its limit, the time left), its output into the results
# file; a failing part is recorded and the check goes on, so the results file always comes back.
run() {
  local name="$1" limit="$2"; shift 2
  local left=$(( LIMIT - RESERVE - SECONDS ))
  if (( left < MIN_START )); then
    log "-- $name: NOT RUN: ${left} s left of the ${LIMIT} s limit"
    NOT_RUN+=("$name")
    return
  fi
  local t=$(( limit < left ? limit : left ))
  log "\$ $* (timeout ${t} s)"
  local start=$SECONDS first
  first=$(( $(wc -l < "$OUT") + 1 ))
  timeout -k 5 "$t" "$@" 2>&1 | tee -a "$OUT"
  local status=${PIPESTATUS[0]}
  local took=$(( SECONDS - start ))
  if (( status == 0 )); then
    log "-- $name: ok (${took} s)"
  elif (( status == 124 || status == 137 )); then
    log "-- $name: FAILED: stopped at its ${t} s timeout (${took} s)"
    FAILED+=("$name")
  else
    log "-- $name: FAILED: exit status ${status} (${took} s)"
    FAILED+=("$name")
  fi
  local verdicts
  verdicts=$(tail -n +"$first" "$OUT" | grep -E 'target <= [0-9.]+x: (met|MISSED)' || true)
  [[ -n "$verdicts" ]] || return 0
  local n_met n_missed
  n_met=$(grep -c ': met' <<< "$verdicts" || true)
  n_missed=$(grep -c ': MISSED' <<< "$verdicts" || true)
  if [[ "$QUICK" == 1 ]]; then
    log "-- $name: targets not counted in --quick (tiny sizes): ${n_met} met, ${n_missed} missed"
    return 0
  fi
  MET=$(( MET + n_met ))
  while IFS= read -r line; do
    MISSED+=("$name: $(sed -E 's/^ +//' <<< "$line")")
  done < <(grep ': MISSED' <<< "$verdicts" || true)
  log "-- $name: targets ${n_met} met, ${n_missed} MISSED"
}

section "machine"
log "date: $(date -u +%FT%TZ), commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
log "limit: ${LIMIT} s for the whole check, device ${DEVICE}$([[ "$QUICK" == 1 ]] && echo ', --quick'), python: ${PY}"
if command -v nvidia-smi >/dev/null; then
  timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$OUT"
else
  log "skipped nvidia-smi: not installed here"
fi
if ! VERSIONS=$(timeout 120 "$PY" -c "import torch; print(torch.cuda.device_count(), 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1); then
  log "cannot import torch with $PY: $VERSIONS"
  log "summary: FAILED before any part ran; results: $OUT"
  exit 1
fi
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
log "took ${SECONDS} s of the ${LIMIT} s limit"
CODE=0
if (( ${#NOT_RUN[@]} > 0 )); then
  log "NOT RUN (time limit): ${NOT_RUN[*]}"
  CODE=4
fi
if [[ "$QUICK" != 1 ]]; then
  log "performance targets: ${MET} met, ${#MISSED[@]} MISSED"
  for missed in "${MISSED[@]}"; do
    log "  ${missed}"
  done
  (( ${#MISSED[@]} > 0 )) && CODE=3
fi
if (( ${#FAILED[@]} > 0 )); then
  log "FAILED parts: ${FAILED[*]}"
  CODE=1
fi
if (( CODE == 0 )); then
  log "all parts passed; results: $OUT"
else
  log "exit status ${CODE}; results: $OUT"
fi
exit "$CODE"
