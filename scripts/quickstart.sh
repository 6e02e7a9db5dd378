#!/usr/bin/env bash
# The README's main command: install (.venv, CPU torch) and run the CPU quickstart on the bundled demo data:
# build a tiny random gpt-oss, measure held-out tool-call exact match, LoRA fine-tune, measure again.
# Arguments go to gptoss-quickstart (see `gptoss-quickstart --help`), e.g. --out runs/qs --steps 200.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec gptoss-quickstart "$@"
