#!/usr/bin/env bash
# The main job on the embedded default model. Sets up .venv if needed first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/cai run --preset demo --out runs/demo "$@"
