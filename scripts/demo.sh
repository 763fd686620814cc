#!/usr/bin/env bash
# The main job: the shipped demo-world workflows run headless through ComfyUI's executor on the pack's own
# small models (miniworld/weights), held-out subjects, base model vs nested attention at λ 1-3, as a contact sheet.
# About 15 s on a 2-core CPU after set-up. The tiny-model plumbing run is `python -m workflows.run --tiny FILE`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m miniworld.demo "$@"
