#!/usr/bin/env bash
# Sourced by the other scripts: create .venv and install requirements-dev.txt (which includes
# requirements.txt); skipped while no requirements file has changed since the last install.
set -euo pipefail
VENV=${TTI_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"
stamp="$VENV/.tti-installed"
want=$(sha256sum requirements*.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing requirements into $VENV (first time: a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
  echo "$want" > "$stamp"
fi
