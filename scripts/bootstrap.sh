#!/usr/bin/env bash
# Create .venv at the repository root and install pmi-pipeline into it, with the test tools. Idempotent: a second
# run installs nothing unless pyproject.toml changed.
#
# torch is installed first, pinned to 2.13.0: on these machines that resolves to a local CPU wheel; any other torch
# requirement would download several GB of CUDA packages. Where torch is already importable (a GPU machine with
# its own build), it is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.11 python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "bootstrap: needs Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
    echo "bootstrap: installing torch 2.13.0 (CPU) into .venv" >&2
    .venv/bin/pip install --quiet "torch==2.13.0"
  fi
  echo "bootstrap: installing pmi-pipeline and its test tools into .venv (a few minutes the first time)" >&2
  .venv/bin/pip install --quiet -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
