"""IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations inside the frozen encoder.

As peft applies it: each targeted dense layer gets a vector ``l`` (param ``<layer>_ia3/ia3_l``,
starting at ones, so the untrained model is the base model). A feed-forward layer scales its
*input*, ``y = (x * l) W + b`` (``l`` ``[in]``); any other targeted layer scales its *output*,
``y = (x W + b) * l`` (``l`` ``[out]``). ``target_modules`` and ``feedforward_modules`` use peft's
names and rules (a list entry matches a module named by it or ending in ``.`` + it; a feed-forward
entry matches any name ending in it, so on BERT ``output.dense`` covers the attention's output
projection too), and default to peft's for the family: on BERT the keys and values are rescaled,
and the inputs of both output projections (``attention.output.dense``, ``output.dense``). As peft's
config requires, listed ``feedforward_modules`` are some of the listed ``target_modules``; with
``target_modules`` given and no ``feedforward_modules``, the family's feed-forward entries among
them are the default (``--target_modules=key,value`` has none; peft itself would write
``output.dense``, a config it then refuses to read).

In peft's files the vectors are ``base_model.model.<module>.ia3_l``, shaped ``[out, 1]`` or ``[1, in]``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.methods.lora import _path, check_targets, linear_modules, matches, parse_targets, target_set
from jaxpeft.models.family import Family, hf_name
from jaxpeft.models.layers import Hooks, LinearChange
from jaxpeft.options import option

PARAM_PATTERN = r"_ia3/ia3_l$"


def is_feedforward(feedforward: str | tuple[str, ...], module: str) -> bool:
    """peft's ``_check_target_module_feedforward``: a regex must match the whole name; a list entry
    need only end the name."""
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(t) for t in feedforward)


class Rescale(nn.Module):
    """The hook of one targeted layer: ``l`` scales the input (feed-forward) or the output."""

    size: int
    feedforward: bool

    @nn.compact
    def __call__(self, x: jax.Array, kernel: jax.Array, deterministic: bool = True) -> LinearChange:
        del kernel, deterministic
        scale = self.param("ia3_l", nn.initializers.ones, (self.size,), jnp.float32)
        return LinearChange(in_scale=scale) if self.feedforward else LinearChange(out_scale=scale)


@dataclasses.dataclass(frozen=True)
class IA3Hooks:
    """The ``Hooks.linear`` factory: a :class:`Rescale` named ``<layer>_ia3`` at each target."""

    targets: Any
    feedforward: Any

    def __call__(self, module: str, local: str, din: int, dout: int) -> nn.Module | None:
        if not matches(self.targets, module):
            return None
        ff = is_feedforward(self.feedforward, module)
        return Rescale(din if ff else dout, ff, name=f"{local}_ia3")


@dataclasses.dataclass
class IA3(Method):
    """IA3: rescaling vectors at the targeted layers train, with the head.

    Attributes:
        target_modules: peft's names (comma list) or a regex; default: peft's for the family.
        feedforward_modules: which targets scale their input (peft's ``feedforward_modules``, some
            of the targets); default: peft's for the family, those among given targets.
    """

    name = "ia3"
    summary = "vectors rescaling keys, values and the feed-forward inputs (peft's defaults), --target_modules"
    added = PARAM_PATTERN
    peft_type = "IA3"
    mix = "ia3"
    mix_same = ("target_modules", "feedforward_modules")

    target_modules: str | None = option(
        None, "layers IA3 rescales, peft's target_modules (comma list or regex; default: peft's for the "
        "model family; BERT: key,value,output.dense)")
    feedforward_modules: str | None = option(
        None, "the targets whose input is rescaled, peft's feedforward_modules, some of --target_modules "
        "(default: peft's for the model family, those among --target_modules where given; BERT: output.dense)")

    def validate(self):
        for flag in ("target_modules", "feedforward_modules"):
            if isinstance(getattr(self, flag), (list, tuple)):
                setattr(self, flag, ",".join(getattr(self, flag)))
        if self.target_modules is not None and not parse_targets(self.target_modules):
            raise UserError("--target_modules is empty")
        if self.target_modules is not None and self.feedforward_modules is not None:
            t, f = parse_targets(self.target_modules), parse_targets(self.feedforward_modules)
            if not isinstance(t, str) and not isinstance(f, str) and not set(f) <= set(t):
                raise UserError(f"--feedforward_modules={self.feedforward_modules}: must be some of "
                                f"--target_modules={self.target_modules} (peft's rule)")

    def targets(self, family: Family) -> Any:
        return parse_targets(self.target_modules) if self.target_modules is not None else family.ia3_targets

    def feedforward(self, family: Family) -> Any:
        """The feed-forward entries: given, else the family's (those among listed targets)."""
        if self.feedforward_modules is not None:
            return parse_targets(self.feedforward_modules)
        t = self.targets(family)
        if self.target_modules is None or isinstance(t, str) or isinstance(family.ia3_feedforward, str):
            return family.ia3_feedforward
        return tuple(f for f in family.ia3_feedforward if f in t)

    def mix_values(self, family: Family | None) -> dict[str, Any]:
        if family is None:
            t, f = (None if v is None else parse_targets(v) for v in (self.target_modules, self.feedforward_modules))
        else:
            t, f = self.targets(family), self.feedforward(family)
        return {"target_modules": target_set(t), "feedforward_modules": target_set(f)}

    def hooks(self, family: Family, config: Any) -> Hooks:
        return Hooks(linear=IA3Hooks(self.targets(family), self.feedforward(family)))

    def check_model(self, params: Any, family: Family) -> None:
        adapted = [p for p in masks.paths(params) if p.endswith("_ia3/ia3_l")]
        check_targets(self.targets(family), linear_modules(params), "target_modules", adapted)

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params, include=PARAM_PATTERN)

    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        t, f = self.targets(family), self.feedforward(family)
        return dict(target_modules=t if isinstance(t, str) else list(t),
                    feedforward_modules=f if isinstance(f, str) else list(f), fan_in_fan_out=False,
                    init_ia3_weights=True, exclude_modules=None)

    def peft_name(self, path: str, arrays: Mapping[str, np.ndarray], family: Family
                  ) -> dict[str, np.ndarray] | None:
        m = re.fullmatch(r"(.*)/(\w+)_ia3/ia3_l", path)
        if m is None:
            return None
        module = hf_name(f"{m.group(1)}/{m.group(2)}/x")[0][:-len(".x")]
        ff = is_feedforward(self.feedforward(family), module)
        v = np.asarray(arrays[path])
        return {f"{module}.ia3_l": v[None, :] if ff else v[:, None]}

    @classmethod
    def from_peft_tensor(cls, name: str, tensor: np.ndarray, config: Any) -> dict[str, np.ndarray] | None:
        m = re.fullmatch(r"(.*)\.(\w+)\.ia3_l(\.weight)?", name)
        if m is None:
            return None
        return {f"{_path(m.group(1))}/{m.group(2)}_ia3/ia3_l": np.asarray(tensor).reshape(-1)}

    @classmethod
    def from_peft(cls, cfg: Mapping[str, Any], where: str) -> "IA3":
        def text(v):
            return ",".join(v) if isinstance(v, list) else v
        if not cfg.get("target_modules"):
            raise UserError(f"{where}: no target_modules")
        if cfg.get("exclude_modules"):
            raise UserError(f"{where}: exclude_modules={cfg['exclude_modules']!r} is not supported by jaxpeft's IA3")
        return cls(target_modules=text(cfg["target_modules"]),
                   feedforward_modules=text(cfg.get("feedforward_modules") or []))
