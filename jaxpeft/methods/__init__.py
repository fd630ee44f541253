"""PEFT methods by name: the method plug-in point (:class:`~jaxpeft.methods.base.Method`).

Each method is one module here declaring its options, mask, model hooks, export, peft format and
mixed-batch family; :data:`REGISTRY` lists them (in the order ``--help`` and the docs show them).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxpeft.errors import UserError
from jaxpeft.methods.base import PROMPT_PATTERN, Method, module_pattern
from jaxpeft.methods.bitfit import BitFit, Frozen, Full
from jaxpeft.methods.bottleneck import BottleneckAdapters
from jaxpeft.methods.ia3 import IA3
from jaxpeft.methods.lora import LoRA
from jaxpeft.methods.prefix import PrefixTuning, PTuningV2
from jaxpeft.methods.prompt import PromptTuning, PTuning

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (
    Full, Frozen, BitFit, PromptTuning, PTuning, PrefixTuning, PTuningV2, LoRA, IA3, BottleneckAdapters)}
#: Names of earlier releases, read from old adapter folders and checkpoints.
ALIASES = {"adapter": "bottleneck"}


def create(name: str, options: Mapping[str, Any] | None = None, *, strict: bool = True) -> Method:
    """Builds method ``name`` with ``options``. An option it does not take is an error naming the
    method and the options it takes (``strict=False``: ignored instead)."""
    name = ALIASES.get(name, name)
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


def by_peft_type(peft_type: str | None) -> type[Method] | None:
    """The method that reads a folder of peft's ``peft_type`` (the first registered)."""
    return next((m for m in REGISTRY.values() if m.peft_type == peft_type and peft_type), None)


__all__ = ["ALIASES", "Method", "PROMPT_PATTERN", "REGISTRY", "all_options", "by_peft_type", "create",
           "module_pattern"]
