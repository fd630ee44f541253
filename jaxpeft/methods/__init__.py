"""PEFT methods by name. Each is a :class:`~jaxpeft.methods.base.Method`: a mask plus, for prompt
methods, an adapter module that adds parameters."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.errors import UserError
from jaxpeft.methods.base import HEAD_PATTERN, Method
from jaxpeft.methods.bitfit import BitFit, Frozen, Full
from jaxpeft.methods.prefix import PrefixTuning, PTuningV2
from jaxpeft.methods.prompt import PromptTuning, PTuning

REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (Full, Frozen, BitFit, PromptTuning, PTuning, PrefixTuning, PTuningV2)}


def create(name: str, options: Mapping[str, Any] | None = None) -> Method:
    """Builds method ``name``, taking from ``options`` the fields it knows and ignoring the rest."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; known methods: {', '.join(REGISTRY)}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in (options or {}).items() if k in fields})


__all__ = ["HEAD_PATTERN", "Method", "REGISTRY", "create", "BitFit", "Frozen", "Full", "PromptTuning",
           "PTuning", "PrefixTuning", "PTuningV2"]
