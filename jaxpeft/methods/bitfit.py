"""Full fine-tuning, Frozen (head only) and BitFit (bias terms only, Ben Zaken et al. 2022)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.family import Family
from jaxpeft.options import option


@dataclasses.dataclass
class Full(Method):
    """Every parameter trains (the usual fine-tuning baseline)."""

    name = "full"
    summary = "everything"
    trains_matrices = True

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.match(params)


@dataclasses.dataclass
class Frozen(Method):
    """Only the task head trains; the encoder is frozen."""

    name = "frozen"
    summary = "nothing but the head"

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.invert(masks.match(params))

    def train_flops(self, forward: float, attention: float) -> float:
        return forward + attention   # no gradient reaches the encoder


@dataclasses.dataclass
class BitFit(Method):
    """Bias terms train (all of them, or the listed BitFit terms), plus the head.

    ``bitfit_terms``: comma-separated BitFit term names of the model's family (BERT:
    ``query,intermediate`` or the paper's ``b_q,b_m2``) or ``None`` for every bias.
    """

    name = "bitfit"
    summary = "bias terms: all, or --bitfit_terms=query,intermediate"
    mix = "bitfit"
    bitfit_terms: str | None = option(
        None, "comma list of BitFit terms that train (BERT-like: query,key,value,attention_output,"
        "attention_layernorm,intermediate,output,output_layernorm or b_q..b_ln2; default: every bias)")

    def check_model(self, params: Any, family: Family) -> None:
        if not any(p.rsplit("/", 1)[-1] == "bias" and p.startswith(family.prefix + "/") for p in masks.paths(params)):
            raise UserError(f"--method=bitfit: the {family.name} encoder has no bias terms to train")
        if self.bitfit_terms:
            try:
                self.trainable(params, family)
            except masks.MaskError as e:
                raise UserError(f"--bitfit_terms={self.bitfit_terms}: {e}") from None

    def trainable(self, params: Any, family: Family) -> Any:
        return masks.bitfit(params, self.bitfit_terms or None, table=family.bitfit_terms or None)
