"""Run a test snippet in a fresh process with several CPU devices (XLA's host platform split
into ``devices``), as the sharding tests of the kernels do. The snippet gets ``rel_err(got, want)``:
the largest difference over two pytrees, each relative to ``1 + max |want|`` of its leaf (sums of
many terms added in another order on several devices differ by more than float32 rounding in
absolute terms), and must print ``same`` when its checks pass."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_PRELUDE = """
import jax, numpy as np
from jaxpeft.models.kernels import pallas_common
pallas_common._interpreter_allowed = 1   # the kernels run in Pallas's interpreter on the CPU

def rel_err(got, want):
    return max(float(np.abs(np.asarray(a) - np.asarray(c)).max() / (1 + np.abs(np.asarray(c)).max()))
               for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
"""


def run(code: str, devices: int = 4, timeout: int = 300) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
    p = subprocess.run([sys.executable, "-c", _PRELUDE + textwrap.dedent(code)], env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 and "same" in p.stdout, p.stdout + p.stderr
    return p.stdout
