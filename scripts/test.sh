#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite. Fails if pytest fails
# or collects nothing (pytest exit 5 is an error here, not a pass).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
suite() {  # pytest exit 5 (nothing collected) is a failure, not a pass
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating as a failure" >&2
    rc=1
  fi
  return "$rc"
}
# The suite with Triton interpreted, so its kernels are tested on CPU tensors.
TRITON_INTERPRET=1 suite .venv/bin/python -m pytest tests "$@" || exit $?
# On a machine with a CUDA device, a second pass runs the GPU tests with Triton compiled.
if .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "[test] CUDA device present: GPU tests with Triton compiled"
  env -u TRITON_INTERPRET .venv/bin/python -m pytest tests -m gpu -q || exit $?
fi
