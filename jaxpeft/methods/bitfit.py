"""Full fine-tuning, Frozen (head only) and BitFit (bias terms only)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.options import option


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
    bitfit_terms: str | None = option(
        None, "comma list of BitFit terms that train (query,key,value,attention_output,"
        "attention_layernorm,intermediate,output,output_layernorm or b_q..b_ln2; default: every bias)")

    def validate(self):
        if self.bitfit_terms:  # fail on a typo before anything is loaded
            for t in self.bitfit_terms.split(","):
                if t.strip():
                    try:
                        masks._canonical_term(t)
                    except masks.MaskError as e:
                        raise UserError(f"--bitfit_terms={self.bitfit_terms}: {e}") from None

    def trainable(self, params: Any) -> Any:
        return masks.bitfit(params, self.bitfit_terms or None)
