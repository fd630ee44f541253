#!/usr/bin/env python
"""Disk size of a training checkpoint and of an adapter per method, next to a full fine-tuned copy.

    python scripts/checkpoint_sizes.py                       # every registered method, both models
    python scripts/checkpoint_sizes.py --models=bundled --methods=bitfit

For each model (the bundled all-MiniLM-L6-v2 with its weights; BERT-base shapes with random weights,
which is all a size needs) and method, writes into a temporary folder what training writes: one Orbax
checkpoint of the train state (trainable leaves + AdamW state + step + RNG, plus metadata) and the
adapter folder; and, for comparison, the whole params tree as one float32 safetensors file (what a
fully fine-tuned copy of the model costs). Prints a Markdown table.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}" if n < 100 * div else f"{n / div:.0f} {unit}"
    return f"{n} B"


def build(model: str, method, tokenizer):
    import jax

    from jaxpeft.models.bert import FAMILY, BertConfig
    from jaxpeft.models.heads import Head
    from jaxpeft.models.loading import build_module, init_params, load_classifier

    if model == "bundled":
        loaded = load_classifier("sentence-transformers/all-MiniLM-L6-v2", 2, method)
        return loaded.params, loaded.tokenizer, "sentence-transformers/all-MiniLM-L6-v2", loaded.config
    cfg = BertConfig()
    module = build_module(FAMILY, cfg, Head("sequence", 2), method)
    return (init_params(module, jax.random.key(0)), tokenizer, "bert-base-uncased (random weights, shapes only)",
            cfg)


def trained_like(state):
    """The state with random float values (Adam's second moment positive): after training nothing is
    zero, and Orbax compresses -- zeros of a fresh state or of randomly initialised biases would make
    the sizes look smaller than they are."""
    import jax
    import jax.numpy as jnp

    from jaxpeft import masks

    flat = masks.flatten(state)
    keys = jax.random.split(jax.random.key(0), len(flat))

    def fill(path, x, k):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        r = jax.random.normal(k, x.shape, x.dtype)
        return jnp.abs(r) * 1e-6 if "/nu/" in f"/{path}/" else r * 0.02

    return masks.unflatten({p: fill(p, x, k) for (p, x), k in zip(flat.items(), keys)}, state)


def measure(model: str, method_name: str, tmp: Path, tokenizer=None) -> dict:
    import jax
    import numpy as np
    import safetensors.numpy

    from jaxpeft import masks, methods, tasks
    from jaxpeft.adapters import folder
    from jaxpeft.config import Optim
    from jaxpeft.models import fingerprint
    from jaxpeft.models.bert import FAMILY
    from jaxpeft.training import checkpoint, optim, steps

    method = methods.create(method_name)
    params, tokenizer, name, model_config = build(model, method, tokenizer)
    params = method.init_params(params, FAMILY, tokenizer=tokenizer, rng=jax.random.key(1))
    mask = method.mask(params, FAMILY)
    n_train, n_all = masks.count(params, mask)
    trainable, _ = masks.split(params, mask)
    tx = optim.make_optimizer(Optim())
    state = trained_like(steps.init_state(trainable, tx, 0))
    params = masks.merge(state.trainable, masks.split(params, mask)[1])   # the trained-like values
    fp = fingerprint.fingerprint(params, name, exclude=method.added, prefix=FAMILY.prefix)
    work = tmp / f"{model}-{method_name}"
    ckpt = checkpoint.RunCheckpoints(work / "checkpoints", keep=1, async_save=False)
    ckpt.save(1, state, {"step": 1, "method": method_name, "fingerprint": fp})
    ckpt.close()
    adapter = folder.save_adapter(work / "adapter", params, method, tasks.get("sst2"), family=FAMILY,
                                  model_config=model_config, base_model=name, fingerprint=fp)
    full = work / "full.safetensors"
    safetensors.numpy.save_file({k: np.asarray(v, np.float32) for k, v in masks.flatten(params).items()},
                                str(full))
    row = {"model": name, "method": method_name, "trainable": n_train, "total": n_all,
           "checkpoint": du(work / "checkpoints" / "1"), "adapter": du(adapter), "full_copy": du(full),
           "tokenizer": tokenizer}
    shutil.rmtree(work)
    return row


def main(argv=None) -> int:
    from jaxpeft import methods

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bundled,bert-base")
    p.add_argument("--methods", default=",".join(methods.REGISTRY))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        for model in args.models.split(","):
            for m in args.methods.split(","):
                row = measure(model, m, Path(tmp), tokenizer)
                tokenizer = row.pop("tokenizer")
                rows.append(row)
                print(f"measured {model} {m}", file=sys.stderr)
    print("| model | method | trainable params | checkpoint | adapter | full fine-tuned copy | adapter / copy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.3f}%) "
              f"| {human(r['checkpoint'])} | {human(r['adapter'])} ({r['adapter']:,} B) | {human(r['full_copy'])} "
              f"| {r['adapter'] / r['full_copy']:.3%} |")
    return 0


if __name__ == "__main__":
    from jaxpeft import cli

    sys.exit(cli.guarded(main))
