"""Short training runs for the multi-device tests, in a process of its own: the number of (fake CPU)
devices is fixed when JAX starts, so the caller sets ``XLA_FLAGS`` before this process begins.

    python tests/mesh_worker.py OUT.json CONFIG.json [CONFIG.json ...]

Each CONFIG holds ``TrainConfig`` fields (a multi-process run adds the coordinator flags). For every
run, process ``p`` writes to ``OUT.p<p>.json``: the train losses (process 0, from ``log.jsonl``), the
final trainable params gathered from all devices, the dev metrics, the PartitionSpec of every leaf,
the trace counts of the jitted steps, and the example indices this process fed for a few batches.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _specs(tree) -> dict[str, str]:
    from jaxpeft import masks

    return {p: str(tuple(getattr(x.sharding, "spec", ()))) for p, x in masks.flatten(tree).items()}


def _check_batches(job) -> dict:
    """The rows this process feeds for some batches, and whether every slice of the assembled
    global arrays on this process's devices equals that slice of the batch built whole on the host."""
    import numpy as np

    from jaxpeft.training import steps

    order = job.batches.order(0)
    picks = [order[0], order[1], min(order, key=lambda i: int((i >= 0).sum()))]  # + filler rows
    fed, equal = [], []
    for idx in picks:
        local = job.batches.batch(idx, job.plan.process_rows(len(idx)))
        fed.append({"batch": idx.tolist(), "rows": local["index"].tolist()})
        arrays = job.plan.global_batch(steps.model_inputs(local))   # what a train step is fed
        whole = job.batches.batch(idx)
        equal.append(all(a.shape == whole[k].shape and all(
            np.array_equal(np.asarray(s.data), whole[k][s.index]) for s in a.addressable_shards)
            for k, a in arrays.items()))
    return {"fed": fed, "assembled_equal": equal}


def run_one(cfg_values: dict) -> dict:
    import jax

    from jaxpeft import config, masks
    from jaxpeft.training import loop, single

    cfg = config.build(cfg_values)
    job = single.SingleTask(cfg, echo=lambda s: None)
    batches = _check_batches(job)
    results = loop.run(job)
    state, frozen = job.final_state, job.frozen
    # every trainable leaf on every device (one compilation), so each process can read it whole
    trainable = jax.jit(lambda t: t, out_shardings=job.plan.replicated)(state.trainable)
    log = Path(cfg.run.output_dir) / "log.jsonl"
    records = [json.loads(x) for x in log.read_text().splitlines()] if jax.process_index() == 0 else []
    opt_specs = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
        opt_specs[masks.path_str(kp)] = str(tuple(getattr(x.sharding, "spec", ())))
    return {
        "process": jax.process_index(), "processes": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "mesh": job.plan.describe(),
        "losses": [r["loss"] for r in records if r["event"] == "train"],
        "log_events": [r["event"] for r in records],
        "final_dev": results["final_dev"],
        "trainable": {p: jax.numpy.asarray(v).tolist() for p, v in masks.flatten(trainable).items()},
        "trainable_specs": _specs(state.trainable), "frozen_specs": _specs(frozen),
        "opt_specs": opt_specs,
        "traces": dict(job.plan.traces),
        "widths": sorted({int(w) for w in _train_widths(job)}),
        **batches,
    }


def _train_widths(job):
    """The bucket lengths of the batches the run trained on."""
    for step in range(job.total_steps):
        epoch, i = job.position(step)
        yield job.batches.width(job.batches.order(epoch)[i])


def main(argv: list[str]) -> int:
    out, configs = Path(argv[0]), argv[1:]
    runs = [run_one(json.loads(Path(c).read_text())) for c in configs]
    import jax

    target = out.with_suffix(f".p{jax.process_index()}.json")
    target.write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main(sys.argv[1:]))
