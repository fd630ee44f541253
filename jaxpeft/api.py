"""The Python API: everything the command line does, one call away, on the same loop.

>>> import jaxpeft
>>> run = jaxpeft.train(method="lora", task="sst2", data_dir="../shared/data/glue")  # doctest: +SKIP
>>> run.results["best_dev"]                                                       # doctest: +SKIP
{'accuracy': 0.88}
>>> adapter = jaxpeft.load(run.adapter_dir)                                        # doctest: +SKIP
>>> adapter.predict(["a gripping film", "dull and long"])                          # doctest: +SKIP
[{'prediction': 'positive', 'scores': {...}}, {'prediction': 'negative', ...}]
>>> adapter.save("my-adapter")     # peft's two files: peft.PeftModel.from_pretrained reads them  # doctest: +SKIP

:func:`train` takes the command line's flags as keyword arguments (``learning_rate=3e-4``,
``num_virtual_tokens=10``, ``tasks="sst2,cola"``), with the same defaults (the method's config for
the task); :func:`load` reads any adapter folder (ours or one peft wrote); :class:`Adapter` predicts
for texts, pairs, token lists or question/context pairs, as its task takes them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

from jaxpeft.errors import UserError


@dataclasses.dataclass
class Run:
    """A finished training run: its ``results.json`` and where its adapter(s) went."""

    results: dict[str, Any]
    output_dir: Path
    job: Any = dataclasses.field(repr=False, default=None)

    @property
    def adapter_dir(self) -> Path | None:
        d = self.results.get("adapter_dir")
        return None if d is None else Path(d)

    @property
    def adapter_dirs(self) -> dict[str, Path]:
        """Each task's adapter of a multi-task run."""
        return {k: Path(v) for k, v in (self.results.get("adapter_dirs") or {}).items()}

    def load(self, **kw: Any) -> "Adapter":
        """The run's adapter, loaded for prediction."""
        if self.adapter_dir is None:
            raise UserError("this run exported no single adapter (a multi-task run: load adapter_dirs[task])")
        return load(self.adapter_dir, **kw)


def train(config: str | None = None, *, echo: Any = print, **flags: Any) -> Run:
    """Trains as ``jaxpeft-train`` would with ``flags`` (flag names as keywords; ``config``: a
    config file). Returns the :class:`Run`; its files are in ``results.output_dir``."""
    from jaxpeft import config as config_lib
    from jaxpeft.training import loop

    start = time.perf_counter()
    overrides = {k: v for k, v in flags.items() if v is not None}
    if config is not None:
        overrides["config"] = config
    cfg = config_lib.build(overrides)
    if cfg.tasks:
        from jaxpeft.training.multitask import MultiTask as Job
    else:
        from jaxpeft.training.single import SingleTask as Job
    job = Job(cfg, echo=echo or (lambda s: None), start=start)
    results = loop.run(job)
    return Run(results, Path(cfg.run.output_dir), job)


@dataclasses.dataclass
class Adapter:
    """A loaded adapter on its base model (see :func:`load`)."""

    directory: Path
    loaded: Any
    params: Any
    method: Any
    task: Any
    max_seq_length: int = 128

    @property
    def kind(self) -> str:
        return self.task.kind

    def inputs(self, items: Sequence[Any]) -> Any:
        """The task's raw examples of ``items``: texts or ``(text, text)`` pairs (sequence tasks),
        lists of tokens (tagging), ``{"question", "context"}`` dicts (QA)."""
        from jaxpeft.data.encoding import Examples

        items = list(items)
        if not items:
            raise UserError("nothing to predict")
        if self.kind == "sequence":
            n = getattr(self.task, "num_texts", 1)
            rows = [(x,) if isinstance(x, str) else tuple(x) for x in items]
            if any(len(r) != n for r in rows):
                raise UserError(f"task {self.task.name} takes {n} text(s) per example")
            return Examples(tuple(list(c) for c in zip(*rows)), None, "<inputs>")
        if self.kind == "token":
            from jaxpeft.tasks.conll import TaggedSentences

            tokens = [x.split() if isinstance(x, str) else list(x) for x in items]
            return TaggedSentences(tokens, None, "<inputs>", [0] * len(tokens))
        from jaxpeft.tasks.squad import QAExample, SquadData

        return SquadData([QAExample(str(x.get("id", i)), x["question"], x["context"], (), (), 0, "")
                          for i, x in enumerate(items)], 1, "<inputs>")

    def predict(self, items: Sequence[Any], batch_size: int = 64) -> list[dict[str, Any]]:
        """One prediction per item (label and scores; tags per word; answer span)."""
        from jaxpeft.adapters import predict as prediction

        return prediction.predict(self.loaded, self.params, self.method, self.task, self.inputs(items),
                                  max_seq_length=self.max_seq_length, batch_size=batch_size)

    def save(self, directory: str | Path) -> Path:
        """Writes the adapter as a folder again (peft's files; ours where peft lacks the method)."""
        from jaxpeft.adapters import folder
        from jaxpeft.config import Head
        from jaxpeft.models.fingerprint import fingerprint
        from jaxpeft.models.heads import head_modules

        rec = folder.read_adapter(self.directory).record
        head = Head(pooling=rec.get("pooling") or "cls", modules_to_save=",".join(rec.get("modules_to_save") or [])
                    or None)
        fam = self.loaded.family
        fp = rec.get("fingerprint") or fingerprint(self.loaded.params, self.loaded.name, str(self.loaded.model_dir),
                                                   exclude=self.method.added, prefix=fam.prefix)
        return folder.save_adapter(directory, self.params, self.method, self.task, family=fam,
                                   model_config=self.loaded.config, base_model=self.loaded.name, fingerprint=fp,
                                   max_seq_length=self.max_seq_length, head=head,
                                   heads=head_modules(fam, self.loaded.module.head), compute=self.loaded.compute)


def load(directory: str | Path, *, model: str | None = None, task: str | None = None,
         compute: str = "auto") -> Adapter:
    """Loads an adapter folder (ours, or one peft wrote: give ``task``, and ``model`` where its base
    is not reachable) on its base model; ``compute``: ``auto``, ``exact`` or ``fast``."""
    from jaxpeft import compute as compute_lib
    from jaxpeft.adapters import folder

    spec = compute_lib.resolve(compute)
    rec = folder.read_adapter(directory)
    loaded, params, method, task_obj = folder.load_adapter(directory, model, task=task, compute=spec)
    return Adapter(Path(directory), loaded, params, method, task_obj, int(rec.max_seq_length or 128))


def predict(directory: str | Path, items: Sequence[Any], **kw: Any) -> list[dict[str, Any]]:
    """``load(directory).predict(items)``."""
    return load(directory, **kw).predict(items)
