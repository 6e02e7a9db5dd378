#!/usr/bin/env bash
# Source this at the start of every command sent to the lent GPU machine (see docs/benchmarks.md):
#   source scripts/device_setup.sh
# It installs the wheels carried in .whl/ (packages the GPU image lacks: trl, datasets, openai-harmony, gguf, ...)
# into /tmp/site, points Harmony at the carried o200k vocabulary, and puts the repo on PYTHONPATH.
set -u
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.done || echo "device_setup: wheel install failed" >&2
fi
export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
[ -f .whl/tiktoken/o200k_base.tiktoken ] && export TIKTOKEN_ENCODINGS_BASE="$PWD/.whl/tiktoken"
export GPTOSS_TRAIN_CACHE=/tmp/gptoss-cache HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
