"""PEFT methods by name. Each is a :class:`~jaxpeft.methods.base.Method`: a mask plus, for prompt
methods, an adapter module that adds parameters, and for LoRA and bottleneck adapters, modules
inside the layers (``Method.extras``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.errors import UserError
from jaxpeft.methods.base import HEAD_PATTERN, Method
from jaxpeft.methods.bitfit import BitFit, Frozen, Full
from jaxpeft.methods.bottleneck import Adapter
from jaxpeft.methods.lora import LoRA
from jaxpeft.methods.prefix import PrefixTuning, PTuningV2
from jaxpeft.methods.prompt import PromptTuning, PTuning

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Full, Frozen, BitFit, LoRA, Adapter, PromptTuning, PTuning, PrefixTuning, PTuningV2)}


def create(name: str, options: Mapping[str, Any] | None = None, *, strict: bool = True) -> Method:
    """Builds method ``name`` with ``options``. An option it does not take is an error naming the
    method and the options it takes (``strict=False``: ignored instead)."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    given = dict(options or {})
    extra = sorted(set(given) - fields)
    if extra and strict:
        takes = ", ".join(f"--{n}" for n in sorted(fields)) or "none"
        raise UserError(f"--{extra[0]} is not an option of --method={name} (its options: {takes})")
    try:
        return cls(**{k: v for k, v in given.items() if k in fields})
    except TypeError as e:
        raise UserError(f"--method={name}: {e}") from None


def all_options() -> set[str]:
    """Every option name of every registered method."""
    return {f.name for cls in REGISTRY.values() for f in dataclasses.fields(cls)}


__all__ = ["HEAD_PATTERN", "Method", "REGISTRY", "all_options", "create", "Adapter", "BitFit", "Frozen", "Full",
           "LoRA", "PromptTuning", "PTuning", "PrefixTuning", "PTuningV2"]
