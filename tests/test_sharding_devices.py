"""Sharded training against the one-device run, on CPU: 8 fake devices in one process (meshes
data:8 and data:4,fsdp:2), and 2 processes of 4 devices each joined by ``jax.distributed``
(coordinator on 127.0.0.1, gloo CPU collectives). The device count is fixed when JAX starts, so
these runs happen in subprocesses (tests/mesh_worker.py); this test process keeps its one device.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mesh_worker

WORKER = Path(__file__).with_name("mesh_worker.py")

#: Methods whose sharded runs must match the one-device run: ``name: extra config``. A new method
#: is one more entry here.
METHODS = {"bitfit": {}, "prompt": {"num_virtual_tokens": 4}}


def base_config(method: str, glue: Path, model: Path, out: Path) -> dict:
    # 88 examples in batches of 16: 6 steps an epoch, the last one half filler rows; 8 steps cross
    # into epoch 1. Lengths up to 32 use both buckets (16, 32), kept with length_buckets=all. Dropout is on.
    return dict(method=method, task="sst2", model=str(model), data_dir=str(glue), output_dir=str(out),
                max_train_examples=88, max_eval_examples=40, batch_size=16, eval_batch_size=16,
                max_seq_length=32, max_steps=8, learning_rate=1e-2, log_every=1, progress=False,
                seed=1, packing=False, length_buckets="all", **METHODS[method])


_REFERENCE: dict[str, dict] = {}


@pytest.fixture
def reference(glue, tiny_bert_dir, tmp_path_factory):
    """The one-device run of a method, in this process (computed once)."""

    def get(method: str) -> dict:
        if method not in _REFERENCE:
            out = tmp_path_factory.mktemp(f"reference-{method}")
            _REFERENCE[method] = mesh_worker.run_one(base_config(method, glue, tiny_bert_dir, out))
        return _REFERENCE[method]

    return get


def start_worker(devices: int, out: Path, configs: list[dict], tag: str) -> subprocess.Popen:
    files = []
    for i, c in enumerate(configs):
        f = out.parent / f"{tag}-config{i}.json"
        f.write_text(json.dumps(c))
        files.append(str(f))
    # a cache of its own: the recompile guard counts traces, and a warm program store (an earlier
    # run's) would provide the train loop without one
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", JAXPEFT_COMPILATION_CACHE=str(out.parent / f"{tag}-xla"),
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + f" --xla_force_host_platform_device_count={devices}"))
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *files], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, out: Path, process: int = 0, timeout: int = 420) -> list[dict]:
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, log[-4000:]
    return json.loads(out.with_suffix(f".p{process}.json").read_text())


def assert_same_training(got: dict, ref: dict, losses: bool = True) -> None:
    if losses:
        assert len(got["losses"]) == len(ref["losses"]) == 8
        np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
    assert sorted(got["trainable"]) == sorted(ref["trainable"])
    for path, value in ref["trainable"].items():
        np.testing.assert_allclose(got["trainable"][path], value, rtol=1e-4, atol=2e-5, err_msg=path)
    assert got["final_dev"] == pytest.approx(ref["final_dev"], abs=1e-9)
    # recompile guard: one train-loop compilation per bucket length used, no more
    assert got["traces"]["train_loop"] == len(got["widths"]) == len(ref["widths"]) == 2
    assert all(got["assembled_equal"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_meshes_on_8_devices_match_one_device(method, reference, glue, tiny_bert_dir, tmp_path):
    configs = [dict(base_config(method, glue, tiny_bert_dir, tmp_path / "data8"), mesh="data:8"),
               dict(base_config(method, glue, tiny_bert_dir, tmp_path / "fsdp2"), mesh="data:4,fsdp:2",
                    fsdp_min_size=0)]
    proc = start_worker(8, tmp_path / "out.json", configs, "mesh")
    ref = reference(method)   # while the worker runs
    data8, fsdp2 = finish(proc, tmp_path / "out.json")
    assert ref["devices"] == 1 and ref["mesh"] == "data:1,fsdp:1"
    assert (data8["devices"], data8["mesh"]) == (8, "data:8,fsdp:1")
    assert (fsdp2["devices"], fsdp2["mesh"]) == (8, "data:4,fsdp:2")
    for run in (data8, fsdp2):
        assert_same_training(run, ref)
    # data:8 replicates every weight; fsdp:2 (threshold 0) splits frozen matrices, trainable
    # leaves and their Adam moments, each moment like its param
    assert all(s == "()" for s in {**data8["frozen_specs"], **data8["trainable_specs"]}.values())
    assert fsdp2["frozen_specs"]["bert/embeddings/word_embeddings/embedding"] == "('fsdp',)"
    assert fsdp2["frozen_specs"]["bert/encoder/layer_0/intermediate/dense/kernel"] == "(None, 'fsdp')"
    if method == "bitfit":
        assert fsdp2["trainable_specs"]["bert/encoder/layer_0/intermediate/dense/bias"] == "('fsdp',)"
        assert fsdp2["trainable_specs"]["bert/encoder/layer_0/output/LayerNorm/bias"] == "()"
    else:   # the (4, 48) virtual-token table shards like any leaf over the threshold
        (prompt,) = [s for p, s in fsdp2["trainable_specs"].items() if p.endswith("prompt_embeddings")]
        assert "fsdp" in prompt
    moments = {p: s for p, s in fsdp2["opt_specs"].items() if "/mu/" in p or "/nu/" in p}
    assert len(moments) == 2 * len(fsdp2["trainable_specs"])
    for p, s in moments.items():
        assert s == fsdp2["trainable_specs"][p.split("/mu/")[-1].split("/nu/")[-1]], p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process(reference, glue, tiny_bert_dir, tmp_path):
    port = _free_port()
    out_dir = tmp_path / "shared-output"   # both processes are told to write here
    procs = []
    for pid in range(2):
        cfg = dict(base_config("bitfit", glue, tiny_bert_dir, out_dir), mesh="fsdp:8", fsdp_min_size=0,
                   coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
        procs.append(start_worker(4, tmp_path / f"p{pid}.json", [cfg], f"p{pid}"))
    ref = reference("bitfit")
    [p0], [p1] = (finish(proc, tmp_path / f"p{pid}.json", process=pid) for pid, proc in enumerate(procs))
    for p in (p0, p1):
        assert (p["processes"], p["devices"], p["local_devices"], p["mesh"]) == (2, 8, 4, "data:1,fsdp:8")
        assert_same_training(p, ref, losses=p is p0)
    # only process 0 wrote: one start and one end record, 8 train records
    assert p0["log_events"].count("start") == 1 and p0["log_events"].count("end") == 1
    assert p0["log_events"].count("train") == 8
    assert sorted(x.name for x in out_dir.iterdir()) == ["adapter", "checkpoints", "learning_curves.png",
                                                         "log.jsonl", "results.json"]
    # each process fed half of every global batch: no example twice, none skipped
    for a, b in zip(p0["fed"], p1["fed"]):
        assert a["batch"] == b["batch"]
        assert len(a["rows"]) == len(b["rows"]) == 8
        assert sorted(a["rows"] + b["rows"]) == sorted(a["batch"])
    assert p0["fed"][-1]["batch"].count(-1) == 8   # the filler rows are covered too
    # the checkpoint the two processes wrote (fsdp:8 over both) restores in this one-device process:
    # the run resumes at its last step and holds exactly the trained leaves
    one = mesh_worker.run_one(base_config("bitfit", glue, tiny_bert_dir, out_dir))
    assert (one["processes"], one["devices"], one["mesh"]) == (1, 1, "data:1,fsdp:1")
    assert sorted(one["trainable"]) == sorted(p0["trainable"])
    for path, value in p0["trainable"].items():
        np.testing.assert_array_equal(np.asarray(one["trainable"][path], np.float32),
                                      np.asarray(value, np.float32), err_msg=path)
    assert one["final_dev"] == p0["final_dev"]
