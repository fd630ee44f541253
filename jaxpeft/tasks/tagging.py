"""Token classification: one tag per word (part-of-speech tagging, named entities, your own tags).

* ``--task=pos``: UD English EWT, universal POS tags, token accuracy (``--data_dir`` holds
  ``UD_English-EWT/``, the offline copy's layout; multiword-token ranges and empty nodes skipped);
* ``--task=ner``: CoNLL-2003 English, entity-level F1 as ``seqeval`` scores it, on the files' IOB1
  tags (``--data_dir`` holds ``eng.train``, ``eng.testa``, ``eng.testb``);
* your own: ``--task=NAME --task_type=tagging --train_file=...`` in CoNLL columns (token first,
  tag last, a blank line between sentences) or JSON / JSON Lines ``{"tokens": [...], "tags": [...]}``.

Words are split into sub-words by the model's tokenizer; the tag sits on each word's first
sub-word and the others are ignored (transformers' ``run_ner.py``); a sentence longer than a row
is cut into windows of whole words, each word scored once; predictions are read back per word
(:mod:`jaxpeft.tasks.token_align`). The head is a ``classifier`` on every real token; virtual tokens
of prompt methods are never labelled.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpeft.data.encoding import IGNORE, Encoded
from jaxpeft.errors import UserError
from jaxpeft.tasks import conll, token_align
from jaxpeft.tasks.base import Task

#: words of overlap between consecutive windows of a long sentence
STRIDE = 16


@dataclasses.dataclass(frozen=True)
class Tagging(Task):
    """One tag per word (see the module docstring)."""

    metric: str = "accuracy"          # accuracy (token accuracy) or seqeval (entity precision/recall/F1)
    paths: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    reader: str = "conll"             # conllu, conll2003, conll, json (the split files' format)

    kind = "token"
    peft_task_type = "TOKEN_CLS"

    def read(self, split: str) -> conll.TaggedSentences:
        path = self.paths.get(split)
        if path is None:
            raise UserError(f"task {self.name}: no {split} split (give --{'validation' if split == 'dev' else split}_file)")
        return read_tagged(path, self.reader, self.label_names)

    @staticmethod
    def take(raw: conll.TaggedSentences, n: int) -> conll.TaggedSentences:
        return conll.TaggedSentences(raw.tokens[:n], None if raw.tags is None else raw.tags[:n], raw.source,
                                     raw.lines[:n])

    @staticmethod
    def labelled(raw: conll.TaggedSentences) -> bool:
        return raw.tags is not None

    def encode(self, tokenizer: Any, raw: conll.TaggedSentences, max_length: int) -> Encoded:
        f = token_align.encode_tagged(tokenizer, raw, self.label_names, max_length, STRIDE, long_words="truncate")
        labels = f.labels if f.labels is not None else np.full(f.input_ids.shape, IGNORE, np.int32)
        return Encoded(f.input_ids, f.token_type_ids, f.lengths, labels, host={"features": f})

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """Mean cross-entropy over the labelled tokens of the batch."""
        labels = batch["labels"]
        scored = labels != IGNORE
        per = optax.softmax_cross_entropy_with_integer_labels(outputs, jnp.where(scored, labels, 0))
        return jnp.sum(per * scored) / jnp.maximum(jnp.sum(scored), 1)

    def tags(self, outputs: np.ndarray, encoded: Encoded) -> list[list[str]]:
        return token_align.decode(outputs.argmax(-1), encoded.host["features"])

    def warm_modules(self) -> tuple[str, ...]:
        # seqeval imports scikit-learn; pos_accuracy is scikit-learn's accuracy_score
        return ("seqeval.metrics",) if self.metric == "seqeval" else ("sklearn.metrics",)

    def evaluate(self, outputs: np.ndarray, encoded: Encoded, raw: conll.TaggedSentences) -> dict[str, float]:
        pred = self.tags(outputs, encoded)
        if self.metric == "seqeval":
            s = conll.ner_scores(raw.tags, pred, gold_entities=raw.entities)
            return {"f1": float(s["f1"]), "precision": float(s["precision"]), "recall": float(s["recall"]),
                    "accuracy": float(s["accuracy"])}
        return {"accuracy": conll.pos_accuracy(raw.tags, pred)}

    def predictions(self, outputs: np.ndarray, encoded: Encoded, raw: conll.TaggedSentences) -> list[dict[str, Any]]:
        return [{"tokens": list(words), "tags": tags} for words, tags in zip(raw.tokens, self.tags(outputs, encoded))]

    def read_input(self, path: str | Path, recorded: Any = None) -> conll.TaggedSentences:
        return conll.read_tagged(path, self.label_names)

    def lines_input(self, lines: Sequence[str]) -> conll.TaggedSentences:
        """One sentence per line, its tokens separated by spaces."""
        tokens = [line.split() for line in lines if line.strip()]
        if not tokens:
            raise UserError("no sentence to tag")
        return conll.TaggedSentences(tokens, None, "<text>", [0] * len(tokens))

    def record(self) -> dict[str, Any]:
        return {**super().record(), "tag_metric": self.metric}


def read_tagged(path: str | Path, reader: str, label_names: Sequence[str] | None) -> conll.TaggedSentences:
    if reader == "conllu":
        return conll.read_conllu(path, "upos", label_names)
    if reader == "conll2003":
        return conll.read_conll2003(path, "ner", label_names)
    return conll.read_tagged(path, label_names)


# ----------------------------------------------------------------------------- the tasks


def _folder(data_dir: str | None, env: str, task: str, hint: str) -> Path:
    d = data_dir or os.environ.get(env)
    if not d:
        raise UserError(f"--task={task} reads the offline copy: give --data_dir (or {env}) with {hint}")
    p = Path(d).expanduser()
    if not p.is_dir():
        raise UserError(f"--data_dir={d}: not a folder")
    return p


def pos(data: Any) -> Tagging:
    """UD English EWT, universal POS tags (``--data_dir`` of the offline copy, ``$UD_EWT_DIR``)."""
    d = _folder(getattr(data, "data_dir", None), "UD_EWT_DIR", "pos", "UD_English-EWT/en_ewt-ud-*.conllu")
    d = d / "UD_English-EWT" if (d / "UD_English-EWT").is_dir() else d
    paths = {s: d / f"en_ewt-ud-{f}.conllu" for s, f in (("train", "train"), ("dev", "dev"), ("test", "test"))}
    if not paths["train"].is_file():
        raise UserError(f"--task=pos: {paths['train']} not found")
    train = conll.read_conllu(paths["train"], "upos")
    return Tagging("pos", conll.tag_names(train), "accuracy", ("dev",), metric="accuracy",
                   paths={k: str(v) for k, v in paths.items()}, reader="conllu")


def ner(data: Any) -> Tagging:
    """CoNLL-2003 English named entities (``--data_dir`` of the offline copy, ``$CONLL2003_DIR``)."""
    d = _folder(getattr(data, "data_dir", None), "CONLL2003_DIR", "ner", "eng.train, eng.testa, eng.testb")
    paths = {"train": d / "eng.train", "dev": d / "eng.testa", "test": d / "eng.testb"}
    if not paths["train"].is_file():
        raise UserError(f"--task=ner: {paths['train']} not found")
    train = conll.read_conll2003(paths["train"], "ner")
    return Tagging("ner", conll.tag_names(train), "f1", ("dev",), metric="seqeval",
                   paths={k: str(v) for k, v in paths.items()}, reader="conll2003")


def from_files(name: str, data: Any) -> Tagging:
    """Your own tagged files (``--train_file``, ``--validation_file``, ``--test_file``)."""
    paths = {"train": data.train_file}
    if not data.validation_file:
        raise UserError("--task_type=tagging: give --validation_file (a held-out part of sentences is not "
                        "drawn for tagging)")
    paths["dev"] = data.validation_file
    if data.test_file:
        paths["test"] = data.test_file
    train = conll.read_tagged(data.train_file)
    if train.tags is None:
        raise UserError(f"{data.train_file}: no tags")
    names = conll.tag_names(train)
    is_iob = all(t == "O" or t[:2] in ("B-", "I-") for t in names)
    return Tagging(name, names, "f1" if is_iob else "accuracy", ("dev",),
                   metric="seqeval" if is_iob else "accuracy", paths=dict(paths), reader="conll")


def from_record(record: Mapping[str, Any]) -> Tagging:
    names = tuple(record["label_names"])
    metric = record.get("tag_metric") or "accuracy"
    return Tagging(str(record["task"]), names, str(record.get("main_metric") or ("f1" if metric == "seqeval"
                                                                                    else "accuracy")),
                   metric=metric, reader="conll")
