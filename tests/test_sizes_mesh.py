"""A random size's frozen base over the mesh's ``fsdp`` axis, on 8 fake CPU devices (in a subprocess,
tests/sizes_worker.py): int8 codes split, each device holds about an eighth of the frozen base, the
trainable part stays whole on every device, and BitFit / LoRA train as on one device."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sizes_worker

WORKER = Path(__file__).with_name("sizes_worker.py")
METHODS = ("bitfit", "lora")


def config(method: str, glue: Path, out: Path) -> dict:
    # fsdp_min_size 2048: tiny's kernels (4,096 and 8,192 values), embeddings and their int8 codes
    # split; biases, norms, LoRA's A and B, the head and every quantization scale stay whole
    return dict(method=method, task="sst2", model="random:tiny", data_dir=str(glue), output_dir=str(out),
                max_train_examples=64, max_eval_examples=16, batch_size=16, eval_batch_size=16,
                max_seq_length=32, max_steps=4, learning_rate=1e-2, log_every=1, progress=False, seed=1,
                packing=False, compute="exact", base_dtype="int8", fsdp_min_size=2048, compilation_cache="off")


def test_frozen_base_splits_over_fsdp_and_trains_as_on_one_device(glue, tmp_path):
    files = []
    for m in METHODS:
        f = tmp_path / f"{m}.json"
        f.write_text(json.dumps(dict(config(m, glue, tmp_path / f"fsdp-{m}"), mesh="fsdp:8")))
        files.append(str(f))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "out.json"), *files], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ref = {m: sizes_worker.run_one(config(m, glue, tmp_path / f"one-{m}")) for m in METHODS}   # meanwhile
    log, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, log[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    for m, run in zip(METHODS, got["runs"]):
        one = ref[m]
        assert (one["devices"], run["devices"], run["mesh"]) == (1, 8, "data:1,fsdp:8")
        np.testing.assert_allclose(run["losses"], one["losses"], rtol=1e-5, atol=1e-6)
        assert len(run["losses"]) == 4
        for path, value in one["trainable"].items():
            np.testing.assert_allclose(run["trainable"][path], value, rtol=1e-4, atol=2e-5, err_msg=path)
        # the frozen base: int8 kernels, their codes split over the 8 devices, about 1/8 per device
        assert run["quantized_kernels"] == one["quantized_kernels"] == 13   # 6 a layer, and the pooler
        assert run["frozen_bytes"] == one["frozen_bytes"] == one["frozen_bytes_device0"]
        assert run["frozen_bytes_device0"] < 0.14 * run["frozen_bytes"]
        specs = run["frozen_specs"]
        assert specs["bert/encoder/layer_0/intermediate/dense/kernel/codes"] == "(None, 'fsdp')"
        assert specs["bert/embeddings/word_embeddings/embedding"] == "(None, 'fsdp')"
        # the trainable part (and so its Adam moments) is whole on every device
        assert run["trainable_specs"] and set(run["trainable_specs"].values()) == {"()"}
    # with threshold 0 every quantization scale splits too (codes and scales alike)
    split = got["split_specs"]
    scales = {p: s for p, s in split.items() if p.endswith("/kernel/scale")}
    assert len(scales) == 13 and all("fsdp" in s for s in scales.values())
    assert all("fsdp" in s for p, s in split.items() if p.endswith("/kernel/codes"))


@pytest.mark.parametrize("size", ["base", "10.7b"])
def test_fsdp_footprint_of_a_size_is_about_an_eighth(size):
    """The same from the shapes alone (nothing allocated): a size's int8 base on fsdp:8 of real sizes,
    with the default threshold, holds about an eighth of its bytes per device."""
    from jax.sharding import AbstractMesh, AxisType, NamedSharding

    from jaxpeft import methods
    from jaxpeft.compute import EXACT
    from jaxpeft.models import sizes
    from jaxpeft.training import sharding

    mesh = AbstractMesh((1, 8), sharding.AXES, axis_types=(AxisType.Auto,) * 2)
    rules, fsdp_min = sharding.DEFAULT_RULES, sharding.DEFAULT_FSDP_MIN_SIZE

    def place(tree):
        import jax

        from jaxpeft import masks

        return jax.tree_util.tree_map_with_path(
            lambda kp, x: NamedSharding(mesh, sharding.partition_spec(masks.path_str(kp), x.shape, rules, 8, fsdp_min)),
            tree)

    compute = EXACT.replace(dtype="bfloat16", base_dtype="int8")
    whole = sizes.estimate(size, methods.create("lora"), compute)
    split = sizes.estimate(size, methods.create("lora"), compute, param_shardings=place)
    assert 0.125 * whole.frozen <= split.frozen < 0.135 * whole.frozen
    assert split.trainable == whole.trainable     # LoRA's small matrices stay whole
