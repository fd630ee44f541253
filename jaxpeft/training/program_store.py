"""Compiled programs kept on disk between runs, so that a second run skips tracing as well as
compiling.

JAX's persistent compilation cache (``jaxpeft.runtime``) saves XLA's work, but finds its entry by
the lowered program: every run would still trace the model and lower it first, 2-3 s of the main
command on one H200 (``docs/benchmarks.md``). The store keeps each run's
executables, serialised (``jax.experimental.serialize_executable``), in
``<compilation cache>/jaxpeft-programs/`` under a key of everything they are a function of: the
trainer's program key (model, method, optimizer constants, mesh, shapes, dtypes, shardings) and
:func:`environment` (jaxpeft's own source, the versions of JAX and its libraries, the devices
and the XLA flags). A run whose key is there loads its programs instead of tracing them.

It is on when the compilation cache is on (``--compilation_cache=off`` turns both off) and the run
is one process (a multi-process run traces, and finds XLA's work in the compilation cache). Only
freshly compiled programs are stored: an executable read from JAX's cache and serialised again
loses code on the CPU ("Function ... not found" when it runs), so a run whose programs came from
that cache (after an edit of jaxpeft's source, say) leaves the store as it is. A stored entry that
cannot be read or loaded is removed and the run compiles as if it were absent.
Like JAX's cache, the folder must be trusted: loading an executable runs code from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import jax
from jax import monitoring

log = logging.getLogger(__name__)

FOLDER = "jaxpeft-programs"
FORMAT = 1
#: JAX settings that change what a traced program computes
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_default_prng_impl",
                 "jax_threefry_partitionable", "jax_numpy_rank_promotion", "jax_numpy_dtype_promotion",
                 "jax_use_shardy_partitioner", "jax_default_dtype_bits")
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy")


def package_root() -> Path:
    """The folder of the ``jaxpeft`` package (this module is in its ``training/``)."""
    return Path(__file__).resolve().parent.parent


@lru_cache(maxsize=1)
def source_digest() -> str:
    """A hash of every Python file of the jaxpeft package (the code that builds the programs: the
    models, methods and tasks as well as the trainer)."""
    root = package_root()
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "-"


def environment() -> dict[str, Any]:
    """What a stored program depends on beyond the trainer's program key."""
    devices = jax.devices()
    client = devices[0].client
    return {
        "format": FORMAT, "source": source_digest(),
        "packages": {p: _version(p) for p in _PACKAGES},
        "platform": [client.platform, str(getattr(client, "platform_version", ""))],
        "devices": [(d.id, d.device_kind, d.process_index) for d in devices],
        "jax": {k: str(getattr(jax.config, k, None)) for k in _JAX_SETTINGS},
        "env": {k: os.environ.get(k) for k in _ENV},
    }


class CacheHits:
    """How many programs JAX's persistent compilation cache provided (see :func:`watch_cache_hits`)."""

    count = 0


@contextlib.contextmanager
def watch_cache_hits() -> Iterator[CacheHits]:
    """Counts the persistent-cache hits of the compilations inside the block."""
    hits = CacheHits()

    def listener(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            hits.count += 1

    monitoring.register_event_listener(listener)
    try:
        yield hits
    finally:
        monitoring.unregister_event_listener(listener)


class ProgramStore:
    """The executables of earlier runs in ``folder``, one file per key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    @classmethod
    def beside(cls, compilation_cache: Path | None) -> "ProgramStore | None":
        """The store of a run whose compilation cache is ``compilation_cache`` (``None``: off, as for
        a multi-process run)."""
        if compilation_cache is None or jax.process_count() > 1:
            return None
        return cls(Path(compilation_cache) / FOLDER)

    def path(self, program_key: str) -> Path:
        full = hashlib.sha256(repr((program_key, environment())).encode()).hexdigest()
        return self.folder / f"{full}.pkl"

    def load(self, program_key: str) -> dict[str, dict[Any, Any]] | None:
        """``{group: {name: jax.stages.Compiled}}`` saved under ``program_key``, or ``None``."""
        from jax.experimental import serialize_executable

        path = self.path(program_key)
        if not path.is_file():
            return None
        try:
            with open(path, "rb") as f:
                stored = pickle.load(f)
            return {group: {name: serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
                            for name, (blob, in_tree, out_tree) in programs.items()}
                    for group, programs in stored.items()}
        except Exception as e:  # noqa: BLE001 -- a stale or broken entry: compile instead
            log.warning("ignoring the stored programs %s (%s: %s); compiling them", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None

    def save(self, program_key: str, programs: dict[str, dict[Any, Any]]) -> Path | None:
        """Writes ``{group: {name: jax.stages.Compiled}}`` under ``program_key`` (atomically);
        returns the file, or ``None`` where the programs cannot be serialised or written."""
        from jax.experimental import serialize_executable

        path, tmp = self.path(program_key), None
        try:
            stored = {group: {name: serialize_executable.serialize(c) for name, c in progs.items()}
                      for group, progs in programs.items()}
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                pickle.dump(stored, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, path)
            return path
        except Exception as e:  # noqa: BLE001 -- the run goes on; the next one compiles again
            log.warning("could not store the compiled programs in %s (%s: %s)", self.folder, type(e).__name__, e)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return None
