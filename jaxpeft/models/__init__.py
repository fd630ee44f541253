"""Encoder families (the model plug-in point), the task model, and loading from Hugging Face checkpoints.

:data:`FAMILIES` is the registry: each family module declares one
:class:`~jaxpeft.models.family.Family`, and ``config.json``'s ``model_type`` picks it
(:func:`family_for`).
"""

from __future__ import annotations

from jaxpeft.errors import UserError
from jaxpeft.models import bert, distilbert, electra, mpnet, roberta
from jaxpeft.models import deberta, modernbert
from jaxpeft.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (bert.FAMILY, roberta.FAMILY, electra.FAMILY, distilbert.FAMILY,
                                                     mpnet.FAMILY, deberta.FAMILY, modernbert.FAMILY)}


def family_for(model_type: str | None, where: str = "the model") -> Family:
    """The family that reads ``config.json``'s ``model_type`` (one line naming the supported ones
    otherwise)."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise UserError(f"{where} is a {model_type!r} model; jaxpeft supports these model types: {known}")


__all__ = ["FAMILIES", "Family", "family_for"]
