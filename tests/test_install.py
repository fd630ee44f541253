"""A normal (non-editable) install: the package alone, run from outside the source tree, finds a
config for every registered method and trains with its console entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHECK = """
import json, sys
import jaxpeft
from jaxpeft import config, methods
paths = {m: str(config.method_config_file(m)) for m in methods.REGISTRY}
lrs = {m: config.build({"method": m, "task": "sst2"}).optim.learning_rate for m in methods.REGISTRY}
print(json.dumps({"file": jaxpeft.__file__, "paths": paths, "lrs": lrs}))
"""


def test_non_editable_install_ships_every_config_and_trains(tmp_path, glue):
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    env = dict(os.environ, PYTHONPATH=str(target), JAX_PLATFORMS="cpu")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, cwd=elsewhere,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(target)), info["file"]          # not the source tree
    from jaxpeft import methods

    assert set(info["paths"]) == set(methods.REGISTRY)
    assert all(path.startswith(str(target)) for path in info["paths"].values())
    assert info["lrs"]["full"] <= 1e-4 and info["lrs"]["bitfit"] > info["lrs"]["full"]
    # the console script of the installed package, run from elsewhere: a few steps of full fine-tuning
    out = tmp_path / "run"
    p = subprocess.run([str(target / "bin" / "jaxpeft-train"), "--method=full", "--task=sst2", "--max_steps=4",
                        f"--data_dir={glue}", "--max_train_examples=128", "--max_eval_examples=64",
                        f"--output_dir={out}", "--no-progress", "--keep=0"],
                       capture_output=True, text=True, env=env, cwd=elsewhere, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["config"]["config"].startswith(str(target))
    assert res["config"]["learning_rate"] == info["lrs"]["full"] and res["config"]["weight_decay"] == 0.01
    # the plot comes with a plain install (matplotlib is a core dependency, not an extra)
    assert (out / "learning_curves.png").stat().st_size > 0
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("matplotlib") for d in deps)
