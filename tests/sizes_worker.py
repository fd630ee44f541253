"""Short runs of ``random:`` sizes for the multi-device tests, in a process of its own (the number of
fake CPU devices is fixed when JAX starts; the caller sets ``XLA_FLAGS``).

    python tests/sizes_worker.py OUT.json CONFIG.json [CONFIG.json ...]

For every run: the train losses, the final trainable params, the PartitionSpec of every leaf, and the
bytes of the frozen params in all and on the first device; then, for the first config's model, the
specs of its stored frozen tree placed with threshold 0 (every quantized code and scale split).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_one(cfg_values: dict) -> dict:
    import jax

    from jaxpeft import config, masks
    from jaxpeft.models import quant
    from jaxpeft.training import loop, single

    cfg = config.build(cfg_values)
    job = single.SingleTask(cfg, echo=lambda s: None)
    loop.run(job)
    state, frozen = job.final_state, job.frozen
    trainable = jax.jit(lambda t: t, out_shardings=job.plan.replicated)(state.trainable)
    records = [json.loads(x) for x in (Path(cfg.run.output_dir) / "log.jsonl").read_text().splitlines()]

    def specs(tree):
        return {masks.path_str(kp): str(tuple(getattr(x.sharding, "spec", ())))
                for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]}

    quantized = [x for x in jax.tree_util.tree_leaves(frozen, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))
                 if isinstance(x, quant.QuantizedKernel)]
    return {
        "devices": jax.device_count(), "mesh": job.plan.describe(),
        "losses": [r["loss"] for r in records if r["event"] == "train"],
        "trainable": {p: jax.numpy.asarray(v, "float32").tolist() for p, v in masks.flatten(trainable).items()},
        "trainable_specs": specs(state.trainable), "frozen_specs": specs(frozen),
        "frozen_bytes": quant.nbytes(frozen), "frozen_bytes_device0": quant.nbytes(frozen, jax.devices()[0]),
        "quantized_kernels": len(quantized),
    }


def all_split_specs(cfg_values: dict) -> dict:
    """The stored frozen tree of the config's model placed with ``fsdp_min_size=0``: every code and
    scale array's spec (nothing is allocated)."""
    from jaxpeft import config, masks, methods
    from jaxpeft.models import quant, sizes
    from jaxpeft.models.bert import FAMILY
    from jaxpeft.models.heads import Head, head_modules
    from jaxpeft.models.loading import build_module, param_shapes
    from jaxpeft.training import sharding

    cfg = config.build(cfg_values)
    method = methods.create(cfg.method, cfg.method_options)
    compute = cfg.resolve_compute()
    module = build_module(FAMILY, sizes.config(cfg.model), Head("sequence", 2), method, compute)
    shapes = param_shapes(module)
    mask = method.mask(shapes, FAMILY, head_modules(FAMILY, Head("sequence", 2)))
    _, frozen = quant.split(sizes.stored_tree(shapes, sizes.storage_plan(shapes, mask, compute)), mask)
    plan = sharding.create_plan(cfg.devices.mesh, 0)
    return {p: str(tuple(s.spec)) for p, s in masks.flatten(plan.tree_shardings(frozen)).items()}


def main(argv: list[str]) -> int:
    out, configs = Path(argv[0]), [json.loads(Path(c).read_text()) for c in argv[1:]]
    runs = [run_one(c) for c in configs]
    out.write_text(json.dumps({"runs": runs, "split_specs": all_split_specs(configs[0])}))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
