"""LoRA (Hu et al. 2021): a trainable low-rank update beside frozen dense layers.

Every targeted dense layer ``y = x W + b`` becomes ``y = x W + (alpha / r) * dropout(x) A B + b``
with ``A`` ``[in, r]`` and ``B`` ``[r, out]``, as in Hugging Face peft: ``A`` starts
Kaiming-uniform (``a = sqrt(5)``, i.e. uniform in ``+-1/sqrt(in)``), ``B`` at zero, so the untrained
model is exactly the base model; the dropout (``lora_dropout``) acts on the input of ``A`` only.
The encoder is frozen; ``A``, ``B`` and the task head train.

Which layers: ``target_modules`` uses peft's names and peft's rule. The modules are named as in
transformers' ``BertForSequenceClassification`` (``bert.encoder.layer.3.attention.self.query``,
``bert.encoder.layer.3.attention.output.dense``, ``bert.encoder.layer.3.intermediate.dense``,
``bert.encoder.layer.3.output.dense``, ``bert.pooler.dense``); a comma list targets a module whose
name is an entry or ends with ``.`` + an entry, a value with regex characters must match the whole
name (peft's ``target_modules`` as a string). So ``query,value`` (the default, peft's default for
BERT and the LoRA paper's W_q, W_v) adapts the attention's query and value projections, and
``dense`` -- as in peft -- adapts all three other dense layers of every layer *and the pooler*.
Every layer must get the same set (``layers_to_transform`` is not supported).

Params sit beside the layer they adapt: ``bert/encoder/layer_3/attention/self/query_lora/lora_A/kernel``
(``[in, r]``) and ``.../query_lora/lora_B/kernel`` (``[r, out]``); for the ``dense`` layers
``.../attention/output/dense_lora/...``, ``.../intermediate/dense_lora/...``,
``.../output/dense_lora/...``, ``bert/pooler/dense_lora/...``. In peft's files they are
``base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), the transposes (``jaxpeft.adapters.peft_format``).

:func:`merge` folds the update into the weights (``W + (alpha / r) A B``) for inference: the merged
params run on the plain model with no extra matmul, with the same logits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.bert import BertConfig, Extras
from jaxpeft.options import in_range, option, positive

#: The dense layers LoRA can adapt, by the name the model's ``Extras.lora`` hook uses.
SITES = ("query", "key", "value", "attention_output", "intermediate", "output", "pooler")
#: Each site's module name in transformers' ``BertForSequenceClassification`` (``{i}``: the layer).
HF_MODULES = {
    "query": "bert.encoder.layer.{i}.attention.self.query",
    "key": "bert.encoder.layer.{i}.attention.self.key",
    "value": "bert.encoder.layer.{i}.attention.self.value",
    "attention_output": "bert.encoder.layer.{i}.attention.output.dense",
    "intermediate": "bert.encoder.layer.{i}.intermediate.dense",
    "output": "bert.encoder.layer.{i}.output.dense",
    "pooler": "bert.pooler.dense",
}
#: The LoRA module's name beside the dense layer it adapts.
MODULE_NAMES = {"query": "query_lora", "key": "key_lora", "value": "value_lora",
                "attention_output": "dense_lora", "intermediate": "dense_lora", "output": "dense_lora",
                "pooler": "dense_lora"}
#: Regex of LoRA's params (``Method.added``).
PARAM_PATTERN = r"_lora/lora_[AB]/kernel$"
_REGEX_CHARS = set("*+?()[]{}|^$\\")


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """torch's ``kaiming_uniform_(w, a=sqrt(5))`` on the ``[r, in]`` weight, for our ``[in, r]``
    kernel: uniform in ``+-1/sqrt(in)`` (gain ``sqrt(2 / (1 + 5))`` times ``sqrt(3 / in)``)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class _Kernel(nn.Module):
    """One ``kernel`` param (an ``nn.Dense`` without bias), returned unapplied."""

    shape: tuple[int, int]
    init: Any

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", self.init, self.shape, jnp.float32)


class LowRankUpdate(nn.Module):
    """``x -> scale * dropout(x) A B``: ``A`` (``lora_A/kernel``, ``[in, r]``) and ``B``
    (``lora_B/kernel``, ``[r, out]``), computed in ``x``'s dtype."""

    in_features: int
    out_features: int
    r: int
    scale: float
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        a = _Kernel((self.in_features, self.r), kaiming_uniform, name="lora_A")()
        b = _Kernel((self.r, self.out_features), nn.initializers.zeros_init(), name="lora_B")()
        if self.dropout > 0.0 and not deterministic:
            x = nn.Dropout(self.dropout)(x, deterministic=False)
        h = jnp.dot(jnp.dot(x, a.astype(x.dtype)), b.astype(x.dtype))
        return h * jnp.asarray(self.scale, h.dtype)


@dataclasses.dataclass(frozen=True)
class LoraFactory:
    """The model's ``Extras.lora`` hook: a :class:`LowRankUpdate` for the sites in ``sites``."""

    sites: tuple[str, ...]
    r: int
    scale: float
    dropout: float = 0.0

    def __call__(self, name: str, in_features: int, out_features: int) -> nn.Module | None:
        if name not in self.sites:
            return None
        return LowRankUpdate(in_features, out_features, self.r, self.scale, self.dropout,
                             name=MODULE_NAMES[name])


# ----------------------------------------------------------------------------- target modules


def parse_targets(target_modules: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    """peft's ``target_modules``: a list of names, or one regex (a string with regex characters;
    a plain string is a comma list)."""
    if isinstance(target_modules, (list, tuple)):
        return tuple(str(t).strip() for t in target_modules if str(t).strip())
    text = str(target_modules).strip()
    if _REGEX_CHARS & set(text):
        try:
            re.compile(text)
        except re.error as e:
            raise UserError(f"--target_modules={text}: not a valid regular expression ({e})") from None
        return text
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _matches(targets: str | tuple[str, ...], module: str) -> bool:
    """peft's ``check_target_module_exists``: a regex must match the whole name; a list entry
    must be the name or its ending after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def resolve_targets(target_modules: str | list[str] | tuple[str, ...], num_layers: int) -> tuple[str, ...]:
    """The sites (:data:`SITES`) ``target_modules`` selects in a model of ``num_layers`` layers.

    Raises :class:`UserError` when it selects nothing, when an entry of a list selects nothing, or
    when it selects a layer in some encoder layers and not in others.
    """
    targets = parse_targets(target_modules)
    shown = targets if isinstance(targets, str) else ",".join(targets)
    if not targets:
        raise UserError("--target_modules is empty")
    modules = {site: [HF_MODULES[site].format(i=i) for i in range(num_layers if "{i}" in HF_MODULES[site] else 1)]
               for site in SITES}
    if not isinstance(targets, str):
        every = [m for names in modules.values() for m in names]
        for t in targets:
            if not any(_matches((t,), m) for m in every):
                raise UserError(f"--target_modules={shown}: {t!r} names none of the BERT layers LoRA can adapt "
                                "(query, key, value, dense, attention.output.dense, intermediate.dense, "
                                "output.dense, pooler.dense)")
    sites = []
    for site, names in modules.items():
        hit = [_matches(targets, m) for m in names]
        if any(hit) and not all(hit):
            raise UserError(f"--target_modules={shown} selects {site} in some layers only; LoRA on a subset "
                            "of the layers is not supported")
        if all(hit):
            sites.append(site)
    if not sites:
        raise UserError(f"--target_modules={shown} selects no layer")
    return tuple(sites)


# ----------------------------------------------------------------------------- the method


@dataclasses.dataclass
class LoRA(Method):
    """LoRA: low-rank updates of the targeted dense layers train, with the head.

    Attributes:
        lora_r: rank r (peft's ``r``; default 8).
        lora_alpha: the update is scaled by ``lora_alpha / lora_r`` (default 16, so a scale of 2;
            peft's ``LoraConfig`` default is 8).
        lora_dropout: dropout on LoRA's input in training (default 0.0, as peft).
        target_modules: peft's names (comma list) or a regex; default ``query,value``.
    """

    name = "lora"
    supports_packing = True   # the update is per token
    added = PARAM_PATTERN

    lora_r: int = option(8, "LoRA rank r (peft's r)", positive)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) x A B "
                               "(peft's default is 8)", positive)
    lora_dropout: float = option(0.0, "dropout on LoRA's input in training", in_range(0, 1, hi_open=True))
    target_modules: str = option(
        "query,value", "layers LoRA adapts, peft's target_modules: a comma list of names (query, key, value, "
        "dense = attention.output.dense + intermediate.dense + output.dense + pooler.dense, or longer "
        "endings such as intermediate.dense) or a regex matching the whole module name")

    def validate(self):
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = ",".join(self.target_modules)
        resolve_targets(self.target_modules, 2)   # a typo fails before anything is loaded

    @property
    def scale(self) -> float:
        return float(self.lora_alpha) / int(self.lora_r)

    def sites(self, num_layers: int) -> tuple[str, ...]:
        return resolve_targets(self.target_modules, num_layers)

    def extras(self, config: BertConfig) -> Extras:
        return Extras(lora=LoraFactory(self.sites(config.num_hidden_layers), int(self.lora_r), self.scale,
                                       float(self.lora_dropout)))

    def trainable(self, params: Any) -> Any:
        return masks.match(params, include=PARAM_PATTERN)


def merge(params: Any, scale: float) -> Any:
    """``params`` of a LoRA model as params of the plain model: every adapted kernel becomes
    ``W + scale * A B`` and the LoRA leaves are dropped. Apply them with the model built without
    the method's extras (``BertForSequenceClassification(config, num_labels)``)."""
    flat = masks.flatten(params)
    out = {p: v for p, v in flat.items() if not re.search(PARAM_PATTERN, p)}
    for p, a in flat.items():
        m = re.fullmatch(r"(.*)/(\w+)_lora/lora_A/kernel", p)
        if m is None:
            continue
        prefix, layer = m.groups()
        b = flat[f"{prefix}/{layer}_lora/lora_B/kernel"]
        w = f"{prefix}/{layer}/kernel"
        delta = jnp.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) * scale
        out[w] = (jnp.asarray(flat[w], jnp.float32) + delta).astype(flat[w].dtype)
    return _unflatten(out)


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = v
    return tree
