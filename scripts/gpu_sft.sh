#!/usr/bin/env bash
# SFT throughput runs on a 20b-shaped random checkpoint (the coordinator runs this on the lent GPU machines).
#
#   bash scripts/gpu_sft.sh lora          # 1 GPU (nvidia-h100-x1): recipes/sft_lora.py, 20b shape, ~300 steps
#   bash scripts/gpu_sft.sh full          # 2 GPUs (nvidia-h200-x2): recipes/sft_full.py + FSDP2, 20b shape, 4 layers
#   bash scripts/gpu_sft.sh cpu-smoke     # the same commands on CPU with the tiny preset (tests run this)
#
# Each run prints the recipe's summary line: steps, seconds, tokens/s (non-pad tokens through the model) and peak
# GPU memory. Environment: STEPS, SEQ (tokens per packed row), OUT (work folder), EXTRA (more overrides, e.g.
# EXTRA="train.batch_size=4").
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-lora}
if [ -f scripts/device_setup.sh ] && [ "$mode" != cpu-smoke ]; then
  # shellcheck disable=SC1091
  source scripts/device_setup.sh
fi
OUT=${OUT:-/tmp/gptoss-gpu-sft}
PY=${PYTHON:-python}
mkdir -p "$OUT"
build() {  # build <folder> <args...>: a random checkpoint in the real layout, once
  local dest=$1; shift
  [ -f "$dest/config.json" ] || "$PY" -m gptoss_train.cli.build_tiny "$dest" "$@"
}
common="data.train_files=[demo:train] data.packing=true train.logging=none train.save_every=0 train.log_every=10"
case "$mode" in
  lora)
    STEPS=${STEPS:-300}; SEQ=${SEQ:-2048}
    build "$OUT/m20b" --preset 20b
    accelerate launch --config_file configs/accelerate/single-gpu.yaml recipes/sft_lora.py \
      --config configs/sft/20b-lora.yaml model.path="$OUT/m20b" $common data.max_length="$SEQ" \
      train.steps="$STEPS" train.grad_accum=1 train.output_dir="$OUT/lora-run" ${EXTRA:-}
    ;;
  full)
    STEPS=${STEPS:-30}; SEQ=${SEQ:-2048}
    build "$OUT/m20b-4l" --preset 20b --layers 4
    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes 2 recipes/sft_full.py \
      --config configs/sft/20b-full.yaml model.path="$OUT/m20b-4l" $common data.max_length="$SEQ" \
      train.steps="$STEPS" train.grad_accum=1 train.output_dir="$OUT/full-run" ${EXTRA:-}
    ;;
  cpu-smoke)
    STEPS=${STEPS:-2}; SEQ=${SEQ:-1024}
    build "$OUT/tiny" --preset tiny --device cpu
    accelerate launch --config_file configs/accelerate/cpu.yaml recipes/sft_lora.py \
      --config configs/sft/20b-lora.yaml model.path="$OUT/tiny" model.dtype=float32 $common data.max_length="$SEQ" data.limit=8 \
      train.steps="$STEPS" train.grad_accum=1 train.gradient_checkpointing=false train.output_dir="$OUT/lora-run" \
      train.progress=false
    accelerate launch --config_file configs/accelerate/cpu.yaml recipes/sft_full.py \
      --config configs/sft/20b-full.yaml model.path="$OUT/tiny" model.dtype=float32 $common data.max_length="$SEQ" data.limit=8 \
      train.steps="$STEPS" train.grad_accum=1 train.gradient_checkpointing=false train.output_dir="$OUT/full-run" \
      train.progress=false
    ;;
  *)
    echo "usage: bash scripts/gpu_sft.sh lora|full|cpu-smoke" >&2; exit 2 ;;
esac
