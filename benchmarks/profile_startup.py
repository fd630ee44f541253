#!/usr/bin/env python
"""Times each step of a run's start-up, from ``import jax`` to the model on the device, in one
process (run it twice: the first process after a machine starts also reads every file from disk).

    python benchmarks/profile_startup.py MODEL_DIR
    XLA_PYTHON_CLIENT_PREALLOCATE=false python benchmarks/profile_startup.py MODEL_DIR

Prints the time since the start and the step's own time for: numpy, jax, the backend (``jax.devices``),
the first transfer to the device (where JAX reserves its GPU memory unless preallocation is off),
flax, optax, jaxpeft's training loop, Orbax, and loading the classifier with its pretrained weights.
"""

import sys
import time

t0 = time.perf_counter()
marks: list[tuple[str, float]] = []


def mark(name: str) -> None:
    marks.append((name, time.perf_counter() - t0))


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    import numpy
    mark("import numpy")
    import jax
    mark("import jax")
    jax.devices()
    mark("jax.devices() (the backend)")
    jax.device_put(numpy.ones(4)).block_until_ready()
    mark("first transfer to the device")
    import flax.linen  # noqa: F401
    mark("import flax.linen")
    import optax  # noqa: F401
    mark("import optax")
    import jaxpeft.training.single  # noqa: F401
    mark("import jaxpeft.training.single")
    import orbax.checkpoint  # noqa: F401
    mark("import orbax.checkpoint")
    from jaxpeft import compute
    from jaxpeft.models import loading
    model = loading.load_classifier(sys.argv[1], 2, compute=compute.resolve("auto"), seed=0)
    jax.block_until_ready(model.params)
    mark("load_classifier (weights on the device)")
    prev = 0.0
    for name, t in marks:
        print(f"{name:42s} {t:7.3f} s  (+{t - prev:.3f})")
        prev = t
    return 0


if __name__ == "__main__":
    sys.exit(main())
