"""Full fine-tuning, Frozen (head only) and BitFit (bias terms only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpeft import masks
from jaxpeft.methods.base import Method


@dataclasses.dataclass
class Full(Method):
    """Every parameter trains (the usual fine-tuning baseline)."""

    name = "full"

    def trainable(self, params: Any) -> Any:
        return masks.match(params)


@dataclasses.dataclass
class Frozen(Method):
    """Only the task head trains; the encoder is frozen."""

    name = "frozen"

    def trainable(self, params: Any) -> Any:
        return masks.invert(masks.match(params))


@dataclasses.dataclass
class BitFit(Method):
    """Bias terms train (all of them, or the listed BitFit terms), plus the head.

    ``bitfit_terms``: comma-separated BitFit term names (``query,intermediate``) or ``None`` for
    every bias.
    """

    name = "bitfit"
    bitfit_terms: str | None = None

    def __post_init__(self):
        if self.bitfit_terms:  # fail on a typo before anything is loaded
            for t in self.bitfit_terms.split(","):
                if t.strip():
                    masks._canonical_term(t)

    def trainable(self, params: Any) -> Any:
        return masks.bitfit(params, self.bitfit_terms or None)
