#!/usr/bin/env bash
# Issue 7 on one GPU in one call (one machine start): numerics check of the fast training path, then the
# head-to-head benchmark. Logs and tables land in $OUT (the device tool brings them back).
#   source scripts/device_setup.sh; bash scripts/gpu_train_fast_path.sh
#   CHECK=0 PHASES=hf,fast,recompute bash scripts/gpu_train_fast_path.sh     # benchmark only, other phases
set -o pipefail
OUT=${OUT:-/tmp/gpu_train_fast_path}
mkdir -p "$OUT/bench"
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
status=0
export TORCH_LOGS="${TORCH_LOGS:-recompiles}"   # one line per recompilation, with the guard that failed
# the benchmark first: if the call runs out of time, its numbers are already under $OUT
python scripts/bench_train.py --steps "${STEPS:-3}" --warmup "${WARMUP:-2}" --phases "${PHASES:-hf,fast,fast_eager}" \
  ${BENCH_ARGS:-} --out "$OUT/bench" 2>&1 | grep -v -e FutureWarning -e "warnings.warn" | tee "$OUT/bench.log" || status=1
if [ "${CHECK:-1}" = 1 ]; then
  python scripts/gpu_check_train.py --layers "${CHECK_LAYERS:-2}" --seq "${CHECK_SEQ:-512}" 2>&1 \
    | grep -v -e FutureWarning -e "warnings.warn" | tee "$OUT/gpu_check.log" || status=1
fi
exit $status
