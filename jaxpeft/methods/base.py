"""The method plug-in point: what a PEFT method is and everything the rest of jaxpeft asks of it.

A method is a dataclass whose fields are its options, each declared with
:func:`jaxpeft.options.option` (help text and check); the command line builds one flag per option.
Everything else about it is declared here, with the method, so that adding one is one module:

* **what trains**: :meth:`Method.trainable` (a mask over the params; the task head and
  ``modules_to_save`` are added by :meth:`Method.mask`);
* **what it adds to the model**: :meth:`Method.hooks` (modules at the encoder's dense layers and
  sublayers, :mod:`jaxpeft.models.layers`) and :meth:`Method.prompt_module` (virtual tokens,
  prefixes; params under ``prompt/``), the regex :attr:`Method.added` of its params inside the
  encoder, and :meth:`Method.init_params` once pretrained weights are in;
* **what it exports**: :meth:`Method.export_params` and :meth:`Method.for_inference`;
* **peft's format**: :attr:`Method.peft_type`, :meth:`Method.peft_config`, :meth:`Method.peft_name`
  and :meth:`Method.from_peft_tensor` for its own tensors, :meth:`Method.from_peft` for a folder
  peft wrote;
* **mixed batches**: :attr:`Method.mix` (which adapters share a batch) and :attr:`Method.mix_same`
  (options that must agree among them);
* **cost**: :meth:`Method.train_flops` (the step benchmark's FLOP count).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, Mapping, Sequence

import flax.linen as nn
import numpy as np

from jaxpeft import masks, options
from jaxpeft.models.family import Family, hf_name
from jaxpeft.models.layers import NO_HOOKS, Hooks

#: The prompt module's params (prompt tuning, P-tuning, prefixes).
PROMPT_PATTERN = r"^prompt/"


def module_pattern(name: str) -> str:
    """The regex of the params of module ``name`` (peft's ``modules_to_save`` names: ``pooler``,
    ``classifier``, or a longer dotted path such as ``bert.pooler``)."""
    parts = [p for p in re.split(r"[./]", name.strip()) if p]
    return r"(^|/)" + "/".join(re.escape(p) for p in parts) + r"/"


def head_patterns(heads: Sequence[str], modules_to_save: Sequence[str] = ()) -> list[str]:
    """Regexes of the head's top-level modules (``classifier``, ``qa_outputs``) and of the
    ``modules_to_save`` (peft's names, anywhere: ``pooler``): they train under every method."""
    return [r"^" + re.escape(m) + r"/" for m in heads] + [module_pattern(m) for m in modules_to_save]


@dataclasses.dataclass
class Method:
    """Base class. Subclasses are dataclasses whose fields are the method's options."""

    name: ClassVar[str] = ""
    #: one line for ``--help`` and the docs
    summary: ClassVar[str] = ""
    #: whether packed rows (``--packing``) work with this method
    supports_packing: ClassVar[bool] = True
    #: regex of the params the method adds inside the encoder (LoRA, IA3, bottleneck adapters):
    #: not in the pretrained checkpoint, not part of the base model's fingerprint
    added: ClassVar[str | None] = None
    #: peft's ``peft_type`` for this method's adapters (``None``: peft has no such method)
    peft_type: ClassVar[str | None] = None
    #: which adapters share one batch (the exported method's family; ``None``: load it alone)
    mix: ClassVar[str | None] = None
    #: options that must agree among the adapters of one mixed batch
    mix_same: ClassVar[tuple[str, ...]] = ()
    #: whether a method trains weight matrices (their gradients cost a third of the step)
    trains_matrices: ClassVar[bool] = False
    #: the per-task schedule its configs follow (``jaxpeft.configs.SCHEDULES``)
    schedule: ClassVar[str] = "module"

    def __post_init__(self):
        options.check(self)
        self.validate()

    def validate(self) -> None:
        """Checks across options (each option's own range is checked by its field)."""

    # -- the model --------------------------------------------------------------------------------
    def hooks(self, family: Family, config: Any) -> Hooks:
        """The modules the method puts at the encoder's dense layers and sublayers."""
        return NO_HOOKS

    def prompt_module(self, family: Family, config: Any) -> nn.Module | None:
        """The module adding input-level parameters (virtual tokens, prefixes), named ``prompt``."""
        return None

    def extra_positions(self) -> int:
        """How many positions the method adds to every sequence (virtual tokens)."""
        return 0

    def extra_keys(self) -> int:
        """How many keys the method puts in front of every attention layer's own (prefixes)."""
        return 0

    def check_model(self, params: Any, family: Family) -> None:
        """Raises :class:`~jaxpeft.errors.UserError` where the method does not fit the built model
        (a target module that names no layer of it, say)."""

    # -- training ---------------------------------------------------------------------------------
    def trainable(self, params: Any, family: Family) -> Any:
        """The method's own trainable leaves, the task head not included."""
        raise NotImplementedError

    def mask(self, params: Any, family: Family, heads: Sequence[str] = ("classifier",),
             modules_to_save: Sequence[str] = ()) -> Any:
        """The full trainable mask: the method's leaves plus the head's top-level modules
        (``heads``) and ``modules_to_save``."""
        return masks.union(self.trainable(params, family),
                           masks.match(params, include=head_patterns(heads, modules_to_save), allow_empty=True))

    def init_params(self, params: Any, family: Family, *, tokenizer: Any = None, rng: Any = None) -> Any:
        """Adjusts freshly initialised params once the pretrained weights are in (a prompt from the
        vocabulary, DoRA's magnitudes from the weights). Default: unchanged."""
        return params

    # -- export -----------------------------------------------------------------------------------
    def export_params(self, params: Any, family: Family, heads: Sequence[str] = ("classifier",),
                      modules_to_save: Sequence[str] = ()) -> dict[str, Any]:
        """The arrays an exported adapter keeps, as ``{path: array}`` (``/``-joined param paths).

        Default: the trainable leaves. Methods with a reparameterisation (prefix MLP, P-tuning
        encoder) return the computed prompts/prefixes instead.
        """
        return masks.flatten(masks.split(params, self.mask(params, family, heads, modules_to_save))[0])

    def head_params(self, params: Any, heads: Sequence[str], modules_to_save: Sequence[str] = ()) -> dict[str, Any]:
        """The head's and ``modules_to_save``'s leaves, by path."""
        return masks.flatten(masks.split(params, masks.match(params, include=head_patterns(heads, modules_to_save)))[0])

    def for_inference(self) -> "Method":
        """The method whose params are exactly :meth:`export_params`'s paths (prompts held directly
        instead of produced by an encoder, say). Default: this method."""
        return self

    def options(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def mix_values(self, family: Family | None) -> dict[str, Any]:
        """The values of :attr:`mix_same` as adapters of one mixed batch compare them (``family``:
        the base model's where known, for options whose default is the family's)."""
        return {o: getattr(self, o) for o in self.mix_same}

    # -- peft's format ----------------------------------------------------------------------------
    def peft_config(self, family: Family, config: Any) -> dict[str, Any]:
        """The method's own fields of peft's ``adapter_config.json`` (``peft_type`` and the shared
        fields are added by :mod:`jaxpeft.adapters.peft_format`)."""
        return {}

    def peft_name(self, path: str, arrays: Mapping[str, np.ndarray], family: Family
                  ) -> dict[str, np.ndarray] | None:
        """peft's tensors for one of the method's own params (``None``: the generic rule, the
        transformers name of the path)."""
        return None

    @classmethod
    def from_peft_tensor(cls, name: str, tensor: np.ndarray, config: Any) -> dict[str, np.ndarray] | None:
        """Our params of one peft tensor of this method (``None``: not one of its own)."""
        return None

    @classmethod
    def from_peft(cls, cfg: Mapping[str, Any], where: str) -> "Method":
        """The inference method of a folder peft wrote with :attr:`peft_type`."""
        raise NotImplementedError

    # -- cost -------------------------------------------------------------------------------------
    def train_flops(self, forward: float, attention: float) -> float:
        """Matmul FLOPs of a train step, from the forward's projection and MLP FLOPs (``forward``)
        and its attention FLOPs: the input gradient of everything (2x), no weight gradient of frozen
        matrices; methods that train matrices add their weight gradient (3x)."""
        if self.trains_matrices:
            return 3 * (forward + attention)
        return 2 * forward + 3 * attention


def generic_peft_name(path: str) -> tuple[str, bool]:
    """The transformers name of one of our params (``classifier/kernel`` ->
    ``('classifier.weight', True)``)."""
    return hf_name(path)
