"""The task plug-in point: what a run reads, the head it trains, its loss, its metrics and what it
prints.

A :class:`Task` is one object a run (training, prediction, serving) asks for everything that depends
on the task; nothing else in jaxpeft knows a task by name. Each *kind* of task is one subclass:

* ``sequence`` (:class:`SequenceTask`): one label per example (classification) or one value
  (regression); GLUE's tasks and your own CSV/TSV/JSON files;
* ``token`` (:mod:`jaxpeft.tasks.tagging`): one tag per word (POS, NER, your own CoNLL files);
* ``span`` (:mod:`jaxpeft.tasks.qa`): an answer span in a context (SQuAD).

A task reads raw examples of a split (:meth:`Task.read`), encodes them into fixed-length rows
(:meth:`Task.encode` -> :class:`~jaxpeft.data.encoding.Encoded`), names its head
(:meth:`Task.head`), computes its loss from the model's outputs on a batch (:meth:`Task.loss`,
jax), and turns the outputs of a whole split back into metrics and per-example predictions
(:meth:`Task.evaluate`, :meth:`Task.predictions`, numpy). :meth:`Task.record` is what an adapter
or a checkpoint stores to rebuild the task without its files.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.data.encoding import Encoded, Examples, encode_cached
from jaxpeft.models.heads import Head


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class of every task kind (see the module docstring).

    Attributes:
        name: the task's name (``sst2``, ``ner``, or your file's stem).
        label_names: the class names in label-id order; ``None`` for regression and span tasks.
        main_metric: the metric that ranks checkpoints.
        eval_splits: the splits evaluated during training.
    """

    name: str
    label_names: tuple[str, ...] | None
    main_metric: str
    eval_splits: tuple[str, ...] = ("dev",)

    #: ``sequence``, ``token`` or ``span``
    kind: ClassVar[str] = "sequence"
    #: peft's ``task_type`` of this kind's adapters
    peft_task_type: ClassVar[str] = "SEQ_CLS"

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_regression(self) -> bool:
        return self.kind == "sequence" and self.label_names is None

    def head(self, pooling: str = "cls") -> Head:
        return Head(self.kind, self.num_labels if self.kind != "span" else 2, pooling if self.kind == "sequence" else "cls")

    # -- data ---------------------------------------------------------------------------------------
    def read(self, split: str) -> Any:
        """The raw examples of ``split`` (``train``, ``dev``, ...)."""
        raise NotImplementedError

    def encode(self, tokenizer: Any, raw: Any, max_length: int) -> Encoded:
        raise NotImplementedError

    @staticmethod
    def size(raw: Any) -> int:
        return len(raw)

    @staticmethod
    def take(raw: Any, n: int) -> Any:
        return raw.take(n)

    @staticmethod
    def labelled(raw: Any) -> bool:
        return getattr(raw, "labels", None) is not None

    # -- training -----------------------------------------------------------------------------------
    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        raise NotImplementedError

    # -- results ------------------------------------------------------------------------------------
    def evaluate(self, outputs: np.ndarray, encoded: Encoded, raw: Any) -> dict[str, float]:
        raise NotImplementedError

    def predictions(self, outputs: np.ndarray, encoded: Encoded, raw: Any) -> list[dict[str, Any]]:
        """One JSON-able prediction per example, in order."""
        raise NotImplementedError

    def warm_modules(self) -> tuple[str, ...]:
        """Modules :meth:`evaluate` imports on first use; a run imports them in the background while
        XLA compiles (:func:`jaxpeft.runtime.prewarm`), so its first evaluation does not wait for them."""
        return ()

    def record(self) -> dict[str, Any]:
        """What rebuilds the task without its files (:func:`jaxpeft.tasks.from_record`)."""
        return {"task": self.name, "task_kind": self.kind, "num_labels": self.num_labels,
                "label_names": None if self.label_names is None else list(self.label_names),
                "main_metric": self.main_metric}


def weighted_mean(per: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def sequence_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array, regression: bool) -> jax.Array:
    """Weighted mean over examples: cross-entropy, or MSE for regression. ``logits`` ``[..., C]``,
    ``labels`` and ``weights`` ``[...]``."""
    if regression:
        per = (logits[..., 0] - labels.astype(jnp.float32)) ** 2
    else:
        per = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return weighted_mean(per, weights)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class SequenceTask(Task):
    """One label (or value) per example; the examples are one text or a pair of texts.

    Subclasses say where the examples come from (:meth:`read`); metrics are :attr:`metrics` by
    name (see :mod:`jaxpeft.tasks.metrics`).
    """

    metrics: tuple[str, ...] = ("accuracy",)
    num_texts: int = 1

    kind: ClassVar[str] = "sequence"
    peft_task_type: ClassVar[str] = "SEQ_CLS"

    def encode(self, tokenizer: Any, raw: Examples, max_length: int) -> Encoded:
        return encode_cached(tokenizer, raw, max_length)

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        return sequence_loss(outputs, batch["labels"], batch["weights"], self.is_regression)

    def values(self, outputs: np.ndarray) -> np.ndarray:
        """Class ids, or the predicted values for regression."""
        return outputs[:, 0] if self.is_regression else outputs.argmax(-1)

    def evaluate(self, outputs: np.ndarray, encoded: Encoded, raw: Any) -> dict[str, float]:
        from jaxpeft.tasks import metrics

        return metrics.compute_named(self.metrics, self.values(outputs), encoded.labels, self.num_labels)

    def predictions(self, outputs: np.ndarray, encoded: Encoded, raw: Any) -> list[dict[str, Any]]:
        if self.is_regression:
            return [{"prediction": float(v)} for v in outputs[:, 0]]
        probs = softmax(outputs.astype(np.float64))
        names = self.label_names
        return [{"prediction": names[int(i)], "scores": {n: float(p) for n, p in zip(names, row)}}
                for i, row in zip(probs.argmax(-1), probs)]

    def record(self) -> dict[str, Any]:
        return {**super().record(), "num_texts": self.num_texts, "metrics": list(self.metrics)}


def from_record(record: Mapping[str, Any]) -> SequenceTask | None:
    """A sequence task rebuilt from an adapter's record (its files are not needed to predict)."""
    if (record.get("task_kind") or "sequence") != "sequence" or record.get("label_names", 0) == 0:
        return None
    names = record.get("label_names")
    return SequenceTask(str(record["task"]), None if names is None else tuple(names),
                        str(record.get("main_metric") or ("pearson" if names is None else "accuracy")),
                        metrics=tuple(record.get("metrics") or (("pearson", "spearman") if names is None
                                                               else ("accuracy",))),
                        num_texts=int(record.get("num_texts") or 1))


def text_columns_help(names: Sequence[str]) -> str:
    return ", ".join(names)
