"""A training process killed with SIGKILL and started again ends bitwise where an uninterrupted run
ends: same parameters, optimizer state, losses after the resume point, best/final dev metrics.

The run sends 4 steps per device call and checkpoints every 10 steps, so the kill lands in the middle
of the calls between two checkpoints: the steps done since the last checkpoint are lost and done
again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy

from jaxpeft import masks
from jaxpeft.training import checkpoint

REPO = Path(__file__).resolve().parent.parent
TOTAL = 120


def command(model, glue, out):
    # 40 steps per epoch: the run crosses epoch boundaries; one length bucket keeps compiles few.
    return [sys.executable, str(REPO / "scripts" / "train.py"), f"--model={model}", "--task=sst2",
            f"--data_dir={glue}", f"--output_dir={out}", f"--max_steps={TOTAL}", "--max_train_examples=320",
            "--batch_size=8", "--max_seq_length=16", "--max_eval_examples=64", "--eval_every=25",
            "--save_every=10", "--steps_per_dispatch=4", "--keep=2", "--log_every=1", "--learning_rate=3e-3",
            "--seed=7", "--no-progress", "--packing"]


def start(cmd, log: Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)


def saved_state(out: Path, step: int) -> dict:
    mgr = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True))
    tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    mgr.close()
    return {k: np.asarray(v) for k, v in masks.flatten(tree).items()}


def losses(out: Path, after: int) -> dict:
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["event"] == "train" and r["step"] > after}


def test_sigkill_mid_training_then_resume_is_bitwise_identical(glue, tiny_bert_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    baseline = start(command(tiny_bert_dir, glue, straight), tmp_path / "straight.log")
    victim = start(command(tiny_bert_dir, glue, killed), tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and victim.poll() is None:
            steps = checkpoint.complete_steps(killed / "checkpoints")
            if steps and steps[-1] >= 30:
                break
            time.sleep(0.005)
        os.kill(victim.pid, signal.SIGKILL)
        assert victim.wait(60) == -signal.SIGKILL
    finally:
        if victim.poll() is None:
            victim.kill()
    log = (tmp_path / "killed.log").read_text()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed:\n" + log
    at_kill = checkpoint.complete_steps(killed / "checkpoints")
    assert at_kill and 30 <= at_kill[-1] < TOTAL, at_kill
    logged = max(losses(killed, 0), default=0)   # steps whose losses the killed run had read back

    resumed = subprocess.run(command(tiny_bert_dir, glue, killed), capture_output=True, text=True,
                             env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"), timeout=600,
                             cwd=REPO)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "did not provide metrics" not in resumed.stderr   # periodic saves are quiet
    from_step = int(resumed.stdout.split("resuming from step ", 1)[1].split()[0])
    assert from_step == at_kill[-1]
    print(f"killed with steps up to {logged} logged, resumed from the checkpoint of step {from_step}")
    assert baseline.wait(600) == 0, (tmp_path / "straight.log").read_text()

    # Parameters (the exported adapter holds every trainable leaf) and optimizer state: bitwise.
    a = safetensors.numpy.load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    b = safetensors.numpy.load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 10
    assert all(a[k].tobytes() == b[k].tobytes() for k in a), [k for k in a if a[k].tobytes() != b[k].tobytes()]
    sa, sb = saved_state(straight, TOTAL), saved_state(killed, TOTAL)
    assert sa.keys() == sb.keys() and any("/mu/" in k for k in sa)
    assert all(sa[k].tobytes() == sb[k].tobytes() for k in sa)
    # The steps after the resume point saw the same batches and dropout: the same losses.
    la, lb = losses(straight, from_step), losses(killed, from_step)
    assert la and la == lb
    # The best dev result before the resume point carried over (the first maximum, as the loop keeps it).
    evals = [r for r in map(json.loads, (straight / "log.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    before = [e for e in evals if e["step"] <= from_step]
    best_before = max(before, key=lambda e: (e["accuracy"], -e["step"]))["step"] if before else 0
    records = [json.loads(x) for x in (killed / "log.jsonl").read_text().splitlines()]
    resume_events = [r for r in records if r["event"] == "resume"]
    assert [e["best_step"] for e in resume_events] == [best_before]
    ra = json.loads((straight / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    for k in ("best_dev", "best_step", "final_dev", "steps", "epochs"):
        assert ra[k] == rb[k], (k, ra[k], rb[k])
    assert ra["checkpoint_steps"] == rb["checkpoint_steps"] and ra["best_step"] in ra["checkpoint_steps"]
