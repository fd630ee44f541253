"""Mesh parsing, placement rules, multi-process flags and the recompile guard, in this (one-device)
process. Runs on 8 fake devices and on 2 processes are in test_sharding_devices.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P
from test_cli import assert_one_line_error, run_train

from jaxpeft import config
from jaxpeft.data import batches as batching, encoding
from jaxpeft.training import multihost, optim, sharding, single, steps
from jaxpeft.errors import UserError


def test_parse_mesh():
    assert sharding.parse_mesh("data:4,fsdp:2", 8) == {"data": 4, "fsdp": 2}
    assert sharding.parse_mesh(" fsdp : 8 ", 8) == {"data": 1, "fsdp": 8}
    assert sharding.parse_mesh("", 3) == {"data": 3, "fsdp": 1}
    assert sharding.parse_mesh("fsdp:2,data:-1", 16) == {"data": 8, "fsdp": 2}


@pytest.mark.parametrize("spec,needle", [
    ("data=4", "expected AXIS:SIZE pairs"),
    ("data:4,fsdp", "expected AXIS:SIZE pairs"),
    ("data:4,model:2", "unknown axis 'model'; the axes are data, fsdp"),
    ("data:2,data:4", "axis 'data' given twice"),
    ("data:0,fsdp:8", "axis sizes must be positive"),
    ("data:-1,fsdp:-1", "only one axis may have size -1"),
    ("data:-1,fsdp:3", "8 devices cannot be split into 3-device groups"),
    ("data:4,fsdp:4", "needs 16 devices; this run has 8"),
])
def test_malformed_mesh_is_a_user_error(spec, needle):
    with pytest.raises(UserError, match=needle):
        sharding.parse_mesh(spec, 8)


def test_mesh_that_does_not_fit_the_devices_is_one_line(glue, tmp_path):
    rc, _, err = run_train(f"--data_dir={glue}", "--mesh=data:2,fsdp:2", f"--output_dir={tmp_path}/o")
    assert_one_line_error(rc, err, "--mesh='data:2,fsdp:2' needs 4 devices; this run has 1")
    assert not (tmp_path / "o").exists()


def test_batch_must_divide_over_the_data_parallel_devices():
    plan = sharding.MeshPlan(AbstractMesh((4, 2), sharding.AXES))
    plan.check_batch_size(16)
    with pytest.raises(UserError, match=r"--eval_batch_size=12 is not divisible by the 8 data-parallel "
                                        r"devices of mesh data:4,fsdp:2; use a multiple of 8"):
        plan.check_batch_size(12, "eval_batch_size")


def test_placement_rules():
    rules = ((r"pinned$", P(None, "fsdp")),) + sharding.DEFAULT_RULES

    def spec(path, shape, fsdp=4, min_size=100):
        return sharding.partition_spec(path, shape, rules, fsdp, min_size)

    assert spec("bert/embeddings/word_embeddings/embedding", (30522, 384)) == P(None, "fsdp")
    assert spec("bert/encoder/layer_0/intermediate/dense/kernel", (384, 1536), fsdp=2) == P(None, "fsdp")
    assert spec("bert/encoder/layer_0/output/dense/kernel", (1536, 384), fsdp=2) == P("fsdp")
    assert spec("opt_state/1/0/mu/bert/encoder/layer_0/output/dense/kernel", (1536, 384)) == P("fsdp")
    assert spec("bert/encoder/layer_0/output/dense/bias", (384,)) == P("fsdp")
    assert spec("bert/encoder/layer_0/output/dense/bias", (384,), min_size=1000) == P()   # too small
    assert spec("bert/encoder/layer_0/output/LayerNorm/scale", (4096,)) == P()            # by rule
    assert spec("classifier/kernel", (384, 3), fsdp=5, min_size=0) == P()                # nothing divides
    assert spec("bert/encoder/layer_0/output/dense/kernel", (1536, 384), fsdp=1) == P()
    assert spec("prompt/pinned", (2, 2)) == P(None, "fsdp")
    assert spec("opt_state/0/count", ()) == P()


def test_state_shardings_follow_the_params_and_replicate_the_rest():
    plan = sharding.create_plan(fsdp_min_size=0)
    params = {"bert": {"w": jnp.ones((4, 8)), "LayerNorm": {"scale": jnp.ones(8)}}}
    tx = optim.make_optimizer(config.Optim())
    state, shardings = plan.init(lambda t: steps.init_state(t, tx, 0), params,
                                 shardings=plan.state_shardings)
    assert all(x.sharding == s for x, s in zip(jax.tree_util.tree_leaves(state),
                                               jax.tree_util.tree_leaves(shardings)))
    placed = plan.put({"a": np.arange(6.0).reshape(2, 3)})
    assert isinstance(placed["a"], jax.Array) and placed["a"].sharding.mesh == plan.mesh
    np.testing.assert_array_equal(np.asarray(placed["a"]), np.arange(6.0).reshape(2, 3))
    assert plan.process_rows(16) is None   # one process: every row


def test_recompile_guard_counts_traces_and_raises_past_the_limit():
    plan = sharding.create_plan()
    f = jax.jit(plan.traced(lambda x: x * 2, "double", limit=2))
    for n in (2, 3, 2, 3, 3):
        f(jnp.ones(n))
    assert plan.traces["double"] == 2
    with pytest.raises(RuntimeError, match="double compiled 3 times, more than its 2 input shapes"):
        f(jnp.ones(4))


def test_make_batch_rows_keep_the_width_of_the_whole_batch():
    enc = encoding.Encoded(input_ids=np.arange(40, dtype=np.int32).reshape(4, 10) + 1,
                       token_type_ids=np.zeros((4, 10), np.int32), lengths=np.array([3, 9, 2, 4], np.int32),
                       labels=np.array([0, 1, 0, 1], np.int32))
    idx = np.array([0, 1, 2, -1])
    whole = batching.make_batch(enc, idx, (4, 8, 10))
    part = batching.make_batch(enc, idx, (4, 8, 10), rows=np.array([2, 3]))
    assert whole["input_ids"].shape == (4, 10) and part["input_ids"].shape == (2, 10)
    for k in whole:
        np.testing.assert_array_equal(part[k], whole[k][2:])


SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_detect_cluster():
    assert multihost.detect_cluster({}, tpu_vm=False) is None
    assert multihost.detect_cluster(SLURM, tpu_vm=False) == "slurm"
    assert multihost.detect_cluster(dict(SLURM, SLURM_NTASKS="1"), tpu_vm=False) is None
    assert multihost.detect_cluster({"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1",
                                     "OMPI_COMM_WORLD_SIZE": "4"}, tpu_vm=False) == "openmpi"
    assert multihost.detect_cluster({}, tpu_vm=True) == "tpu"
    assert multihost.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}, tpu_vm=False) == "tpu"
    # a plain run here is not distributed (and initialize() leaves JAX alone)
    assert multihost.initialize("auto", env={}) is False


@pytest.mark.parametrize("args,needle", [
    (dict(distributed="sometimes"), "--distributed=sometimes: choose one of auto, on, off"),
    (dict(num_processes=2), "go together; missing --coordinator_address, --process_id"),
    (dict(coordinator_address="10.0.0.2", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "--process_id=2 must be in 0..1"),
    (dict(coordinator_address="h:1", num_processes=0, process_id=0), "--num_processes=0: must be > 0"),
    (dict(distributed="off", coordinator_address="h:1"), "--distributed=off contradicts --coordinator_address"),
    (dict(mesh="data:1,tensor:1"), "unknown axis 'tensor'"),
    (dict(fsdp_min_size=-1), "--fsdp_min_size=-1: must be >= 0"),
])
def test_bad_device_flags_fail_before_the_model_loads(args, needle, glue):
    with pytest.raises(UserError, match=needle):
        cfg = config.build(dict(data_dir=str(glue), output_dir="/nonexistent/never-written", **args))
        single.SingleTask(cfg)
