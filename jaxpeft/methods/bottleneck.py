"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021).

``--method=bottleneck``. A small residual MLP inside every layer: ``y -> y + up(gelu(down(y)))``
with ``down`` ``[H, adapter_size]`` and ``up`` ``[adapter_size, H]`` (each with a bias). It acts on
a sublayer's projection output after its dropout and before the sublayer's residual connection and
LayerNorm (the encoder's ``Hooks.sublayer`` point), as in Houlsby et al.'s Figure 2.

* ``adapter_type=houlsby``: an adapter after the attention sublayer and one after the
  feed-forward sublayer of every layer. As in the paper, the layer normalisation parameters train
  too (every LayerNorm of the encoder, the embeddings' included), with the adapters and the head.
* ``adapter_type=pfeiffer``: one adapter, after the feed-forward sublayer only; the LayerNorms
  stay frozen. (AdapterHub's Pfeiffer configuration also moves the adapter's residual and adds a
  LayerNorm around it; we keep Houlsby's position and module, with Pfeiffer's single site.)

``train_layer_norms`` overrides either default. ``down`` starts ``N(0, initializer_range)`` and
``up`` at exactly zero, so an untrained adapter is the identity and the untrained model is exactly
the base model (Houlsby et al. start near the identity). The nonlinearity is GELU, as in the
authors' code. Params: ``bert/encoder/layer_3/attention/output/adapter/{down,up}/{kernel,bias}``
and ``bert/encoder/layer_3/output/adapter/...``.

Hugging Face peft has no bottleneck adapters: the adapter folder holds them under transformers-style
names (``bert.encoder.layer.3.output.adapter.down.weight``, ``[out, in]``), for jaxpeft to read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft import masks
from jaxpeft.methods.base import Method
from jaxpeft.models.family import Family
from jaxpeft.models.layers import Hooks
from jaxpeft.options import option, positive

ADAPTER_TYPES = ("houlsby", "pfeiffer")
#: The sublayers that get an adapter, per type (the kinds of the encoder's ``Hooks.sublayer`` point).
SITES = {"houlsby": ("attention", "ffn"), "pfeiffer": ("ffn",)}
#: Regex of the adapters' params (``Method.added``).
PARAM_PATTERN = r"/bottleneck/(down|up)/"


class Bottleneck(nn.Module):
    """``y -> y + up(gelu(down(y)))``, computed in ``y``'s dtype; params ``down/{kernel,bias}``
    and ``up/{kernel,bias}`` (``nn.Dense``'s names)."""

    hidden_size: int
    adapter_size: int
    init_std: float = 0.02

    @nn.compact
    def __call__(self, y: jax.Array, deterministic: bool = True) -> jax.Array:
        del deterministic
        h = nn.Dense(self.adapter_size, dtype=y.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.normal(self.init_std), name="down")(y)
        h = jax.nn.gelu(h, approximate=False)
        h = nn.Dense(self.hidden_size, dtype=y.dtype, param_dtype=jnp.float32,
                     kernel_init=nn.initializers.zeros_init(), name="up")(h)
        return y + h


@dataclasses.dataclass(frozen=True)
class BottleneckHooks:
    """The ``Hooks.sublayer`` factory: a :class:`Bottleneck` named ``bottleneck`` at ``sites``."""

    sites: tuple[str, ...]
    adapter_size: int
    init_std: float = 0.02

    def __call__(self, module: str, kind: str, hidden: int) -> nn.Module | None:
        if kind not in self.sites:
            return None
        return Bottleneck(hidden, self.adapter_size, self.init_std, name="bottleneck")


def layer_norm_pattern(family: Family) -> str:
    """Regex of the encoder's normalisation params (``LayerNorm``, ``layer_norm``, ``attn_norm``, ...)."""
    return rf"(?i)^{family.prefix}/(.*/)?[^/]*norm[^/]*/(scale|bias)$"


@dataclasses.dataclass
class BottleneckAdapters(Method):
    """Bottleneck adapters in every layer train, with the head (and the LayerNorms for Houlsby).

    Attributes:
        adapter_size: the bottleneck width (default 64).
        adapter_type: ``houlsby`` (after attention and feed-forward) or ``pfeiffer`` (after the
            feed-forward sublayer only).
        train_layer_norms: whether the encoder's LayerNorms train (default: yes for Houlsby, no
            for Pfeiffer).
    """

    name = "bottleneck"
    summary = "bottleneck adapters after each sublayer (--adapter_size, --adapter_type=houlsby|pfeiffer)"
    supports_packing = True   # per token
    added = PARAM_PATTERN
    mix = "bottleneck"
    mix_same = ("adapter_size", "adapter_type")

    adapter_size: int = option(64, "bottleneck width of the adapters", positive)
    adapter_type: str = option("houlsby", "houlsby (adapters after the attention and the feed-forward "
                               "sublayers, LayerNorms train) or pfeiffer (after the feed-forward sublayer "
                               "only)", choices=ADAPTER_TYPES)
    train_layer_norms: bool | None = option(None, "train the encoder's LayerNorms too (default: on for "
                                            "houlsby, off for pfeiffer)")

    def validate(self):
        if self.train_layer_norms is None:
            self.train_layer_norms = self.adapter_type == "houlsby"

    def hooks(self, family: Family, config: Any) -> Hooks:
        return Hooks(sublayer=BottleneckHooks(SITES[self.adapter_type], int(self.adapter_size),
                                              getattr(config, "initializer_range", 0.02)))

    def trainable(self, params: Any, family: Family) -> Any:
        include = [PARAM_PATTERN] + ([layer_norm_pattern(family)] if self.train_layer_norms else [])
        return masks.match(params, include=include)
