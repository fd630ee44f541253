"""The whole model of a run: a family's encoder, the method's hooks and prompt, and the task's head.

:class:`TaskModel` is the one module every run, prediction and benchmark applies. Its parts come
from the three plug-in points: the **family** (the encoder and its sequence-classification head),
the **method** (:class:`~jaxpeft.models.layers.Hooks` inside the encoder, a prompt module whose
params live under ``prompt/``) and the **task** (:class:`Head`: what is read out and how many
outputs). Heads, by kind:

* ``sequence``: one output row per example -- the family's own head (transformers' classifier of
  that family) on ``[CLS]`` (``pooling="cls"``), on the mean of the last layer (``mean``), or a
  one-input dense layer on the cosine of a pair's two sentences encoded apart (``cosine``);
  logits ``[B, C]`` (packed rows: ``[B, K, C]``, one per example at ``read_positions``);
* ``token``: ``classifier`` on every real token (transformers' ``*ForTokenClassification``):
  ``[B, L, C]``, virtual tokens left out, so position ``i`` is input token ``i``;
* ``span``: ``qa_outputs`` (two outputs: start and end) on every real token
  (``*ForQuestionAnswering``): ``[B, L, 2]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft.compute import EXACT, Compute
from jaxpeft.errors import UserError
from jaxpeft.models import layers
from jaxpeft.models.family import Family
from jaxpeft.models.layers import NO_HOOKS, NO_PROMPT, Hooks

Array = jax.Array

KINDS = ("sequence", "token", "span")
POOLINGS = ("cls", "mean", "cosine")
#: The top-level module of each head kind that is not the family's (peft's ``modules_to_save``).
HEAD_MODULES = {"token": ("classifier",), "span": ("qa_outputs",)}


@dataclasses.dataclass(frozen=True)
class Head:
    """What the task reads out: ``kind`` (``sequence``, ``token``, ``span``), ``num_labels`` outputs
    (1: regression), and for sequences how the encoder is read (``pooling``)."""

    kind: str = "sequence"
    num_labels: int = 2
    pooling: str = "cls"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")


def head_modules(family: Family, head: Head) -> tuple[str, ...]:
    """The head's top-level modules (they train under every method)."""
    if head.kind == "sequence":
        return family.head_modules
    return tuple(family.token_head_modules.get(head.kind, HEAD_MODULES[head.kind]))


class TaskModel(nn.Module):
    """Encoder + method + head (see the module docstring).

    ``prompt``: the method's module called as ``prompt(batch_size, deterministic=...) -> Prompt``
    (named ``prompt``), or ``None``.
    """

    family: Family
    config: Any
    head: Head = Head()
    compute: Compute = EXACT
    hooks: Hooks = NO_HOOKS
    prompt: nn.Module | None = None

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None,
                 token_type_ids: Array | None = None, *, deterministic: bool = True,
                 position_ids: Array | None = None, segment_ids: Array | None = None,
                 read_positions: Array | None = None) -> Array:
        head, b = self.head, input_ids.shape[0]
        pooling = head.pooling if head.kind == "sequence" else "mean"
        if pooling == "cosine":
            if not self.family.pair_types:
                raise UserError(f"cosine pooling splits a pair by its token types, which {self.family.name}'s pairs "
                                "do not have: use --pooling=cls or --pooling=mean")
            if segment_ids is not None or position_ids is not None:
                raise ValueError("cosine pooling reads unpacked pair rows (no segment_ids or position_ids)")
            if token_type_ids is None:
                raise ValueError("cosine pooling needs the pair's token_type_ids")
            input_ids, attention_mask = layers.split_pair(input_ids, attention_mask, token_type_ids)
            token_type_ids = jnp.zeros_like(input_ids)
        prompt = NO_PROMPT if self.prompt is None else self.prompt(input_ids.shape[0], deterministic=deterministic)
        encoder = self.family.encoder(self.config, self.compute, self.hooks, name=self.family.prefix)
        kw = dict(deterministic=deterministic, prompt=prompt, segment_ids=segment_ids)
        if head.kind != "sequence":
            out = encoder(input_ids, attention_mask, token_type_ids, position_ids, **kw)
            hidden = layers.remove_virtual(out.hidden, prompt.num_virtual, prompt.front)
            if self.family.token_head is not None:   # the family's own (ModernBERT's: head + classifier)
                n = head.num_labels if head.kind == "token" else 2
                return self.family.token_head(self.config, head.kind, n, self.compute, hidden,
                                              deterministic).astype(jnp.float32)
            init = nn.initializers.normal(getattr(self.config, "initializer_range", 0.02))
            dt = jnp.dtype(self.compute.dtype)
            if head.kind == "token":
                hidden = layers.dropout(self.compute, _classifier_dropout(self.config))(hidden, deterministic)
                logits = nn.Dense(head.num_labels, dtype=dt, param_dtype=jnp.float32, kernel_init=init,
                                  name="classifier")(hidden)
            else:
                logits = nn.Dense(2, dtype=dt, param_dtype=jnp.float32, kernel_init=init, name="qa_outputs")(hidden)
            return logits.astype(jnp.float32)
        rows = read_positions if read_positions is not None else jnp.zeros((input_ids.shape[0], 1), jnp.int32)
        cls_only = self.compute.cls_only_last_layer and pooling == "cls"
        pool = self.family.pooler_in_encoder and pooling == "cls"
        out = encoder(input_ids, attention_mask, token_type_ids, position_ids, pool_rows=rows if pool else None,
                      last_rows=rows if cls_only else None, **kw)
        if pooling == "cls":
            read = out.hidden if cls_only else layers.gather_rows(out.hidden, rows)
        else:
            if cls_only:
                raise ValueError("mean pooling reads every row of the last layer")
            read = layers.mean_pool(out.hidden, out.valid, segment_ids, read_positions)
            if read_positions is None:
                read = read[:, None]
            if pooling == "mean":
                read = read.astype(out.hidden.dtype)
        pooled = out.pooled
        if read_positions is None:
            read = read[:, 0]
            pooled = None if pooled is None else pooled[:, 0]
        if pooling == "cosine":
            feature = layers.cosine(read[:b], read[b:])[:, None]
            logits = nn.Dense(head.num_labels, dtype=jnp.float32, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(self.config.initializer_range),
                              name="classifier")(feature)
        else:
            logits = self.family.sequence_head(self.config, head.num_labels, self.compute, pooling, read, pooled,
                                               deterministic)
        return logits.astype(jnp.float32)


def _classifier_dropout(config: Any) -> float:
    rate = getattr(config, "classifier_dropout", None)
    return getattr(config, "hidden_dropout_prob", 0.0) if rate is None else rate


def dummy_inputs(batch: int = 1, length: int = 8) -> dict[str, Array]:
    ids = jnp.zeros((batch, length), jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "token_type_ids": ids}
