"""benchmarks/multi_adapter.py on CPU with tiny settings (it must not rot); no speed is asserted."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_multi_adapter_benchmark_runs_tiny_on_cpu(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "multi_adapter.py"), "--size=tiny", "--batch=8",
                        "--seq=16", "--ks=1,2", "--steps=1", "--repeats=1", f"--out={out}"],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "multi_adapter.jsonl").read_text().splitlines()]
    assert not any("error" in r for r in recs)
    got = sorted((r["family"], r["mode"], r["k"]) for r in recs)
    want = sorted([(f, "single", 1) for f in ("bitfit", "prefix", "prompt", "lora")]
                  + [(f, m, k) for f in ("bitfit", "prefix", "prompt", "lora") for m in ("mixed", "separate") for k in (1, 2)])
    assert got == want
    assert all(r["seq_per_s"] > 0 and r["batch"] == 8 and r["seq"] == 16 for r in recs)
    assert all(1 <= r["calls"] <= r["k"]
               for r in recs if r["mode"] == "separate")
    md = (out / "multi_adapter.md").read_text()
    assert "| bitfit | 2 |" in md and "| prompt | 1 |" in md and "fails" not in md
