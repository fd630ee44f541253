"""Multi-process runs: when and how ``jax.distributed.initialize()`` is called.

One process per host (TPU VM worker, SLURM task, GPU node) runs the same ``scripts/train.py``;
``jax.distributed.initialize()`` connects them so that ``jax.devices()`` lists the devices of every
process and one jitted step spans them all. It must run before anything touches a JAX backend.

``--distributed`` decides:

* ``auto`` (default): initialise when ``--coordinator_address --num_processes --process_id`` are
  given, or when a multi-process job is detected: a SLURM step with several tasks, an Open MPI job
  with several ranks, or a Cloud TPU VM (a Google TPU on the PCI bus and ``libtpu`` installed; JAX
  then reads the slice's workers from the TPU metadata server -- on a single-host slice that is a
  group of one). Otherwise the run stays single-process.
* ``on``: always initialise; values not given are detected by JAX (fails if there is no cluster).
* ``off``: never.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import jax

from jaxpeft.errors import UserError

log = logging.getLogger(__name__)

DISTRIBUTED_MODES = ("auto", "on", "off")
_GOOGLE_PCI_VENDOR = "0x1ae0"
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _int(env: Mapping[str, str], key: str, default: int = 1) -> int:
    try:
        return int(env.get(key, default))
    except ValueError:
        return default


def _tpu_vm() -> bool:
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def detect_cluster(env: Mapping[str, str] | None = None, tpu_vm: bool | None = None) -> str | None:
    """The kind of multi-process job this process belongs to (``slurm``, ``openmpi``, ``tpu``),
    or ``None`` for a plain single-process run.

    >>> detect_cluster({}, tpu_vm=False) is None
    True
    >>> detect_cluster({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
    ...                 "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}, tpu_vm=False)
    'slurm'
    """
    env = os.environ if env is None else env
    if all(k in env for k in _SLURM_VARS) and _int(env, "SLURM_NTASKS") > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if env.get("TPU_WORKER_HOSTNAMES") or (_tpu_vm() if tpu_vm is None else tpu_vm):
        return "tpu"
    return None


def check_coordinator_args(mode: str, coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> bool:
    """Validates the distributed flags; returns whether explicit coordinator values were given."""
    if mode not in DISTRIBUTED_MODES:
        raise UserError(f"--distributed={mode!r}: expected one of {', '.join(DISTRIBUTED_MODES)}")
    values = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
              "--process_id": process_id}
    given = [k for k, v in values.items() if v is not None]
    if not given:
        return False
    if mode == "off":
        raise UserError(f"--distributed=off contradicts {', '.join(given)}")
    if len(given) != len(values):
        missing = [k for k in values if k not in given]
        raise UserError(f"{', '.join(values)} go together; missing {', '.join(missing)}")
    if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}", coordinator_address):
        raise UserError(f"--coordinator_address={coordinator_address!r}: expected HOST:PORT "
                        f"(e.g. 10.0.0.2:1234), the address of process 0")
    if num_processes < 1:
        raise UserError(f"--num_processes={num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in 0..{num_processes - 1}")
    return True


def initialize(mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               env: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize()`` when ``mode`` and the environment ask for it (see the
    module docstring); returns whether this is a distributed run. Idempotent."""
    explicit = check_coordinator_args(mode, coordinator_address, num_processes, process_id)
    if jax.distributed.is_initialized():
        return True
    if mode == "off":
        return False
    cluster = None if explicit else detect_cluster(env)
    if mode == "auto" and not explicit and cluster is None:
        return False
    log.info("jax.distributed.initialize(%s)", coordinator_address or f"detected: {cluster or 'by JAX'}")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except RuntimeError as e:
        if "must be called before" in str(e):   # a backend is up already
            raise UserError("jax.distributed.initialize() must run before JAX is used in this "
                            "process; start a fresh process for a distributed run") from None
        raise
    return True


def is_main_process() -> bool:
    """Process 0 writes logs, results and progress; the others stay quiet."""
    return jax.process_index() == 0
