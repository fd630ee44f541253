"""Hugging Face peft's adapter format: its config fields and tensor names, and ours in the same files.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, the file names
peft's ``save_pretrained`` writes and ``PeftModel.from_pretrained`` reads. For a method peft has
(its :attr:`~jaxpeft.methods.base.Method.peft_type`: prompt tuning, P-tuning, prefix tuning, LoRA
with DoRA and rsLoRA, IA3) both are in peft's own schema, so peft loads a jaxpeft adapter onto
transformers' model of the family and jaxpeft loads an adapter peft wrote. Each method names its own
tensors (:meth:`~jaxpeft.methods.base.Method.peft_name`: ``prompt_embeddings``, ``...query.lora_A.weight``,
``...key.ia3_l``); every other param (the task head, ``modules_to_save``, BitFit's biases) goes by
transformers' name of its path (:func:`jaxpeft.models.family.hf_name`).

peft puts ``base_model.model.`` in front of the transformers model's names (``base_model.`` for the
prompt methods, whose wrapper is one level less deep) and adds the task head to ``modules_to_save``.
Methods peft lacks (full, frozen, bitfit, bottleneck) use the same two files, with transformers' names
and no ``peft_type``. What peft cannot hold -- the method and its options, the task, the label names,
the base model's fingerprint, the training settings -- is in one ``"jaxpeft"`` object of
``adapter_config.json`` (peft warns that it does not know that key and ignores it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.family import Family, canonical_name, hf_name

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
#: peft's wrappers of input-level methods sit one level less deep.
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
#: peft adds these to ``modules_to_save`` of every SEQ_CLS model (the head's possible names).
SEQ_CLS_HEADS = ("classifier", "score")
#: peft's task types by our task kind.
TASK_TYPES = {"sequence": "SEQ_CLS", "token": "TOKEN_CLS", "span": "QUESTION_ANS"}


def name_prefix(peft_type: str | None) -> str:
    """What peft puts in front of the transformers model's names in its files."""
    if peft_type is None:
        return ""
    return "base_model." if peft_type in PROMPT_TYPES else "base_model.model."


def supported() -> list[str]:
    from jaxpeft import methods

    return sorted({m.peft_type for m in methods.REGISTRY.values() if m.peft_type})


# ----------------------------------------------------------------------------- tensors


def to_tensors(arrays: Mapping[str, np.ndarray], method: Method, family: Family) -> dict[str, np.ndarray]:
    """An export (``{param path: array}``) -> ``{tensor name: array}`` in the file's layout."""
    prefix = name_prefix(method.peft_type)
    out: dict[str, np.ndarray] = {}
    for path in arrays:
        own = method.peft_name(path, arrays, family)
        if own is not None:
            out.update({k if k == "prompt_embeddings" else prefix + k: v for k, v in own.items()})
            continue
        if path.startswith("prompt/"):
            raise ValueError(f"{path}: a prompt param the adapter format has no name for (export the method's "
                             "for_inference() params)")
        name, transpose = hf_name(path)
        out[prefix + name] = np.asarray(arrays[path]).T if transpose else np.asarray(arrays[path])
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_tensors(tensors: Mapping[str, np.ndarray], method: type[Method] | Method, config: Any,
                 names: Mapping[str, tuple[str, bool]], source: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_tensors`: ``{param path: array}``. ``names`` is the model's table of
    transformers' names (:func:`jaxpeft.models.family.name_table`) for everything not the method's own."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        t = np.asarray(t, dtype=np.float32)
        stripped = re.sub(r"^base_model\.(model\.)?", "", name)
        try:
            own = method.from_peft_tensor(stripped, t, config)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        if own is not None:
            out.update(own)
            continue
        hit = names.get(canonical_name(stripped))
        if hit is None:
            raise UserError(f"{source}: tensor {name!r} is not one of this model's parameters nor of the "
                            f"method's (an adapter of another model family or task?)")
        path, transpose = hit
        out[path] = np.ascontiguousarray(t.T) if transpose else t
    return out


# ----------------------------------------------------------------------------- adapter_config.json


def peft_fields(trained: Method, family: Family, config: Any, *, base_model: str, task_kind: str,
                modules_to_save: tuple[str, ...], heads: tuple[str, ...]) -> dict[str, Any]:
    """The peft fields of ``adapter_config.json`` for an adapter trained by ``trained``: peft's
    schema for the methods peft has, the shared ones (task type, base model) for the others."""
    cfg: dict[str, Any] = {"task_type": TASK_TYPES[task_kind], "base_model_name_or_path": base_model,
                           "revision": None, "inference_mode": True}
    peft_type = trained.peft_type
    if peft_type is None:
        return cfg
    heads_saved = SEQ_CLS_HEADS if task_kind == "sequence" else heads
    cfg.update(peft_type=peft_type, auto_mapping=None,
               modules_to_save=[*modules_to_save, *dict.fromkeys((*heads, *heads_saved))])
    if peft_type in PROMPT_TYPES:
        cfg.update(num_virtual_tokens=int(trained.num_virtual_tokens), token_dim=config.hidden_size,
                   num_transformer_submodules=1, num_attention_heads=config.num_attention_heads,
                   num_layers=config.num_hidden_layers)
        if peft_type == "PROMPT_TUNING" and getattr(trained, "prompt_init", None) == "text":
            cfg["tokenizer_name_or_path"] = base_model
    cfg.update(trained.peft_config(family, config))
    return cfg


def method_from_peft(cfg: Mapping[str, Any], where: str) -> tuple[Method, tuple[str, ...]]:
    """The inference method and extra ``modules_to_save`` of a folder written by peft."""
    from jaxpeft import methods

    peft_type = cfg.get("peft_type")
    cls = methods.by_peft_type(peft_type)
    if cls is None:
        raise UserError(f"{where}: peft_type {peft_type!r} is not supported; jaxpeft reads "
                        f"{', '.join(supported())} adapters")
    task_type = cfg.get("task_type")
    if task_type not in (None, *TASK_TYPES.values()):
        raise UserError(f"{where}: task_type {task_type!r}; jaxpeft reads {', '.join(TASK_TYPES.values())} adapters")
    heads = ("classifier", "score", "qa_outputs", "pre_classifier")
    modules = tuple(dict.fromkeys(m for m in (cfg.get("modules_to_save") or []) if m not in heads))
    try:
        if peft_type in PROMPT_TYPES and int(cfg.get("num_transformer_submodules") or 1) != 1:
            raise UserError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']}; an encoder "
                            "has 1")
        return cls.from_peft(cfg, where), modules
    except KeyError as e:
        raise UserError(f"{where}: missing key {e.args[0]!r} of a {peft_type} config") from None
    except UserError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith(where) else f"{where}: {msg}") from None


#: peft's shape fields and the base model's config fields they must equal.
SHAPE_FIELDS = {"token_dim": "hidden_size", "num_layers": "num_hidden_layers",
                "num_attention_heads": "num_attention_heads"}


def check_shapes(cfg: Mapping[str, Any], model_config: Any, base: str, where: str) -> None:
    """Raises :class:`UserError` where peft's shape fields do not fit the base model."""
    for field, ours in SHAPE_FIELDS.items():
        v = cfg.get(field)
        if v is not None and v != getattr(model_config, ours):
            raise UserError(f"{where}: the adapter is for a model with {field}={v}, but the base model {base} "
                            f"has {ours}={getattr(model_config, ours)} (an adapter of another base model?)")
