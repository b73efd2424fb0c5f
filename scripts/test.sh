#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole suite. Fails if pytest fails
# or collects nothing (pytest exit 5 is an error here, not a pass).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRITON_INTERPRET=1 TOKENIZERS_PARALLELISM=false
set +e
.venv/bin/python -m pytest tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$rc"
