#!/usr/bin/env bash
# Create .venv (if missing) with the CPU environment and install mdpo into it, editable, building
# the C++ CPU extension against the torch that was just installed (no isolated build env).
# Usage: bash scripts/setup.sh        (re-running is cheap: pip skips what is already there)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/pip install -q -r requirements-cpu.txt
# DeepSpeed (distributed.engine: zero2 / zero3) builds from source against the installed torch: no build
# isolation, and torch pinned in the same command, or pip fetches a CUDA torch of several GB.
.venv/bin/pip install -q --no-build-isolation "$(grep -E '^torch==' requirements-cpu.txt)" "deepspeed==0.19.8"
.venv/bin/pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, mdpo, mdpo_kernels; print(f'mdpo ready: torch {torch.__version__}')"
