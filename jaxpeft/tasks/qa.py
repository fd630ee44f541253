"""Extractive question answering: an answer span in a context (SQuAD v1.1's format).

* ``--task=squad``: ``--data_dir`` holds ``dev-v1.1.json`` (and, where there is one,
  ``train-v1.1.json[.gz]``). Without a train file the dev set is split by article, no article on
  both sides: the first 38 articles (8,582 questions) train, the last 10 (1,988) evaluate -- the
  run says so, and its scores are then not comparable with published dev-set numbers.
* your own: ``--task=NAME --task_type=qa --train_file=... --validation_file=...`` in SQuAD JSON.

Questions and contexts are cut into windows of ``max_seq_length`` tokens with ``--doc_stride``
tokens of overlap, as transformers' ``run_qa.py`` does; the head (``qa_outputs``) gives start and
end logits per token; answers are decoded over each question's windows as the ``n_best`` spans of
at most ``max_answer_length`` tokens, mapped back to character offsets in the context
(:mod:`jaxpeft.tasks.squad`). Exact match and F1 are the official v1.1 script's
(:mod:`jaxpeft.tasks.squad_metric`).
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

from jaxpeft.data.encoding import Encoded
from jaxpeft.errors import UserError
from jaxpeft.tasks import squad, squad_metric
from jaxpeft.tasks.base import Task, weighted_mean

N_BEST = 20
MAX_ANSWER_LENGTH = 30


@dataclasses.dataclass(frozen=True)
class ExtractiveQA(Task):
    """Answer spans (see the module docstring)."""

    doc_stride: int = 128
    splits: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)
    note: str = ""

    kind = "span"
    peft_task_type = "QUESTION_ANS"

    def read(self, split: str) -> squad.SquadData:
        if split not in self.splits:
            raise UserError(f"task {self.name}: no {split} split")
        value = self.splits[split]
        return squad.read_squad(value) if isinstance(value, (str, Path)) else value

    @staticmethod
    def take(raw: squad.SquadData, n: int) -> squad.SquadData:
        return squad.SquadData(raw.examples[:n], raw.num_articles, raw.source)

    @staticmethod
    def labelled(raw: squad.SquadData) -> bool:
        return all(e.answers for e in raw.examples)

    def encode(self, tokenizer: Any, raw: squad.SquadData, max_length: int) -> Encoded:
        stride = min(self.doc_stride, max_length // 2)
        f = squad.prepare_features(tokenizer, raw, max_length, stride)
        return Encoded(f.input_ids, f.token_type_ids, f.lengths, None,
                       extra={"start_positions": f.start_positions, "end_positions": f.end_positions},
                       host={"features": f})

    @staticmethod
    def labelled_encoded(encoded: Encoded) -> bool:
        return "start_positions" in encoded.extra

    def loss(self, outputs: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """The mean of the start and end positions' cross-entropy over each window's real tokens.

        Packed rows (``segment_ids``; ``start_positions`` ``[R, K]``, in each slot's own positions):
        each slot's softmax runs over its own tokens, its positions shifted by its offset."""
        if "segment_ids" in batch:
            k = batch["start_positions"].shape[1]
            own = batch["segment_ids"][:, None, :] == jnp.arange(1, k + 1)[None, :, None]   # [R, K, T]
            logits = jnp.where(own[..., None], outputs[:, None], -1e9)                        # [R, K, T, 2]
            offset = batch["read_positions"]
        else:
            real = jnp.arange(outputs.shape[1])[None, :] < batch["attention_mask"].sum(-1, keepdims=True)
            logits = jnp.where(real[..., None], outputs, -1e9)
            offset = 0
        start = optax.softmax_cross_entropy_with_integer_labels(logits[..., 0], batch["start_positions"] + offset)
        end = optax.softmax_cross_entropy_with_integer_labels(logits[..., 1], batch["end_positions"] + offset)
        return weighted_mean((start + end) / 2, batch["weights"])

    def answers(self, outputs: np.ndarray, encoded: Encoded, raw: squad.SquadData
                ) -> tuple[dict[str, str], dict[str, list[dict[str, Any]]]]:
        return squad.postprocess_predictions(raw, encoded.host["features"], outputs[..., 0], outputs[..., 1],
                                             N_BEST, MAX_ANSWER_LENGTH)

    def evaluate(self, outputs: np.ndarray, encoded: Encoded, raw: squad.SquadData) -> dict[str, float]:
        answers, _ = self.answers(outputs, encoded, raw)
        scores = squad_metric.squad_scores(raw, answers)
        return {"f1": float(scores["f1"]), "exact_match": float(scores["exact_match"])}

    def predictions(self, outputs: np.ndarray, encoded: Encoded, raw: squad.SquadData) -> list[dict[str, Any]]:
        _, nbest = self.answers(outputs, encoded, raw)
        out = []
        for e in raw.examples:
            best = nbest[e.id][0]
            out.append({"id": e.id, "answer": best["text"], "score": best["score"],
                        "probability": best["probability"],
                        "n_best": [{"text": b["text"], "probability": b["probability"]} for b in nbest[e.id][:5]]})
        return out

    def read_input(self, path: str | Path, recorded: Any = None) -> squad.SquadData:
        return squad.read_squad(path, require_answers=False)

    def lines_input(self, lines: Sequence[str]) -> squad.SquadData:
        """One question per line: ``question<TAB>context``."""
        examples = []
        for i, line in enumerate(lines, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            q, sep, c = line.partition("\t")
            if not sep:
                raise UserError(f"line {i}: a question and its context separated by a tab")
            examples.append(squad.QAExample(f"q{i}", q, c, (), (), 0, ""))
        if not examples:
            raise UserError("no question to answer")
        return squad.SquadData(examples, 1, "<text>")

    def record(self) -> dict[str, Any]:
        return {**super().record(), "doc_stride": self.doc_stride}


def squad_task(data: Any, seed: int = 0) -> ExtractiveQA:
    """SQuAD v1.1 from ``--data_dir`` (``$SQUAD_DIR``): its train file, else the dev set split by article."""
    d = getattr(data, "data_dir", None) or os.environ.get("SQUAD_DIR")
    if not d:
        raise UserError("--task=squad reads the offline copy: give --data_dir (or SQUAD_DIR) with dev-v1.1.json")
    dev = Path(d).expanduser() / "dev-v1.1.json"
    if not dev.is_file():
        raise UserError(f"--task=squad: {dev} not found")
    train, evals, note = squad.train_and_eval(dev)
    return ExtractiveQA("squad", None, "f1", ("dev",), doc_stride=getattr(data, "doc_stride", 128),
                        splits={"train": train, "dev": evals}, note=note)


def from_files(name: str, data: Any) -> ExtractiveQA:
    """Your own SQuAD-format files (``--train_file``, ``--validation_file``)."""
    if not data.validation_file:
        raise UserError("--task_type=qa: give --validation_file (SQuAD JSON)")
    splits = {"train": squad.read_squad(data.train_file), "dev": squad.read_squad(data.validation_file)}
    return ExtractiveQA(name, None, "f1", ("dev",), doc_stride=getattr(data, "doc_stride", 128), splits=splits)


def from_record(record: Mapping[str, Any]) -> ExtractiveQA:
    return ExtractiveQA(str(record["task"]), None, "f1", doc_stride=int(record.get("doc_stride") or 128))
