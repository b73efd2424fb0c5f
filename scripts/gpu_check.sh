#!/usr/bin/env bash
# The engine on one CUDA GPU, checked in a few minutes with the Python already there:
#   scripts/gpu_check.sh OUT
# Runs from a copy of the working tree with PYTHONPATH=. ; creates no venv and downloads
# nothing (the models are random-weight dummies and tiny test checkpoints); nvtx, peft and
# flash-attn are used only when importable. Steps, each logged to OUT/<step>.log:
#   gpu_tests        pytest -m gpu (Triton compiled, not interpreted: TRITON_INTERPRET unset)
#   generate_135m    bench.generate on dummy:smollm2-135m, batch 1/8/32, 128 new tokens
#   generate_1b      bench.generate on dummy:llama-1b, batch 1/8, 64 new tokens
#   kernels          bench.kernels on CUDA at the default op sizes
# then OUT/summary.json: the device, versions, each step's exit status, seconds and the last
# JSON line it printed. About 6 minutes on one H100-class GPU. Exits non-zero if any step
# failed, and at once (writing nothing) when no CUDA device is present.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET CAI_KERNELS  # scripts/test.sh interprets Triton; here it must compile

# No GPU at all: say so before asking any Python (this machine's python3 may lack torch)
if ! ls /dev/nvidia[0-9]* >/dev/null 2>&1 && ! { command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q GPU; }; then
  echo "gpu_check: no CUDA device is present (no /dev/nvidia*, no GPU listed by nvidia-smi); run it on a machine with a CUDA GPU" >&2
  exit 1
fi
if ! "$PY" - <<'EOF'
import sys
try:
    import torch
except ImportError as exc:
    sys.exit(f"gpu_check: this Python cannot import torch ({exc})")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device is present (torch.cuda.is_available() is False); "
             "run it on a machine with a CUDA GPU")
for mod in ("triton", "transformers", "pytest"):
    try:
        __import__(mod)
    except ImportError as exc:
        sys.exit(f"gpu_check: this Python cannot import {mod} ({exc}); it needs torch, triton, transformers, pytest")
print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
EOF
then
  exit 1
fi

mkdir -p "$OUT"
STEPS=()
step() {  # step NAME TIMEOUT_S CMD...: run, log, record the exit status and the time
  local name=$1 limit=$2
  shift 2
  echo "[gpu_check] $name: $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - t0))" >>"$OUT/steps.txt"
  echo "[gpu_check] $name: exit $rc after $((SECONDS - t0)) s"
  STEPS+=("$name")
}
: >"$OUT/steps.txt"
step gpu_tests 240 "$PY" -m pytest tests -m gpu -q -rs -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
step generate_135m 60 "$PY" -m bench.generate --model dummy:smollm2-135m --device cuda --batch-sizes 1,8,32 --new-tokens 128
step generate_1b 60 "$PY" -m bench.generate --model dummy:llama-1b --device cuda --batch-sizes 1,8 --new-tokens 64
step kernels 90 "$PY" -m bench.kernels --device cuda

"$PY" - "$OUT" <<'EOF'
import importlib.util, json, sys, xml.etree.ElementTree as ET
from pathlib import Path
import torch, triton, transformers

out = Path(sys.argv[1])
steps = {}
for line in (out / "steps.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    last = None
    for text in reversed((out / f"{name}.log").read_text(errors="replace").splitlines()):
        if text.startswith("{"):
            try:
                last = json.loads(text)
            except ValueError:
                pass
            break
    steps[name] = {"exit": int(rc), "seconds": int(seconds), "log": f"{name}.log", "result": last}
xml = out / "gpu_tests.xml"
if xml.is_file():
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    steps["gpu_tests"]["tests"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
summary = {
    "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "transformers": transformers.__version__,
    "optional": {m: importlib.util.find_spec(m) is not None for m in ("nvtx", "peft", "flash_attn", "vllm")},
    "steps": steps, "ok": all(s["exit"] == 0 for s in steps.values()),
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({"ok": summary["ok"], **{k: v["exit"] for k, v in steps.items()}}))
sys.exit(0 if summary["ok"] else 1)
EOF
