#!/usr/bin/env bash
# Runs the shipped single-subject workflow headless through ComfyUI's executor.
# With no SDXL weights on this machine it runs on the tiny random built-in models
# (--tiny): the image is noise-like; it shows the whole graph works end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m workflows.run --tiny workflows/nested_attention_single_subject.json "$@"
