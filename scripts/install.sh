#!/usr/bin/env bash
# Create .venv (if missing) and install gptoss-train with everything the tests and the quickstart need, on CPU.
# torch is pinned to the CPU build in the same pip command, so no resolver pulls a multi-GB CUDA wheel.
# Set GPTOSS_SKIP_LLAMACPP=1 to skip llama-cpp-python (a 5-9 minute source build on 2 cores, cached afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.gptoss-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0" -e ".[dev,offline,eval]"
# BFCL data + official checker only: its declared dependencies (numpy==1.26.4, provider SDKs) would break datasets.
python -m pip install -q --no-deps "bfcl-eval==2026.3.23"
if [ "${GPTOSS_SKIP_LLAMACPP:-0}" != "1" ]; then
  # -DGGML_NATIVE=OFF keeps the wheel portable; LLAVA off and two build jobs keep the compile to a few minutes.
  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    python -m pip install -q "torch==2.13.0" "llama-cpp-python>=0.3.16"
fi
echo "$want" > "$stamp"
