"""LoRA (Hu et al. 2021), with peft's options DoRA (Liu et al. 2024) and rsLoRA (Kalajdzievski 2023).

Every targeted dense layer ``y = x W + b`` becomes ``y = x W + s * dropout(x) A B + b`` with ``A``
``[in, r]`` and ``B`` ``[r, out]``, as in Hugging Face peft: ``A`` starts Kaiming-uniform
(``a = sqrt(5)``, uniform in ``+-1/sqrt(in)``), ``B`` at zero, so the untrained model is exactly the
base model. ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``.

``use_dora``: the update is split into a direction and a trained magnitude per output feature,
``y = m / ||W + s B A|| * (x W + s x A B) + b`` (norms over each output feature's weights, taken
without gradient, as peft does); ``m`` starts at ``||W||``, so the untrained model is the base.

Which layers: ``target_modules`` uses peft's names and peft's rule, matched against each dense
layer's name in transformers' model of the family (``bert.encoder.layer.3.attention.self.query``):
an entry of a comma list matches a name that is the entry or ends with ``.`` + the entry; a value
with regex characters must match the whole name. Default: peft's default for the family (BERT:
``query,value``). Params sit beside the layer they adapt:
``bert/encoder/layer_3/attention/self/query_lora/{lora_A,lora_B}/kernel`` (and
``lora_magnitude_vector`` with DoRA); peft's tensors are
``base_model.model.bert.encoder.layer.3.attention.self.query.lora_A.weight`` (``[r, in]``),
``...lora_B.weight`` (``[out, r]``) and ``...lora_magnitude_vector`` (``[out]``).

:func:`merge` folds the update into the weights for inference.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.family import Family, hf_name
from jaxpeft.models import layers
from jaxpeft.models.layers import Hooks, LinearChange
from jaxpeft.options import in_range, option, positive

#: Regex of LoRA's params (``Method.added``).
PARAM_PATTERN = r"_lora/(lora_[AB]/kernel|lora_magnitude_vector)$"
_REGEX_CHARS = set("*+?()[]{}|^$\\")
#: LoRA config fields jaxpeft cannot honour, with the value that means "off".
UNSUPPORTED = {"lora_bias": False, "bias": "none", "layers_pattern": None, "rank_pattern": {},
               "alpha_pattern": {}, "exclude_modules": None, "trainable_token_indices": None,
               "target_parameters": None, "use_qalora": False, "layer_replication": None,
               "layers_to_transform": None}
#: peft's ``init_lora_weights`` that leave the base model's weights as they are (PiSSA, OLoRA, CorDA,
#: LoftQ ... rewrite them, so such an adapter is only right on the base it rewrote)
BASE_KEEPING_INITS = (True, False, None, "gaussian", "eva", "orthogonal")


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """torch's ``kaiming_uniform_(w, a=sqrt(5))`` on the ``[r, in]`` weight, for our ``[in, r]``
    kernel: uniform in ``+-1/sqrt(in)``."""
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
    """The hook of one adapted layer: ``delta = scale * dropout(x) A B`` (and DoRA's rescaling)."""

    in_features: int
    out_features: int
    r: int
    scale: float
    dropout: float = 0.0
    dora: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, kernel: jax.Array, deterministic: bool = True) -> LinearChange:
        a = _Kernel((self.in_features, self.r), kaiming_uniform, name="lora_A")()
        b = _Kernel((self.r, self.out_features), nn.initializers.zeros_init(), name="lora_B")()
        h = x
        if self.dropout > 0.0 and not deterministic:
            h = nn.Dropout(self.dropout)(h, deterministic=False)
        delta = jnp.dot(jnp.dot(h, a.astype(x.dtype)), b.astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)
        if not self.dora:
            return LinearChange(delta=delta)
        m = self.param("lora_magnitude_vector", nn.initializers.ones, (self.out_features,), jnp.float32)
        w = layers.weight(kernel) + self.scale * jnp.dot(a, b)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(w, axis=0))
        return LinearChange(delta=delta, scale=m / norm)


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


def matches(targets: str | tuple[str, ...], module: str) -> bool:
    """peft's ``check_target_module_exists``: a regex must match the whole name; a list entry
    must be the name or its ending after a dot."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return module in targets or any(module.endswith("." + t) for t in targets)


def linear_modules(params: Any) -> list[str]:
    """transformers' names of the dense layers of a params tree (the parents of 2-D kernels)."""
    out = []
    for p, v in masks.flatten(params).items():
        if p.endswith("/kernel") and getattr(v, "ndim", 0) == 2 and "_lora/" not in p and "_ia3/" not in p:
            out.append(hf_name(p)[0].rsplit(".", 1)[0])
    return out


def target_set(targets: str | tuple[str, ...] | None) -> str | frozenset[str] | None:
    """Parsed targets as adapters compare them: a regex as written, a list as a set (peft keeps a
    set: its files list it in any order)."""
    return targets if targets is None or isinstance(targets, str) else frozenset(targets)


def check_targets(targets: str | tuple[str, ...], modules: list[str], flag: str, adapted: list[str]) -> None:
    """Raises :class:`UserError` when a list entry names no dense layer of the model, or nothing
    is adapted."""
    shown = targets if isinstance(targets, str) else ",".join(targets)
    if not isinstance(targets, str):
        for t in targets:
            if not any(matches((t,), m) for m in modules):
                examples = sorted({m.rsplit(".", 1)[-1] for m in modules})
                raise UserError(f"--{flag}={shown}: {t!r} names none of the model's dense layers (their last "
                                f"names: {', '.join(examples)})")
    if not adapted:
        raise UserError(f"--{flag}={shown} selects no dense layer of the model")


@dataclasses.dataclass(frozen=True)
class LoraHooks:
    """The ``Hooks.linear`` factory: a :class:`LowRankUpdate` named ``<layer>_lora`` at each target."""

    targets: Any
    r: int
    scale: float
    dropout: float = 0.0
    dora: bool = False

    def __call__(self, module: str, local: str, din: int, dout: int) -> nn.Module | None:
        if not matches(self.targets, module):
            return None
        return LowRankUpdate(din, dout, self.r, self.scale, self.dropout, self.dora, name=f"{local}_lora")


@dataclasses.dataclass
class LoRA(Method):
    """LoRA: low-rank updates of the targeted dense layers train, with the head.

    Attributes:
        lora_r: rank r (peft's ``r``; default 8).
        lora_alpha: scale numerator: ``lora_alpha / r`` (default 16, a scale of 2).
        lora_dropout: dropout on LoRA's input in training (default 0.0, as peft).
        target_modules: peft's names (comma list) or a regex; default: peft's for the family.
        use_dora: DoRA's magnitude and direction (peft's ``use_dora``).
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (peft's ``use_rslora``).
    """

    name = "lora"
    summary = "low-rank updates of --target_modules (peft's names), --lora_r; --use_dora, --use_rslora"
    added = PARAM_PATTERN
    peft_type = "LORA"
    mix = "lora"
    mix_same = ("lora_r", "lora_alpha", "target_modules", "use_dora", "use_rslora")

    lora_r: int = option(8, "LoRA rank r (peft's r)", positive)
    lora_alpha: float = option(16.0, "LoRA scale numerator: the update is (lora_alpha / lora_r) x A B "
                               "(peft's default is 8)", positive)
    lora_dropout: float = option(0.0, "dropout on LoRA's input in training", in_range(0, 1, hi_open=True))
    target_modules: str | None = option(
        None, "layers LoRA adapts, peft's target_modules: a comma list of names (BERT: query, key, value, "
        "dense, or longer endings such as intermediate.dense) or a regex matching the whole module name "
        "(default: peft's for the model family; BERT: query,value)")
    use_dora: bool = option(False, "DoRA: train a magnitude per output feature beside the low-rank "
                            "direction (peft's use_dora)")
    use_rslora: bool = option(False, "rank-stabilised LoRA: scale the update by lora_alpha / sqrt(r) "
                              "(peft's use_rslora)")

    def validate(self):
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = ",".join(self.target_modules)
        if self.target_modules is not None:
            if not parse_targets(self.target_modules):
                raise UserError("--target_modules is empty")

    @property
    def scale(self) -> float:
        r = int(self.lora_r)
        return float(self.lora_alpha) / (math.sqrt(r) if self.use_rslora else r)

    def targets(self, family: Family) -> str | tuple[str, ...]:
        return parse_targets(self.target_modules) if self.target_modules is not None else family.lora_targets

    def mix_values(self, family: Family | None) -> dict[str, Any]:
        known = family is not None or self.target_modules is not None
        return {**super().mix_values(family), "target_modules": target_set(self.targets(family) if known else None)}

    def hooks(self, family: Family, config: Any) -> Hooks:
        return Hooks(linear=LoraHooks(self.targets(family), int(self.lora_r), self.scale, float(self.lora_dropout),
                                      bool(self.use_dora)))

    def check_model(self, params: Any, family: Family) -> None:
        adapted = [p for p in masks.paths(params) if p.endswith("_lora/lora_A/kernel")]
        check_targets(self.targets(family), linear_modules(params), "target_modules", adapted)

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params, include=PARAM_PATTERN)

    def init_params(self, params: Any, family: Family, *, tokenizer: Any = None, rng: Any = None) -> Any:
        """DoRA's magnitudes start at the norms of the pretrained weights' output features."""
        if not self.use_dora:
            return params
        flat = masks.flatten(params)
        for p in list(flat):
            if p.endswith("_lora/lora_magnitude_vector"):
                owner, local = p[:-len("_lora/lora_magnitude_vector")].rsplit("/", 1)
                flat[p] = jnp.linalg.norm(jnp.asarray(flat[f"{owner}/{local}/kernel"], jnp.float32), axis=0)
        return masks.unflatten(flat, params)

    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        targets = self.targets(family)
        return dict(r=int(self.lora_r), lora_alpha=_number(self.lora_alpha), lora_dropout=float(self.lora_dropout),
                    target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                    fan_in_fan_out=False, init_lora_weights=True, use_rslora=bool(self.use_rslora),
                    use_dora=bool(self.use_dora), lora_bias=False, layers_to_transform=None, layers_pattern=None,
                    rank_pattern={}, alpha_pattern={}, exclude_modules=None)

    def peft_name(self, path: str, arrays: Mapping[str, np.ndarray], family: Family
                  ) -> dict[str, np.ndarray] | None:
        m = re.fullmatch(r"(.*)/(\w+)_lora/(lora_[AB])/kernel", path)
        if m:
            name, _ = hf_name(f"{m.group(1)}/{m.group(2)}/{m.group(3)}/kernel")
            return {name: np.asarray(arrays[path]).T}
        m = re.fullmatch(r"(.*)/(\w+)_lora/lora_magnitude_vector", path)
        if m:
            name, _ = hf_name(f"{m.group(1)}/{m.group(2)}/x")
            return {name[:-len(".x")] + ".lora_magnitude_vector": np.asarray(arrays[path])}
        return None

    @classmethod
    def from_peft_tensor(cls, name: str, tensor: np.ndarray, config: Any) -> dict[str, np.ndarray] | None:
        m = re.fullmatch(r"(.*)\.(\w+)\.(lora_[AB])\.weight", name)
        if m:
            return {f"{_path(m.group(1))}/{m.group(2)}_lora/{m.group(3)}/kernel": np.ascontiguousarray(tensor.T)}
        m = re.fullmatch(r"(.*)\.(\w+)\.lora_magnitude_vector(\.weight)?", name)
        if m:
            return {f"{_path(m.group(1))}/{m.group(2)}_lora/lora_magnitude_vector": np.asarray(tensor).reshape(-1)}
        return None

    @classmethod
    def from_peft(cls, cfg: Mapping[str, Any], where: str) -> "LoRA":
        for key, off in UNSUPPORTED.items():
            if cfg.get(key) not in (None, off):
                raise UserError(f"{where}: {key}={cfg[key]!r} is not supported by jaxpeft's LoRA")
        if cfg.get("init_lora_weights") not in BASE_KEEPING_INITS:
            raise UserError(f"{where}: init_lora_weights={cfg['init_lora_weights']!r} rewrites the base model's "
                            "weights, which jaxpeft's LoRA does not (save the adapter converted to plain LoRA)")
        targets = cfg.get("target_modules")
        if isinstance(targets, list):
            targets = ",".join(targets)
        if not targets:
            raise UserError(f"{where}: no target_modules")
        return cls(lora_r=int(cfg["r"]), lora_alpha=float(cfg["lora_alpha"]),
                   lora_dropout=float(cfg.get("lora_dropout") or 0.0), target_modules=targets,
                   use_dora=bool(cfg.get("use_dora")), use_rslora=bool(cfg.get("use_rslora")))


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _path(dotted: str) -> str:
    """transformers' dotted module name -> our path (``bert.encoder.layer.3`` -> ``bert/encoder/layer_3``)."""
    return re.sub(r"(^|/)(layers?)/(\d+)(?=/|$)", r"\1\2_\3", dotted.replace(".", "/"))


def merge(params: Any, scale: float) -> Any:
    """``params`` of a LoRA model as params of the plain model: every adapted kernel becomes
    ``W + scale * A B`` (with DoRA: ``m / ||W + scale A B|| * (W + scale A B)`` per output feature)
    and the LoRA leaves are dropped. Apply them with the model built without the method's hooks."""
    flat = masks.flatten(params)
    out = {p: v for p, v in flat.items() if not re.search(PARAM_PATTERN, p)}
    for p, a in flat.items():
        m = re.fullmatch(r"(.*)/(\w+)_lora/lora_A/kernel", p)
        if m is None:
            continue
        prefix, layer = m.groups()
        b = flat[f"{prefix}/{layer}_lora/lora_B/kernel"]
        w = f"{prefix}/{layer}/kernel"
        merged = jnp.asarray(flat[w], jnp.float32) + jnp.dot(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)) * scale
        mag = flat.get(f"{prefix}/{layer}_lora/lora_magnitude_vector")
        if mag is not None:
            merged = merged * (jnp.asarray(mag, jnp.float32) / jnp.linalg.norm(merged, axis=0))
        out[w] = merged.astype(flat[w].dtype)
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
