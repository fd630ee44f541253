"""Training checkpoints with Orbax: the trainable subtree, its optimizer state, step and RNG.

``<output_dir>/checkpoints/<step>/`` holds two Orbax items:

* ``state`` (``StandardSave``): the real leaves of the :class:`~jaxpeft.training.steps.TrainState` as a
  nested dict -- ``step``, ``rng``, ``trainable/<param path>`` and ``opt_state/<...>/mu/<param
  path>``. Frozen weights are holes (``optax.MaskedNode``) of the state, so they are never saved;
  the base model is reloaded from its source and checked against a fingerprint.
* ``meta`` (``JsonSave``): the run's config, the settings that decide its trajectory (compute
  included), the method and its options, the base-model fingerprint, the data position (epoch,
  batch, a hash of the remaining batch order and of the training data), and the best dev metrics
  so far.

Orbax writes each step into a temporary folder and renames it when complete, so a write cut short
(a killed process) is never listed as a checkpoint; temporary folders are removed when the manager
opens. A complete-looking checkpoint that cannot be read is moved to
``<output_dir>/unreadable_checkpoints/`` and resume falls back to the one before it.

Saving is asynchronous: ``save`` returns once the arrays are copied to host memory. Restoring takes
shapes, dtypes and shardings from a freshly built state, so a state saved on one device layout
restores onto another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

import jaxpeft
from jaxpeft import masks
from jaxpeft.models import fingerprint
from jaxpeft.errors import UserError


def _orbax():
    """``orbax.checkpoint``, imported on first use (it takes a second or two to import; a run that
    neither resumes nor has saved yet does not need it, and imports it in the background)."""
    import orbax.checkpoint as ocp

    return ocp

log = logging.getLogger(__name__)


class _PeriodicSaveFilter(logging.Filter):
    """Periodic checkpoints carry no dev metrics on purpose (only evaluations rank checkpoints);
    Orbax warns about each of them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_PeriodicSaveFilter())

CHECKPOINT_DIR = "checkpoints"
UNREADABLE_DIR = "unreadable_checkpoints"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- state <-> saved tree


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a/b": x}`` -> ``{"a": {"b": x}}``.

    >>> nest({"a/b": 1, "a/c": 2, "d": 3})
    {'a': {'b': 1, 'c': 2}, 'd': 3}
    """
    out: dict[str, Any] = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {path!r} runs through a leaf")
        if name in node:
            raise ValueError(f"path {path!r} is not unique")
        node[name] = leaf
    return out


def saved_tree(state: Any) -> dict[str, Any]:
    """The nested dict of ``state``'s real leaves (holes of frozen weights left out) that is saved."""
    return nest(masks.flatten(state))


def abstract_tree(tree: Any) -> Any:
    """Shape, dtype and sharding of every leaf: the restore target."""
    return jax.tree_util.tree_map(_orbax().utils.to_shape_dtype_struct, tree)


def state_from_tree(tree: Any, like: Any) -> Any:
    """Puts the leaves of a restored nested dict back into the structure of ``like`` (holes included)."""
    flat = masks.flatten(tree)
    want = set(masks.flatten(like))
    if set(flat) != want:
        raise ValueError(f"restored tree differs from the state: missing {sorted(want - set(flat))[:3]}, "
                         f"extra {sorted(set(flat) - want)[:3]}")
    return masks.unflatten(flat, like)


def sha256_arrays(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def complete_steps(directory: str | Path) -> list[int]:
    """Steps of the complete (finalized) checkpoints in ``directory``; creates nothing."""
    d = Path(directory)
    if not d.is_dir() or not any(d.iterdir()):
        return []
    return sorted(_orbax().path.step.checkpoint_steps(d))


# ----------------------------------------------------------------------------- the Orbax manager


def _ranking(main_metric: str):
    """Best-checkpoint key: the dev metric (NaN counts as worst), earlier step first on ties --
    the same order as the training loop's ``best``."""

    def rank(m: Mapping[str, Any]) -> tuple[float, int]:
        v = float(m[main_metric])
        return (-math.inf if math.isnan(v) else v, -int(m["step"]))

    return rank


class RunCheckpoints:
    """An Orbax ``CheckpointManager`` of train states (without frozen weights) plus JSON metadata.

    Keeps the ``keep`` latest checkpoints and, when ``main_metric`` is given, the best one by it
    (checkpoints saved with ``metrics``; higher is better).
    """

    def __init__(self, directory: str | Path, *, keep: int, main_metric: str | None = None,
                 async_save: bool = True):
        if keep < 1:
            raise ValueError("keep must be >= 1")
        ocp = _orbax()
        from orbax.checkpoint import checkpoint_managers

        self.directory = Path(directory).absolute()
        self.main_metric = main_metric
        policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
        rank = _ranking(main_metric) if main_metric else None
        if rank:
            policies.append(checkpoint_managers.BestN(get_metric_fn=rank, n=1,
                                                      keep_checkpoints_without_metrics=False))
        # best_fn (with the policy above deciding what is kept) makes Orbax write each checkpoint's
        # metrics to disk, so the best one is still known after a restart.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            best_fn=rank, best_mode="max",
            enable_async_checkpointing=async_save, cleanup_tmp_directories=True, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, meta: Mapping[str, Any],
             metrics: Mapping[str, float] | None = None) -> bool:
        """Starts saving ``state`` at ``step`` (returns once arrays are on the host); ``False`` when
        a checkpoint of this step or a later one exists. ``metrics`` rank it for "best"."""
        if metrics is not None and self.main_metric:
            metrics = {self.main_metric: float(metrics[self.main_metric]), "step": int(step)}
        else:
            metrics = None
        ocp = _orbax()
        args = ocp.args.Composite(state=ocp.args.StandardSave(saved_tree(state)),
                                  meta=ocp.args.JsonSave(dict(meta)))
        return bool(self.manager.save(step, args=args, metrics=metrics))

    def read_meta(self, step: int) -> dict[str, Any]:
        ocp = _orbax()
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def saved_paths(self, step: int) -> list[str]:
        """The ``/``-joined keys of the arrays saved at ``step`` (read from Orbax's metadata)."""
        md = self.manager.item_metadata(step)["state"]
        return sorted(masks.flatten(getattr(md, "tree", md)))

    def restore(self, step: int, like: Any) -> Any:
        """The state saved at ``step``, with the structure, dtypes and shardings of ``like``."""
        like_tree = saved_tree(like)
        saved, want = set(self.saved_paths(step)), set(masks.flatten(like_tree))
        if saved != want:
            raise UserError(
                f"checkpoint {self.step_dir(step)} holds other arrays than this run trains: "
                f"{len(want - saved)} missing (e.g. {sorted(want - saved)[:2]}), "
                f"{len(saved - want)} unexpected (e.g. {sorted(saved - want)[:2]})")
        ocp = _orbax()
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_tree(like_tree)))
        return state_from_tree(self.manager.restore(step, args=args)["state"], like)

    def set_aside(self, step: int) -> Path:
        """Moves an unreadable checkpoint out of the way (kept for inspection, never loaded again)."""
        dest = self.directory.parent / UNREADABLE_DIR / str(step)
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.step_dir(step)), str(dest))
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ----------------------------------------------------------------------------- a run's checkpoints


def _short(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


#: settings added since checkpoints first recorded theirs -> the value the runs before them ran with
#: (a setting a checkpoint lacks matches that value; one not listed here matches None or False)
ADDED_SETTINGS: dict[str, Any] = {"group_by_length": True}


def _as_before(name: str, value: Any) -> bool:
    """Whether a run with ``value`` for the setting ``name`` trains as those before it existed."""
    return value == ADDED_SETTINGS[name] if name in ADDED_SETTINGS else value in (None, False)


@dataclasses.dataclass
class RunIdentity:
    """What a checkpoint must agree with to be resumed: the settings that decide the training
    trajectory (compared one by one), the base model's fingerprint and the training data."""

    settings: dict[str, Any]          # trajectory-relevant settings (flag name -> value)
    config: dict[str, Any]            # every setting, recorded
    method: str
    method_options: dict[str, Any]
    task: str
    num_labels: int
    fingerprint: dict[str, Any]
    train_examples: int
    train_data_sha256: str
    total_steps: int
    steps_per_epoch: int


class Checkpoints:
    """A run's checkpoints every ``save_every`` steps and at every evaluation, and exact resume.

    ``data_position(step)`` says where the batch iterator stands after ``step`` steps (epoch,
    batch, and a hash of the batches left in the epoch), recorded and checked on resume.
    """

    def __init__(self, output_dir: str | Path, identity: RunIdentity, *, keep: int, save_every: int,
                 resume: bool | None, main_metric: str,
                 data_position: Callable[[int], dict[str, Any]],
                 echo: Callable[[str], None] = print, log: Callable[..., None] | None = None):
        self.directory = Path(output_dir).absolute() / CHECKPOINT_DIR
        self.identity = identity
        self.keep, self.save_every, self.resume_flag = keep, save_every, resume
        self.main_metric = main_metric
        self.enabled = keep > 0
        self.data_position = data_position
        self.echo, self.log = echo, log
        self.best: dict[str, float] | None = None
        self.best_step = 0
        self.resumed_from: int | None = None
        self.run: RunCheckpoints | None = None

    def meta(self, step: int) -> dict[str, Any]:
        i = self.identity
        return {"format_version": FORMAT_VERSION, "jaxpeft_version": jaxpeft.__version__, "step": step,
                "total_steps": i.total_steps, "config": i.config, "settings": i.settings,
                "method": i.method, "method_options": i.method_options, "task": i.task,
                "num_labels": i.num_labels, "fingerprint": i.fingerprint,
                "train_examples": i.train_examples, "train_data_sha256": i.train_data_sha256,
                "data_position": self.data_position(step), "best": self.best, "best_step": self.best_step}

    # -- resume -------------------------------------------------------------------------------
    def resume(self, state: Any) -> Any:
        """Opens the checkpoints; returns the state of the latest complete one when resuming,
        ``state`` otherwise. ``state`` (freshly built) gives the target shapes and shardings."""
        where, flag = self.directory, self.resume_flag
        steps = complete_steps(where)
        if not self.enabled:
            if flag:
                raise UserError("--resume needs checkpoints, but --keep=0 turns them off")
            if steps:
                raise UserError(f"{where} holds checkpoints (latest step {steps[-1]}) that --keep=0 would "
                                "neither resume from nor update; use --keep>0 or another --output_dir")
            return state
        if flag is False and steps:
            raise UserError(f"--no-resume, but {where} holds checkpoints of an earlier run (latest step "
                            f"{steps[-1]}); use another --output_dir or remove that folder")
        if flag and not steps:
            raise UserError(f"--resume: no complete checkpoint in {where}")
        if not steps:   # a fresh run: the manager opens at the first save
            return state
        # fail on a wrong base or other flags before anything is written
        self.check_compatible(*self._newest_readable_meta(steps))
        self.run = RunCheckpoints(where, keep=self.keep, main_metric=self.main_metric)
        for step in reversed(self.run.steps()):
            try:
                meta = self.run.read_meta(step)
                self.check_compatible(meta, step)
                restored = self.run.restore(step, state)
            except UserError:
                self.run.close()
                raise
            except Exception as e:  # noqa: BLE001 -- any read failure means "not a good checkpoint"
                dest = self.run.set_aside(step)
                log.warning("checkpoint %s cannot be read (%s: %s); moved to %s, trying the one before",
                            where / str(step), type(e).__name__, str(e).splitlines()[0][:200], dest)
                self.echo(f"checkpoint of step {step} is unreadable; moved to {dest}")
                continue
            if int(restored.step) != step:
                raise UserError(f"checkpoint {where / str(step)} holds step {int(restored.step)}, not {step}")
            self.best, self.best_step = meta.get("best"), int(meta.get("best_step", 0))
            self.resumed_from = step
            self.echo(f"resuming from step {step} of {self.identity.total_steps} ({where / str(step)})")
            if self.log is not None:
                self.log(event="resume", step=step, best_step=self.best_step)
            return restored
        if steps:
            raise UserError(f"no checkpoint in {where} could be read (moved to "
                            f"{where.parent / UNREADABLE_DIR}); run again to start from step 0")
        return state

    def _newest_readable_meta(self, steps: list[int]) -> tuple[dict[str, Any], int]:
        """The metadata of the newest checkpoint whose JSON reads, without opening a manager."""
        for step in reversed(steps):
            try:
                ocp = _orbax()
                meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
                    self.directory / str(step) / "meta", ocp.args.JsonRestore())
                if isinstance(meta, dict):
                    return meta, step
            except Exception:  # noqa: BLE001 -- handled when the manager restores
                continue
        return {}, 0

    def check_compatible(self, meta: Mapping[str, Any], step: int) -> None:
        """Raises one clear :class:`UserError` if the checkpoint belongs to another base model or to
        a run with other trajectory-relevant settings or data."""
        if not meta:
            return
        what = f"checkpoint {self.directory / str(step)}"
        ident = self.identity
        fingerprint.check(meta.get("fingerprint"), ident.fingerprint, what)
        saved = meta.get("settings")
        if saved is None:   # written before settings were recorded apart
            saved = {k: v for k, v in (meta.get("config") or {}).items() if k in ident.settings}
        diffs = [f"{k}={_short(saved.get(k))} (now {_short(v)})"
                 for k, v in ident.settings.items() if k in saved and saved.get(k) != v]
        diffs += [f"{k} (now {_short(v)})" for k, v in ident.settings.items() if k not in saved
                  and not _as_before(k, v)]
        if meta.get("method") == ident.method:
            diffs += [f"{k}={_short(v)} (now {_short(ident.method_options.get(k))})"
                      for k, v in (meta.get("method_options") or {}).items()
                      if ident.method_options.get(k) != v]
        if not diffs and meta.get("total_steps") != ident.total_steps:
            diffs.append(f"total_steps={meta.get('total_steps')} (now {ident.total_steps})")
        if diffs:
            raise UserError(f"{what} belongs to a run with other settings: {', '.join(diffs)}; "
                            "use the same flags or another --output_dir")
        if meta.get("train_data_sha256") != ident.train_data_sha256:
            raise UserError(f"{what} was trained on other training data ({meta.get('train_examples')} "
                            f"examples, now {ident.train_examples}, or other texts/tokenizer); "
                            "use the same data or another --output_dir")
        pos = meta.get("data_position") or {}
        if pos.get("batch_order_sha256") != self.data_position(step)["batch_order_sha256"]:
            raise UserError(f"{what}: the batch order of epoch {pos.get('epoch')} differs from the one it "
                            "was trained with (other numpy version?); the run cannot resume exactly")

    # -- the loop's hooks ---------------------------------------------------------------------
    def after_step(self, step: int, state: Any) -> None:
        """A checkpoint every ``save_every`` steps (the last step is saved by the final
        evaluation, with its metrics)."""
        if self.save_every > 0 and step % self.save_every == 0 and step < self.identity.total_steps:
            self.save(step, state)

    def save(self, step: int, state: Any, metrics: Mapping[str, float] | None = None) -> None:
        """A checkpoint of ``state`` at ``step`` (nothing when checkpoints are off)."""
        if not self.enabled:
            return
        if self.run is None:
            self.run = RunCheckpoints(self.directory, keep=self.keep, main_metric=self.main_metric)
        self.run.save(step, state, self.meta(step), metrics=metrics)

    def after_eval(self, step: int, state: Any, metrics: Mapping[str, float], is_best: bool) -> None:
        if is_best:
            self.best, self.best_step = dict(metrics), step
        self.save(step, state, metrics)

    def close(self) -> dict[str, Any]:
        """Waits for pending writes; returns the entries for ``results.json``."""
        if self.run is None:
            return {}
        self.run.close()
        return {"checkpoint_dir": str(self.directory), "checkpoint_steps": self.run.steps()}


@dataclasses.dataclass
class Cadence:
    """When a training loop evaluates and saves: an evaluation every ``eval_every`` steps (at each
    epoch's end when 0); a checkpoint every ``save_every`` steps, or, when that is 0, once
    ``save_minutes`` have passed since the last save (an evaluation saves too: call
    :meth:`saved`). Neither happens at the last step, which the loop's end evaluates and saves."""

    total: int
    epoch_end: Callable[[int], bool]
    eval_every: int
    save_every: int
    save_minutes: float
    last_save: float = dataclasses.field(default_factory=time.perf_counter)

    def eval_due(self, step: int) -> bool:
        if step >= self.total:
            return False
        return step % self.eval_every == 0 if self.eval_every > 0 else self.epoch_end(step)

    def save_due(self, step: int) -> str | None:
        """``"every"`` (a ``save_every`` step), ``"time"`` (``save_minutes`` have passed) or ``None``."""
        if self.save_every > 0:
            return "every" if step % self.save_every == 0 else None
        late = time.perf_counter() - self.last_save >= 60 * self.save_minutes
        return "time" if self.save_minutes > 0 and step < self.total and late else None

    def save(self, due: str, step: int, state: Any, checkpoints: "Checkpoints") -> None:
        """Saves ``state`` as :meth:`save_due` said (a time-based save is kept apart from the
        ``save_every`` series)."""
        if due == "time":
            checkpoints.save(step, state)
        else:
            checkpoints.after_step(step, state)
        self.saved()

    def saved(self) -> None:
        self.last_save = time.perf_counter()
