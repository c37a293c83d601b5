#!/usr/bin/env bash
# Creates .venv (once) and installs hsgd_tune into it. Sourced by quickstart.sh and test.sh.
# torch is installed first and pinned to the CPU build on disk: a plain "torch" requirement would
# otherwise pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev${HSGD_EXTRAS:+,$HSGD_EXTRAS}]"
