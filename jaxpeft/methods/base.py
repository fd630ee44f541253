"""What every PEFT method is: a mask over the params (plus, for some methods, added params).

A method is a dataclass whose fields are its options, each declared with
:func:`jaxpeft.options.option` (help text and check); the command line builds one flag per option,
and a flag the chosen method does not take is an error.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Sequence

import flax.linen as nn

from jaxpeft import masks, options
from jaxpeft.models.bert import NO_EXTRAS, BertConfig, Extras

#: The task head is trainable under every method.
HEAD_PATTERN = r"^classifier/"


def module_pattern(name: str) -> str:
    """The regex of the params of module ``name`` (peft's ``modules_to_save`` names: ``pooler``,
    ``classifier``, or a longer dotted path such as ``bert.pooler``)."""
    parts = [p for p in re.split(r"[./]", name.strip()) if p]
    return r"(^|/)" + "/".join(re.escape(p) for p in parts) + r"/"


@dataclasses.dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = ""
    #: whether packed rows (``--packing``) work with this method
    supports_packing: ClassVar[bool] = True
    #: regex of the params the method adds inside the encoder (``bert/...``: LoRA, bottleneck
    #: adapters): not in the pretrained checkpoint, not part of the base model's fingerprint
    added: ClassVar[str | None] = None

    def __post_init__(self):
        options.check(self)
        self.validate()

    def validate(self) -> None:
        """Checks across options (each option's own range is checked by its field)."""

    def adapter(self, config: BertConfig) -> nn.Module | None:
        """The module adding input-level parameters (prompts, prefixes) to the model, if any."""
        return None

    def extras(self, config: BertConfig) -> Extras:
        """Modules the method adds inside every layer (LoRA, bottleneck adapters)."""
        return NO_EXTRAS

    def extra_positions(self) -> int:
        """How many positions the method adds to every sequence (virtual tokens)."""
        return 0

    def trainable(self, params: Any) -> Any:
        """The method's own trainable leaves, the task head not included."""
        raise NotImplementedError

    def mask(self, params: Any, modules_to_save: Sequence[str] = ()) -> Any:
        """The full trainable mask: the method's leaves, the task head and ``modules_to_save``."""
        head = [HEAD_PATTERN] + [module_pattern(m) for m in modules_to_save]
        return masks.union(self.trainable(params), masks.match(params, include=head))

    def init_params(self, params: Any, *, tokenizer: Any = None, rng: Any = None) -> Any:
        """Adjusts freshly initialised params after the pretrained weights are in (e.g. prompt
        initialisation from the vocabulary). Default: unchanged."""
        return params

    def export_params(self, params: Any, modules_to_save: Sequence[str] = ()) -> dict[str, Any]:
        """The arrays an exported adapter keeps, as ``{path: array}`` (``/``-joined param paths).

        Default: the trainable leaves. Methods with a reparameterisation (prefix MLP, P-tuning
        encoder) override this to return the computed prompts/prefixes instead.
        """
        return masks.flatten(masks.split(params, self.mask(params, modules_to_save))[0])

    def head_params(self, params: Any, modules_to_save: Sequence[str] = ()) -> dict[str, Any]:
        """The head's and ``modules_to_save``'s leaves, by path."""
        head = [HEAD_PATTERN] + [module_pattern(m) for m in modules_to_save]
        return masks.flatten(masks.split(params, masks.match(params, include=head))[0])

    def for_inference(self) -> "Method":
        """The method whose params are exactly :meth:`export_params`'s paths (e.g. prompts held
        directly instead of produced by an encoder). Default: this method."""
        return self

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
