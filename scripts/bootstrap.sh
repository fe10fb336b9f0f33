#!/usr/bin/env bash
# Create .venv and install subclone with the service and test extras.
# torch is pinned to 2.13.0 so pip takes the CPU wheel; a bare "torch" would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[service,test]"
