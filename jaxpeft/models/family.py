"""The model-family plug-in point: what jaxpeft knows about one encoder architecture.

A family (:class:`Family`) is declared once, in its own module (``jaxpeft/models/bert.py`` ...), and
registered by the ``model_type`` values of ``config.json`` it reads. It says:

* the architecture: a config dataclass read from ``config.json`` and the encoder module
  (``encoder(config, compute, hooks)``, see :mod:`jaxpeft.models.layers` for the hooks every dense
  layer takes), plus its own sequence-classification head (transformers' head of that family, so
  peft moves heads between the two);
* the names: the encoder's parameter paths are transformers' module names (``bert/encoder/layer_3/
  attention/self/query/kernel`` is ``bert.encoder.layer.3.attention.self.query.weight``), so
  :func:`hf_name` and :func:`param_path` convert checkpoints and peft tensors for every family
  by one rule;
* BitFit's bias terms by name (``query``, ``intermediate``, ...) where the family has biases;
* peft's default ``target_modules`` for LoRA and IA3 on that architecture (peft's own constants).

Adding a family is one module that declares these, registered in :mod:`jaxpeft.models`, plus a
parity test against transformers (``tests/test_families.py``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Family:
    """One encoder architecture (see the module docstring).

    Attributes:
        name: the family's name (``bert``).
        model_types: ``config.json`` ``model_type`` values it reads.
        prefix: the encoder's parameter root, transformers' attribute name in its classifiers
            (``bert``, ``roberta``, ``model``).
        config: the config dataclass; ``config.from_hf(dict)`` reads ``config.json``.
        encoder: the encoder module class, ``encoder(config, compute, hooks, name=prefix)``.
        sequence_head: transformers' sequence-classification head of the family, a function
            ``sequence_head(config, num_labels, compute, pooling, read, pooled, deterministic)``
            that builds its modules in the caller's scope (``classifier/...`` at the top) and
            returns the logits; ``read`` is the vector the pooling read, ``pooled`` the
            encoder's pooler output (where the family has one).
        word_embeddings: the path of the word-embedding table (prompt initialisation reads it).
        pooler_in_encoder: whether the encoder holds the pooler the head reads (BERT's).
        head_modules: the head's top-level modules (peft's ``modules_to_save`` names).
        bitfit_terms: BitFit term name -> regex of the bias paths it covers (empty: no biases).
        lora_targets, ia3_targets, ia3_feedforward: peft's defaults for this architecture.
        position_scheme: how the input is numbered (``absolute``, ``absolute_offset`` (RoBERTa:
            past the padding id), ``relative``, ``rotary``); prompts respect it.
        packing: whether packed rows (several examples per row) are supported.
        check_compute: raises ``ValueError`` where a compute spec cannot run the architecture.
        pair_types: whether the family's tokenizers mark a pair's second sentence with token type
            1 (``[CLS] a [SEP] b [SEP]``), which cosine pooling splits pairs by; RoBERTa's
            ``<s> a </s></s> b </s>`` has type 0 throughout, so cosine pooling is refused there.
        token_head: transformers' per-token heads of the family where they are not BERT's
            (``classifier`` / ``qa_outputs`` straight on the hidden states): a function
            ``token_head(config, kind, num_outputs, compute, hidden, deterministic)`` (``kind``:
            ``token`` or ``span``) that builds its modules in the caller's scope and returns
            ``[B, L, num_outputs]``; ``None``: BERT's.
        token_head_modules: the top-level modules of those heads by kind (with ``token_head``).
    """

    name: str
    model_types: tuple[str, ...]
    prefix: str
    config: type
    encoder: type[nn.Module]
    sequence_head: Callable[..., Any]
    word_embeddings: str = ""
    pooler_in_encoder: bool = False
    head_modules: tuple[str, ...] = ("classifier",)
    bitfit_terms: Mapping[str, str] = dataclasses.field(default_factory=dict)
    lora_targets: tuple[str, ...] = ("query", "value")
    ia3_targets: tuple[str, ...] = ("key", "value", "output.dense")
    ia3_feedforward: tuple[str, ...] = ("output.dense",)
    position_scheme: str = "absolute"
    packing: bool = True
    #: ``check_compute(config, compute)`` raises ``ValueError`` where a compute spec cannot run it
    check_compute: Callable[[Any, Any], None] | None = None
    pair_types: bool = True
    token_head: Callable[..., Any] | None = None
    token_head_modules: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:   # the Mapping field is not hashable; a family is one per name
        return hash(self.name)

    def __repr__(self) -> str:   # stable across processes (program keys hash a module's repr)
        return f"Family({self.name!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Family) and other.name == self.name


# ----------------------------------------------------------------------------- names


def hf_name(path: str) -> tuple[str, bool]:
    """Our parameter path -> ``(transformers' tensor name, transpose?)``, for every family:
    ``bert/encoder/layer_3/attention/self/query/kernel`` ->
    ``('bert.encoder.layer.3.attention.self.query.weight', True)``; LayerNorm ``scale`` and
    embedding tables are ``weight`` too (not transposed)."""
    parts = path.split("/")
    leaf = parts[-1]
    transpose = leaf == "kernel"
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts[:-1] + [leaf])
    return re.sub(r"(^|\.)(layers?)_(\d+)(?=\.)", r"\1\2.\3", name), transpose


#: Old spellings in some checkpoints (TensorFlow-converted BERT): LayerNorm ``gamma``/``beta``.
LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}


def name_table(paths: list[str]) -> dict[str, tuple[str, bool]]:
    """``{transformers' tensor name: (our path, transpose?)}`` for the paths of a params tree."""
    return {hf_name(p)[0]: (p, hf_name(p)[1]) for p in paths}


def canonical_name(name: str) -> str:
    """A checkpoint tensor name in today's spelling (``LayerNorm.gamma`` -> ``LayerNorm.weight``)."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.{LEGACY_LEAVES[leaf]}" if leaf in LEGACY_LEAVES else name
