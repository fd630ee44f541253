"""What every PEFT method is: a mask over the params (plus, for prompt methods, added params)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn

from jaxpeft import masks
from jaxpeft.models.bert import BertConfig

#: The task head is trainable under every method.
HEAD_PATTERN = r"^classifier/"


@dataclasses.dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's CLI options."""

    name: ClassVar[str] = ""

    def adapter(self, config: BertConfig) -> nn.Module | None:
        """The module adding parameters (prompts, prefixes) to the model, if any."""
        return None

    def extra_positions(self) -> int:
        """How many positions the method adds to every sequence (virtual tokens)."""
        return 0

    def trainable(self, params: Any) -> Any:
        """The method's own trainable leaves, the task head not included."""
        raise NotImplementedError

    def mask(self, params: Any) -> Any:
        """The full trainable mask: the method's leaves plus the task head."""
        return masks.union(self.trainable(params), masks.match(params, include=HEAD_PATTERN))

    def init_params(self, params: Any, *, tokenizer: Any = None, rng: Any = None) -> Any:
        """Adjusts freshly initialised params after the pretrained weights are in (e.g. prompt
        initialisation from the vocabulary). Default: unchanged."""
        return params

    def export_params(self, params: Any) -> dict[str, Any]:
        """The arrays an exported adapter keeps, as ``{path: array}`` (``/``-joined param paths).

        Default: the trainable leaves. Methods with a reparameterisation (prefix MLP, P-tuning
        encoder) override this to return the computed prompts/prefixes instead.
        """
        return masks.flatten(masks.split(params, self.mask(params))[0])

    def for_inference(self) -> "Method":
        """The method whose params are exactly :meth:`export_params`'s paths (e.g. prompts held
        directly instead of produced by an encoder). Default: this method."""
        return self

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
