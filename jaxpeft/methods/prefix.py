"""Per-layer key/value prefixes: Prefix Tuning (Li & Liang 2021) and P-tuning v2 (Liu et al. 2022).

Every self-attention layer gets ``num_virtual_tokens`` extra keys and values in front of its own
(see :class:`~jaxpeft.models.bert.BertSelfAttention`). Queries stay the real tokens, so the output
keeps the input's length, no position is used up, and the pooler reads the real ``[CLS]``. The
BERT encoder is frozen; the prefixes (and their projection MLP, if any) and the head train.

Two parameterisations:

* direct (P-tuning v2's default): ``prompt/prefix_keys`` and ``prompt/prefix_values``, each
  ``[layers, P, hidden]`` (hidden = heads x head_dim), initialised ``N(0, 1)`` like the
  ``nn.Embedding`` of the reference implementations;
* ``prefix_projection`` (Li & Liang's reparameterisation, ``--method=prefix``'s default): a
  ``[P, hidden]`` embedding ``prompt/prefix_projection/prefix_embeddings`` fed through
  ``Dense(E) -> tanh -> Dense(layers * 2 * hidden)``. The MLP only helps optimisation:
  :meth:`PrefixTuning.export_params` evaluates it once and returns the direct parameters, and
  :meth:`PrefixTuning.for_inference` is the direct form.

``prefix_dropout`` (P-tuning v2: 0.1) drops prefix entries independently per batch row in
training, as P-tuning v2 does on its ``past_key_values``.

The input keeps BERT's pretrained positions ``0..L-1`` by default. ``shift_positions`` numbers
them ``P..P+L-1`` instead, as if the prefix were ``P`` tokens of text in front of the input: that
is what transformers' BERT does with the prefixes peft (and P-tuning v2's reference code) hand it
as past key values, so a prefix trained there is read the same way here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import numpy as np

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import PROMPT_PATTERN, Method
from jaxpeft.methods.prompt import virtual_tokens
from jaxpeft.models.family import Family
from jaxpeft.models.layers import Prompt
from jaxpeft.options import in_range, option, positive

#: ``encoder_hidden_size`` of the projection MLP when none is given (Li & Liang's 512).
DEFAULT_PROJECTION_HIDDEN = 512


class PrefixProjection(nn.Module):
    """Li & Liang's reparameterisation: ``[layers, P, hidden]`` keys and values from an MLP.

    Attributes:
        num_virtual_tokens: P.
        hidden_size: the encoder's hidden size.
        num_layers: the encoder's number of layers.
        encoder_hidden_size: width E of the MLP.
    """

    num_virtual_tokens: int
    hidden_size: int
    num_layers: int
    encoder_hidden_size: int = DEFAULT_PROJECTION_HIDDEN

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        p, h, n = self.num_virtual_tokens, self.hidden_size, self.num_layers
        e = self.param("prefix_embeddings", nn.initializers.normal(1.0), (p, h), jnp.float32)
        x = jnp.tanh(nn.Dense(self.encoder_hidden_size, name="dense_in")(e))
        kv = nn.Dense(n * 2 * h, name="dense_out")(x).reshape(p, n, 2, h).transpose(2, 1, 0, 3)
        return kv[0], kv[1]

    @classmethod
    def from_params(cls, params: Any) -> "PrefixProjection":
        """The module whose params ``params`` (``prompt/prefix_projection``) are, by their shapes."""
        p, h = params["prefix_embeddings"].shape
        e, out = params["dense_out"]["kernel"].shape
        return cls(p, h, out // (2 * h), e)


class PrefixKV(nn.Module):
    """The prompt module: per-layer ``(key, value)`` prefixes for the encoder.

    Attributes:
        num_virtual_tokens: P.
        num_layers, num_heads, hidden_size: the encoder's shape.
        projection: produce the prefixes with :class:`PrefixProjection` instead of holding them.
        encoder_hidden_size: width of the projection MLP.
        dropout: dropout rate on the prefixes in training (per batch row).
        shift_positions: number the input's positions from P (see the module's docstring).
    """

    num_virtual_tokens: int
    num_layers: int
    num_heads: int
    hidden_size: int
    projection: bool = False
    encoder_hidden_size: int = DEFAULT_PROJECTION_HIDDEN
    dropout: float = 0.0
    shift_positions: bool = False

    @nn.compact
    def __call__(self, batch_size: int, deterministic: bool = True) -> Prompt:
        p, n, h = self.num_virtual_tokens, self.num_layers, self.hidden_size
        if self.projection:
            keys, values = PrefixProjection(p, h, n, self.encoder_hidden_size, name="prefix_projection")()
        else:
            init = nn.initializers.normal(1.0)
            keys = self.param("prefix_keys", init, (n, p, h), jnp.float32)
            values = self.param("prefix_values", init, (n, p, h), jnp.float32)
        keys, values = keys[:, None], values[:, None]          # [layers, 1, P, hidden]
        if self.dropout > 0.0 and not deterministic:
            shape = (n, batch_size, p, h)
            drop = nn.Dropout(self.dropout)
            keys = drop(jnp.broadcast_to(keys, shape), deterministic=False)
            values = drop(jnp.broadcast_to(values, shape), deterministic=False)
        d = h // self.num_heads
        kv = tuple((keys[i].reshape(keys.shape[1], p, self.num_heads, d),
                    values[i].reshape(values.shape[1], p, self.num_heads, d)) for i in range(n))
        return Prompt(prefix_kv=kv, position_offset=p if self.shift_positions else 0)


@dataclasses.dataclass
class PrefixTuning(Method):
    """Prefix tuning: trainable keys/values in front of every attention layer's own.

    ``None`` options take the method's defaults: ``prefix_projection`` True for ``prefix`` (Li &
    Liang) and False for ``ptuning_v2``; ``prefix_dropout`` 0.0 and 0.1; ``encoder_hidden_size`` 512.

    Attributes:
        num_virtual_tokens: prefix length P (default 20).
        prefix_projection: reparameterise through an MLP during training.
        encoder_hidden_size: width of that MLP.
        prefix_dropout: dropout on the prefixes in training.
        shift_positions: number the input's positions from P, after the prefix, as transformers'
            BERT does under peft (default: off, the pretrained positions from 0).
    """

    name = "prefix"
    summary = "key/value prefixes in every attention layer, through an MLP"
    schedule = "prompt"
    peft_type = "PREFIX_TUNING"
    mix = "prefix"
    mix_same = ("num_virtual_tokens", "shift_positions")
    default_projection: ClassVar[bool] = True
    default_dropout: ClassVar[float] = 0.0

    num_virtual_tokens: int = virtual_tokens(what="prefix keys/values per layer")
    prefix_projection: bool | None = option(
        None, "reparameterise the prefixes through an MLP in training (default: on for prefix, off for "
        "ptuning_v2)")
    encoder_hidden_size: int | None = option(None, "width of the prefix MLP (default 512)", positive)
    prefix_dropout: float | None = option(
        None, "dropout on the prefixes in training (default: 0 for prefix, 0.1 for ptuning_v2)",
        in_range(0, 1, hi_open=True))
    shift_positions: bool = option(
        False, "number the input's positions from P, after the prefix, as transformers' BERT does with "
        "peft's prefixes (default: the pretrained positions from 0)")

    def validate(self):
        if self.prefix_projection is None:
            self.prefix_projection = self.default_projection
        if self.prefix_dropout is None:
            self.prefix_dropout = self.default_dropout
        if self.encoder_hidden_size is None:
            self.encoder_hidden_size = DEFAULT_PROJECTION_HIDDEN

    def extra_positions(self) -> int:
        return self.num_virtual_tokens if self.shift_positions else 0

    def extra_keys(self) -> int:
        return self.num_virtual_tokens

    def prompt_module(self, family: Family, config: Any) -> nn.Module:
        return PrefixKV(self.num_virtual_tokens, config.num_hidden_layers, config.num_attention_heads,
                        config.hidden_size, bool(self.prefix_projection), self.encoder_hidden_size,
                        float(self.prefix_dropout), bool(self.shift_positions), name="prompt")

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params, include=PROMPT_PATTERN)

    def compute_prefixes(self, params: Any) -> tuple[jax.Array, jax.Array]:
        """``(keys, values)``, each ``[layers, P, hidden]``, as the model uses them (no dropout)."""
        prompt = params["prompt"]
        if not self.prefix_projection:
            return prompt["prefix_keys"], prompt["prefix_values"]
        proj = prompt["prefix_projection"]
        module = PrefixProjection.from_params(proj)
        return jax.jit(lambda p: module.apply({"params": p}))(proj)

    def export_params(self, params: Any, family: Family, heads=("classifier",), modules_to_save=()) -> dict[str, Any]:
        """The prefixes as direct parameters (the projection MLP evaluated once) and the head."""
        if not self.prefix_projection:
            return super().export_params(params, family, heads, modules_to_save)
        keys, values = self.compute_prefixes(params)
        return {"prompt/prefix_keys": keys, "prompt/prefix_values": values,
                **self.head_params(params, heads, modules_to_save)}

    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        return dict(encoder_hidden_size=int(self.encoder_hidden_size), prefix_projection=bool(self.prefix_projection))

    def peft_name(self, path, arrays, family):
        """peft's one ``[P, 2 * layers * H]`` tensor: for each layer in turn its key then its value
        (how peft's ``get_prompt`` splits it)."""
        if path == "prompt/prefix_keys":
            return {"prompt_embeddings": prefix_rows(np.asarray(arrays[path]), np.asarray(arrays["prompt/prefix_values"]))}
        if path == "prompt/prefix_values":
            return {}
        return None

    @classmethod
    def from_peft_tensor(cls, name, tensor, config):
        if name != "prompt_embeddings":
            return None
        n = config.num_hidden_layers
        if tensor.ndim != 2 or tensor.shape[1] % (2 * n):
            raise UserError(f"prompt_embeddings has shape {tuple(tensor.shape)}, which is not [P, 2 x {n} layers "
                            "x hidden] (an adapter of another base model?)")
        keys, values = prefix_kv(np.asarray(tensor), n)
        return {"prompt/prefix_keys": keys, "prompt/prefix_values": values}

    @classmethod
    def from_peft(cls, cfg, where):
        """transformers' BERT numbers the input after peft's prefix (``shift_positions``)."""
        return PrefixTuning(num_virtual_tokens=int(cfg["num_virtual_tokens"]), prefix_projection=False,
                            prefix_dropout=0.0, shift_positions=True)

    def for_inference(self) -> Method:
        return dataclasses.replace(self, prefix_projection=False, prefix_dropout=0.0)


@dataclasses.dataclass
class PTuningV2(PrefixTuning):
    """P-tuning v2: deep prompts (prefixes) at every layer, no reparameterisation by default,
    dropout 0.1 on the prefixes, the head on the real ``[CLS]``."""

    name = "ptuning_v2"
    summary = "key/value prefixes in every attention layer, held directly"
    default_projection: ClassVar[bool] = False
    default_dropout: ClassVar[float] = 0.1


def prefix_rows(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[layers, P, H]`` keys and values -> peft's ``[P, 2 * layers * H]`` rows."""
    n, p, h = keys.shape
    return np.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(p, 2 * n * h)


def prefix_kv(rows: np.ndarray, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`prefix_rows`."""
    p, width = rows.shape
    h = width // (2 * num_layers)
    kv = rows.reshape(p, num_layers, 2, h).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1])
