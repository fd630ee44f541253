"""A multi-task run on a mesh of 8 fake CPU devices: it trains through the one loop (the scanned
dispatch, stored programs, the learning curves), and a process killed right after a checkpoint and
started again ends bit-identical to one uninterrupted run.

The device count is fixed when JAX starts, so the runs happen in subprocesses (as in
tests/test_sharding_devices.py); this test process keeps its one device."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxpeft import masks
from jaxpeft.training import checkpoint

REPO = Path(__file__).resolve().parent.parent
TASKS = ("sst2", "cola", "stsb")
TOTAL, KILL_AT = 12, 8

#: Runs the multi-task runs given as JSON configs, one after the other in this process; with
#: ``kill@STEP`` before a config, that run kills its own process (SIGKILL) as soon as the checkpoint
#: of STEP is complete on disk.
WORKER = r"""
import json, os, signal, sys

import jax

from jaxpeft import config
from jaxpeft.training import checkpoint, loop, multitask

assert jax.device_count() == 8, jax.devices()
kill_at = None
for arg in sys.argv[1:]:
    if arg.startswith("kill@"):
        kill_at = int(arg[len("kill@"):])
        continue
    job = multitask.MultiTask(config.build(json.loads(arg)), echo=print)
    if kill_at is not None:
        save = checkpoint.Checkpoints.save

        def save_then_die(self, step, state, metrics=None, _at=kill_at):
            save(self, step, state, metrics)
            if step == _at:
                self.run.wait()          # the checkpoint is complete on disk
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.Checkpoints.save = save_then_die
    loop.run(job)
"""


def flags(glue, model, out) -> dict:
    # 24 examples of each task in mixed batches of 16 (two rows per device): 5 steps a mixture epoch,
    # so the 12 steps cross two epoch ends. Length 16: one bucket, one train program. Each task keeps
    # its own config's learning rate (SST-2 3e-3, CoLA and STS-B 1e-3).
    return dict(method="bitfit", tasks=",".join(TASKS), model=str(model), data_dir=str(glue), output_dir=str(out),
                max_train_examples=24, max_eval_examples=16, batch_size=16, eval_batch_size=16,
                max_seq_length=16, max_steps=TOTAL, eval_every=6, save_every=4, keep=3, log_every=1,
                progress=False, seed=3)


def worker(tmp: Path, *args: str, log: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", JAXPEFT_COMPILATION_CACHE=str(tmp / "xla"),
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-c", WORKER, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                              cwd=REPO, timeout=900)


def saved_state(out: Path, step: int) -> dict:
    """The train state saved at ``step`` (on 8 devices), read onto this process's one device."""
    mgr = ocp.CheckpointManager(out / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True),
                                item_handlers={"state": ocp.StandardCheckpointHandler()})
    meta = mgr.item_metadata(step)["state"]
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                                    getattr(meta, "tree", meta))
    tree = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    mgr.close()
    return {k: np.asarray(v) for k, v in masks.flatten(tree).items()}


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


def test_multitask_on_8_devices_trains_and_resumes_exactly(glue, tiny_bert_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    t0 = time.perf_counter()
    # one process: the uninterrupted run, then the same run in another folder, killed after step 8
    p = worker(tmp_path, json.dumps(flags(glue, tiny_bert_dir, straight)), f"kill@{KILL_AT}",
               json.dumps(flags(glue, tiny_bert_dir, killed)), log=tmp_path / "first.log")
    first = (tmp_path / "first.log").read_text()
    assert p.returncode == -signal.SIGKILL, first[-4000:]
    assert not (killed / "results.json").exists()
    assert checkpoint.complete_steps(killed / "checkpoints")[-1] == KILL_AT, first[-4000:]
    # a new process runs the killed run's command again: it resumes from the checkpoint of step 8
    t1 = time.perf_counter()
    p = worker(tmp_path, json.dumps(flags(glue, tiny_bert_dir, killed)), log=tmp_path / "second.log")
    second = (tmp_path / "second.log").read_text()
    assert p.returncode == 0, second[-4000:]
    assert f"resuming from step {KILL_AT} " in second
    print(f"straight + killed: {t1 - t0:.0f}s, resumed: {time.perf_counter() - t1:.0f}s")

    a = json.loads((straight / "results.json").read_text())
    b = json.loads((killed / "results.json").read_text())
    for r in (a, b):
        assert r["devices"].startswith("8x") and r["mesh"].startswith("data:8"), r["mesh"]
        assert r["tasks"] == list(TASKS) and r["steps"] == TOTAL
        assert r["steps_per_dispatch"] > 1                      # many steps per device call
    # the resumed run in a new process loaded the programs the first process stored (no tracing)
    assert a["programs_loaded"] is False and a["programs_reused"] is False
    assert b["programs_loaded"] is True and set(b["compile_split"]) == {"load_seconds"}
    for r, out in ((a, straight), (b, killed)):
        assert Path(r["learning_curves"]) == out / "learning_curves.png" and (out / "learning_curves.png").stat().st_size

    # bit-identical: every adapter, the final train state (params and Adam moments), the metrics
    for name in TASKS:
        wa = (straight / "adapters" / name / "adapter_model.safetensors").read_bytes()
        wb = (killed / "adapters" / name / "adapter_model.safetensors").read_bytes()
        assert wa == wb, name
    sa, sb = saved_state(straight, TOTAL), saved_state(killed, TOTAL)
    assert sa.keys() == sb.keys() and any("/mu/" in k for k in sa)
    assert [k for k in sa if sa[k].tobytes() != sb[k].tobytes()] == []
    for k in ("best_dev", "best_step", "final_dev", "final_dev_by_task", "rows_trained", "epochs"):
        assert a[k] == b[k], k
    # the steps after the resume point saw the same batches and dropout: the same losses
    la = {r["step"]: (r["loss"], r["task_loss"]) for r in records(straight) if r["event"] == "train"}
    lb = {r["step"]: (r["loss"], r["task_loss"]) for r in records(killed) if r["event"] == "train"}
    assert sorted(la) == list(range(1, TOTAL + 1)) and all(la[s] == lb[s] for s in range(KILL_AT + 1, TOTAL + 1))
    assert [e["step"] for e in records(killed) if e["event"] == "resume"] == [KILL_AT]
