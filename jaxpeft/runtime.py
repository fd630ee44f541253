"""Process-wide set-up of a run: the persistent compilation cache, the dropout PRNG, timers, and
work done in the background (imports warmed, the data tokenized while the weights load).

The compilation cache is on by default, in the user's cache folder: a second run of the same
command reads its compiled steps instead of compiling them (and, through ``jaxpeft.training.program_store``
in the same folder, instead of tracing them). ``--compilation_cache=DIR`` moves it,
``--compilation_cache=off`` turns it off; without the flag, ``$JAXPEFT_COMPILATION_CACHE`` (a
folder or ``off``), then JAX's own ``$JAX_COMPILATION_CACHE_DIR``, then
``~/.cache/jaxpeft/xla`` (``$XDG_CACHE_HOME`` honoured).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax

_OFF = ("off", "none", "0", "false", "")


def compilation_cache_dir(setting: str | None = None) -> Path | None:
    """The cache folder for ``--compilation_cache`` (``None``: off)."""
    if setting is None:
        setting = os.environ.get("JAXPEFT_COMPILATION_CACHE")
    if setting is None:
        setting = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if setting is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        return root / "jaxpeft" / "xla"
    if setting.strip().lower() in _OFF:
        return None
    return Path(setting).expanduser()


def enable_compilation_cache(setting: str | None = None) -> Path | None:
    """Points JAX's persistent compilation cache at :func:`compilation_cache_dir` (every compiled
    program is kept, however quick its compilation was); returns the folder, or ``None`` if off.
    Must run before the first compilation of the process."""
    path = compilation_cache_dir(setting)
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def set_prng_impl(name: str) -> str:
    """Selects JAX's default PRNG (behind dropout)."""
    jax.config.update("jax_default_prng_impl", name)
    return name


def prewarm(modules: Sequence[str]) -> threading.Thread:
    """Imports ``modules`` in a background thread (they are needed later in the run; compiling
    releases the interpreter, so the imports overlap it)."""

    def work():
        for m in modules:
            try:
                importlib.import_module(m)
            except Exception:  # noqa: BLE001 -- optional (e.g. matplotlib); the user imports it later
                pass

    t = threading.Thread(target=work, name="jaxpeft-prewarm", daemon=True)
    t.start()
    return t


class Background:
    """``fn()`` in a daemon thread (one that does not hold the process open after an error
    elsewhere); :meth:`result` waits for it and raises what it raised."""

    def __init__(self, fn: Callable[[], Any], name: str):
        self._out: Any = None
        self._err: BaseException | None = None

        def work():
            try:
                self._out = fn()
            except BaseException as e:  # noqa: BLE001 -- handed to the caller by result()
                self._err = e

        self._thread = threading.Thread(target=work, name=name, daemon=True)
        self._thread.start()

    def result(self) -> Any:
        self._thread.join()
        if self._err is not None:
            raise self._err
        return self._out


class Timers:
    """Wall-clock seconds per section of a run (``startup``, ``data``, ``compile``, ``train``,
    ``eval``, ``checkpoint``, ``export``: the adapter and the learning-curve plot), measured from
    ``start`` (``time.perf_counter()`` when the command began; the time before the timers exist
    counts as ``startup``)."""

    SECTIONS = ("startup", "data", "compile", "train", "eval", "checkpoint", "export")

    def __init__(self, start: float | None = None):
        self.start = time.perf_counter() if start is None else start
        self.seconds = {s: 0.0 for s in self.SECTIONS}
        # the imports and argument parsing between the command's start and the run's first timer
        self.seconds["startup"] = time.perf_counter() - self.start

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def report(self) -> dict[str, float]:
        """``{section}_seconds`` for every section, and ``wall_seconds`` so far."""
        out = {f"{k}_seconds": round(v, 4) for k, v in self.seconds.items()}
        out["wall_seconds"] = round(self.elapsed(), 4)
        return out


def peak_memory() -> int | None:
    """The most memory the first local device held at once so far (bytes), where the platform
    reports it (GPUs, TPUs; not the CPU)."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 -- not every backend has memory statistics
        return None
    if not stats:
        return None
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)
