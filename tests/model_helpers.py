"""Short ways to build BERT task models and their losses in tests."""

from __future__ import annotations

from typing import Any

from jaxpeft.compute import EXACT
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.heads import Head
from jaxpeft.models.loading import build_module, load_classifier  # noqa: F401  (re-exported for tests)
from jaxpeft.tasks.base import sequence_loss
from jaxpeft.training import steps

HEADS = ("classifier",)


def classifier(config: Any, num_labels: int = 2, method: Any = None, compute: Any = EXACT, pooling: str = "cls"):
    """BERT with a sequence-classification head and ``method``'s hooks and prompt."""
    return build_module(BERT, config, Head("sequence", num_labels, pooling), method, compute)


def mask(method: Any, params: Any, modules_to_save=()) -> Any:
    return method.mask(params, BERT, HEADS, modules_to_save)


def seq_loss(module: Any, regression: bool = False) -> steps.LossFn:
    """The sequence-classification loss function of ``module`` (what a single-task run trains)."""
    return steps.model_loss(module, lambda logits, b: sequence_loss(logits, b["labels"], b["weights"], regression))
