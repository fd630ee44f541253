"""The PyTorch peer of ``jaxpeft-serve``: the same HTTP server and batching over transformers + peft.

    python benchmarks/serve_peer.py --adapters_dir=adapters/ --model=minilm --port=8001

A baseline for ``benchmarks/serve_bench.py``. It serves ``POST /v1/predict`` (and the rest of the
API) with the same Starlette app, the same batcher and the same flags as ``jaxpeft-serve``
(:mod:`jaxpeft.serving.cli`): only the engine differs. :class:`PeerEngine` holds ONE
``peft.PeftModel`` over a ``*ForSequenceClassification`` model with every LoRA adapter loaded into
it (``load_adapter``), and predicts a batch that mixes adapters in one forward pass with peft's
``adapter_names=`` (peft routes each row's LoRA deltas and classifier head to its own adapter; it
supports that for LoRA at inference); a batch of one adapter takes peft's plain path (that
adapter made active). Rows are tokenized by the model's tokenizer, truncated to
the longest bucket and padded to their bucket, as the jaxpeft engine does; the answers have the
jaxpeft engine's shape (``{"label", "scores"}``).

The adapters are jaxpeft's LoRA folders (peft's format: peft loads them as they are) of sequence
classification tasks; their label names come from ``adapter_config.json``.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from jaxpeft.errors import UserError
from jaxpeft.serving.engine import InputError, Row, TooLarge, UnknownAdapter


class PeerEngine:
    """The :class:`~jaxpeft.serving.engine.Engine` protocol over one ``peft.PeftModel``."""

    def __init__(self, model: str, *, max_batch: int = 16, buckets: Sequence[int] = (16, 32, 64, 128),
                 max_adapters_per_family: int = 1024, threads: int | None = None):
        from transformers import AutoTokenizer

        from jaxpeft.models import hf_weights

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = hf_weights.resolve_model_dir(model)
        self.max_batch, self.buckets = max_batch, tuple(sorted(buckets))
        self.max_adapters_per_family = max_adapters_per_family
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.peft_model: Any = None
        self.num_labels: int | None = None
        self._table: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def adapters(self) -> list[dict[str, Any]]:
        return [dict(a) for a in self._table.values()]

    def add(self, name: str, directory: str) -> dict[str, Any]:
        import peft
        from transformers import AutoModelForSequenceClassification

        cfg_path = Path(directory) / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"adapter {name}: {cfg_path} cannot be read ({e})") from None
        record = cfg.get("jaxpeft", {})
        if cfg.get("peft_type") != "LORA" or record.get("task_kind", "sequence") != "sequence":
            raise UserError(f"adapter {name}: the peer serves LoRA sequence-classification adapters")
        labels = list(record.get("label_names") or ["value"])
        if self.num_labels is None:
            self.num_labels = len(labels)
        elif len(labels) != self.num_labels:
            raise UserError(f"adapter {name}: {len(labels)} labels; the peer's model has {self.num_labels}")
        if self.peft_model is None:
            base = AutoModelForSequenceClassification.from_pretrained(str(self.model_dir), num_labels=len(labels))
            self.peft_model = peft.PeftModel.from_pretrained(base, directory, adapter_name=name).eval()
        else:
            self.peft_model.load_adapter(directory, adapter_name=name)
        info = {"name": name, "method": "lora", "task": "sequence", "labels": labels, "family": "lora",
                "path": str(directory)}
        with self._lock:
            self._table = {**self._table, name: info}
        return dict(info)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._table:
                raise UnknownAdapter(f"no adapter named {name}")
            self._table = {k: v for k, v in self._table.items() if k != name}
        self.peft_model.delete_adapter(name)

    def prepare(self, adapter: str, inputs: list[Any]) -> list[Row]:
        if adapter not in self._table:
            raise UnknownAdapter(f"no adapter named {adapter}")
        rows = []
        for i, x in enumerate(inputs):
            parts = [x] if isinstance(x, str) else x if isinstance(x, list) and len(x) == 2 else None
            if parts is None or not all(isinstance(p, str) for p in parts):
                raise InputError(f"inputs[{i}]: {adapter} classifies a text or a [text, text] pair")
            if sum(map(len, parts)) > 100_000:
                raise TooLarge(f"inputs[{i}]: more than 100000 characters")
            enc = self.tokenizer(*parts, truncation=True, max_length=self.buckets[-1], return_token_type_ids=True)
            n = len(enc["input_ids"])
            rows.append(Row(adapter, next(b for b in self.buckets if b >= n),
                            (enc["input_ids"], enc["token_type_ids"])))
        return rows

    def run(self, rows: list[Row]) -> list[dict[str, Any]]:
        length, pad = rows[0].length, self.tokenizer.pad_token_id or 0
        ids = np.full((len(rows), length), pad, np.int64)
        types = np.zeros((len(rows), length), np.int64)
        mask = np.zeros((len(rows), length), np.int64)
        for i, r in enumerate(rows):
            row_ids, row_types = r.data
            ids[i, :len(row_ids)], types[i, :len(row_ids)], mask[i, :len(row_ids)] = row_ids, row_types, 1
        names = [r.adapter for r in rows]
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
                  "token_type_ids": torch.from_numpy(types)}
        with torch.inference_mode():
            if len(set(names)) == 1:   # one adapter: peft's plain path (no per-adapter split)
                self.peft_model.set_adapter(names[0])
                logits = self.peft_model(**inputs).logits
            else:
                logits = self.peft_model(**inputs, adapter_names=names).logits
        probs = torch.softmax(logits.double(), -1).numpy()
        out = []
        for r, p in zip(rows, probs):
            labels = self._table[r.adapter]["labels"]
            scores = {n: float(v) for n, v in zip(labels, p)}
            out.append({"label": labels[int(p.argmax())], "scores": scores})
        return out


def factory(*, model: str | None = None, compute: str | None = None, max_batch: int | None = None,
            buckets: Sequence[int] | None = None, max_adapters_per_family: int | None = None, **_: Any) -> PeerEngine:
    """``factory(model=, max_batch=, buckets=)`` as ``jaxpeft-serve`` calls it (``--compute`` and
    the jaxpeft engine's other flags are ignored: PyTorch on the CPU in float32)."""
    if not model:
        raise UserError("the peer needs --model (the base model of the adapters)")
    given = {"max_batch": max_batch, "buckets": buckets, "max_adapters_per_family": max_adapters_per_family}
    return PeerEngine(model, **{k: v for k, v in given.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> int:
    from jaxpeft.serving import cli

    return cli.main(argv, engine_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
