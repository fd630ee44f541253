"""Hugging Face peft's adapter format: its config fields and tensor names, and ours in the same files.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``, the file names
peft's ``save_pretrained`` writes and ``PeftModel.from_pretrained`` reads. For the methods peft has
(:data:`PEFT_TYPES`) both are in peft's own schema, so peft loads a jaxpeft adapter onto
transformers' ``BertForSequenceClassification`` and jaxpeft loads an adapter written by peft:

============ ============== ============================================ ==============================
method       ``peft_type``   tensors                                      shape
============ ============== ============================================ ==============================
prompt       PROMPT_TUNING  ``prompt_embeddings``                        ``[P, H]``
ptuning      P_TUNING       ``prompt_embeddings`` (the encoder's output)  ``[P, H]``
prefix,      PREFIX_TUNING  ``prompt_embeddings`` (past_key_values rows)  ``[P, 2 * layers * H]``
ptuning_v2
lora         LORA           ``base_model.model.bert.encoder.layer.N.      ``[r, in]``, ``[out, r]``
                            attention.self.query.lora_A.weight``, ...
                            ``lora_B.weight``
============ ============== ============================================ ==============================

The task head (and any ``modules_to_save``) is stored as peft stores its ``modules_to_save``:
``base_model.model.classifier.weight`` for LoRA, ``base_model.classifier.weight`` for the prompt
methods (peft wraps the transformers model one level less deep for them). A prefix-tuning row holds,
for each layer in turn, that layer's key then its value (``[L0 key, L0 value, L1 key, ...]``, each
``H = heads x head_dim`` wide), which is how peft's ``get_prompt`` splits it.

Methods peft lacks (full, frozen, bitfit, adapter) use the same two files, with transformers' names
for the tensors (``bert.encoder.layer.0.attention.self.query.bias``, ``classifier.weight``,
``bert.encoder.layer.0.output.adapter.down.weight``) and no ``peft_type``. Whatever peft cannot
hold -- the method and its options, the task, the label names, the base model's fingerprint, the
training settings -- is in one ``"jaxpeft"`` object of ``adapter_config.json`` (peft warns that it
does not know that key and ignores it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jaxpeft.errors import UserError
from jaxpeft.methods.base import Method
from jaxpeft.models.hf_weights import hf_name_to_path, path_to_hf_name

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
WEIGHTS_BIN = "adapter_model.bin"
TASK_TYPE = "SEQ_CLS"
#: peft adds these to ``modules_to_save`` of every SEQ_CLS model (the head's possible names).
HEAD_MODULES = ("classifier", "score")
#: The peft type of each method peft has, by the name of the method that trained the adapter.
PEFT_TYPES = {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING", "prefix": "PREFIX_TUNING",
              "ptuning_v2": "PREFIX_TUNING", "lora": "LORA"}
PROMPT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
SUPPORTED = ("LORA", "PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
PROMPT_INITS = {"random": "RANDOM", "sample_vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def name_prefix(peft_type: str | None) -> str:
    """What peft puts in front of the transformers model's names in its files."""
    if peft_type is None:
        return ""
    return "base_model." if peft_type in PROMPT_TYPES else "base_model.model."


# ----------------------------------------------------------------------------- tensor names


def hf_name(path: str) -> tuple[str, bool]:
    """Our param path -> ``(transformers-style name, transpose?)``:
    ``bert/encoder/layer_0/attention/self/query_lora/lora_A/kernel`` ->
    ``('bert.encoder.layer.0.attention.self.query.lora_A.weight', True)``."""
    p = re.sub(r"/(\w+)_lora/(lora_[AB])/kernel$", r"/\1/\2/kernel", path)
    return path_to_hf_name(p), path.endswith("/kernel")


def param_path(name: str) -> tuple[str, bool] | None:
    """Inverse of :func:`hf_name` (``None`` for a name that is not a BERT classifier's)."""
    mapped = hf_name_to_path(name)
    if mapped is None:
        return None
    rel, transpose = mapped
    path = rel if rel.startswith("classifier/") else "bert/" + rel
    return re.sub(r"/(\w+)/(lora_[AB])/kernel$", r"/\1_lora/\2/kernel", path), transpose


def prefix_rows(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[layers, P, H]`` keys and values -> peft's ``[P, 2 * layers * H]`` rows."""
    n, p, h = keys.shape
    return np.stack([keys, values], axis=1).transpose(2, 0, 1, 3).reshape(p, 2 * n * h)


def prefix_kv(rows: np.ndarray, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`prefix_rows`."""
    p, width = rows.shape
    h = width // (2 * num_layers)
    kv = rows.reshape(p, num_layers, 2, h).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1])


def to_tensors(arrays: Mapping[str, np.ndarray], peft_type: str | None) -> dict[str, np.ndarray]:
    """An export (``{param path: array}``) -> ``{tensor name: array}`` in the file's layout."""
    prefix = name_prefix(peft_type)
    out: dict[str, np.ndarray] = {}
    for path, a in arrays.items():
        if path == "adapter/prompt_embeddings":
            out["prompt_embeddings"] = a
        elif path in ("adapter/prefix_keys", "adapter/prefix_values"):
            if path.endswith("keys"):
                out["prompt_embeddings"] = prefix_rows(a, arrays["adapter/prefix_values"])
        elif path.startswith("adapter/"):
            raise ValueError(f"{path}: an input-level adapter param the adapter format has no name for "
                             "(export the method's for_inference() params)")
        else:
            name, transpose = hf_name(path)
            out[prefix + name] = a.T if transpose else a
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def from_tensors(tensors: Mapping[str, np.ndarray], peft_type: str | None, num_layers: int | None,
                 source: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_tensors`: ``{param path: array}``. ``num_layers`` splits a prefix."""
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        t = np.asarray(t, dtype=np.float32)
        if name == "prompt_embeddings":
            if peft_type == "PREFIX_TUNING":
                if t.ndim != 2 or not num_layers or t.shape[1] % (2 * num_layers):
                    raise UserError(f"{source}: prompt_embeddings has shape {tuple(t.shape)}, which is not "
                                    f"[P, 2 x {num_layers} layers x hidden] (an adapter of another base model?)")
                out["adapter/prefix_keys"], out["adapter/prefix_values"] = prefix_kv(t, num_layers)
            else:
                out["adapter/prompt_embeddings"] = t
            continue
        stripped = name
        for p in ("base_model.model.", "base_model."):
            if stripped.startswith(p):
                stripped = stripped[len(p):]
                break
        mapped = param_path(stripped)
        if mapped is None:
            raise UserError(f"{source}: tensor {name!r} is not one jaxpeft knows (not a BERT sequence "
                            "classifier's, nor LoRA's or a prompt's)")
        path, transpose = mapped
        out[path] = np.ascontiguousarray(t.T) if transpose else t
    return out


# ----------------------------------------------------------------------------- adapter_config.json


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _targets(value: str) -> list[str] | str:
    from jaxpeft.methods.lora import parse_targets

    t = parse_targets(value)
    return t if isinstance(t, str) else list(t)


def peft_fields(trained: Method, *, hidden_size: int | None, num_layers: int | None,
                num_attention_heads: int | None, base_model: str, modules_to_save: tuple[str, ...]) -> dict[str, Any]:
    """The peft fields of ``adapter_config.json`` for an adapter trained by ``trained``: peft's
    schema for the methods peft has, the shared ones (task type, base model) for the others."""
    peft_type = PEFT_TYPES.get(trained.name)
    cfg: dict[str, Any] = {"task_type": TASK_TYPE, "base_model_name_or_path": base_model, "revision": None,
                           "inference_mode": True}
    if peft_type is None:
        return cfg
    cfg.update(peft_type=peft_type, auto_mapping=None,
               modules_to_save=[*modules_to_save, *HEAD_MODULES])
    o = trained.options()
    if peft_type in PROMPT_TYPES:
        cfg.update(num_virtual_tokens=int(o["num_virtual_tokens"]), token_dim=hidden_size,
                   num_transformer_submodules=1, num_attention_heads=num_attention_heads, num_layers=num_layers)
    if peft_type == "PROMPT_TUNING":
        text = o.get("prompt_init") == "text"
        cfg.update(prompt_tuning_init=PROMPT_INITS.get(o.get("prompt_init"), "RANDOM"),
                   prompt_tuning_init_text=o.get("prompt_init_text") if text else None,
                   tokenizer_name_or_path=base_model if text else None, tokenizer_kwargs=None)
    elif peft_type == "P_TUNING":
        width = trained.encoder(hidden_size).encoder_hidden_size if hidden_size else o.get("encoder_hidden_size")
        cfg.update(encoder_reparameterization_type=str(o["encoder_type"]).upper(), encoder_hidden_size=width,
                   encoder_num_layers=int(o["encoder_num_layers"]), encoder_dropout=0.0)
    elif peft_type == "PREFIX_TUNING":
        cfg.update(encoder_hidden_size=int(o["encoder_hidden_size"]), prefix_projection=bool(o["prefix_projection"]))
    elif peft_type == "LORA":
        cfg.update(r=int(o["lora_r"]), lora_alpha=_number(o["lora_alpha"]), lora_dropout=float(o["lora_dropout"]),
                   target_modules=_targets(o["target_modules"]), bias="none", fan_in_fan_out=False,
                   init_lora_weights=True, use_rslora=False, use_dora=False, lora_bias=False,
                   layers_to_transform=None, layers_pattern=None, rank_pattern={}, alpha_pattern={},
                   exclude_modules=None)
    return cfg


#: LoRA config fields jaxpeft cannot honour, with the value that means "off".
_LORA_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none",
                     "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                     "alpha_pattern": {}, "exclude_modules": None, "trainable_token_indices": None,
                     "target_parameters": None, "use_qalora": False, "layer_replication": None}


def method_from_peft(cfg: Mapping[str, Any], where: str) -> tuple[Method, tuple[str, ...]]:
    """The inference method and extra ``modules_to_save`` of a folder written by peft."""
    from jaxpeft import methods

    peft_type = cfg.get("peft_type")
    if peft_type not in SUPPORTED:
        raise UserError(f"{where}: peft_type {peft_type!r} is not supported; jaxpeft reads "
                        f"{', '.join(SUPPORTED)} adapters")
    task_type = cfg.get("task_type")
    if task_type not in (None, TASK_TYPE):
        raise UserError(f"{where}: task_type {task_type!r}; jaxpeft reads sequence-classification "
                        f"adapters (task_type {TASK_TYPE})")
    modules = tuple(dict.fromkeys(m for m in (cfg.get("modules_to_save") or []) if m not in HEAD_MODULES))
    try:
        if peft_type in PROMPT_TYPES:
            if int(cfg.get("num_transformer_submodules") or 1) != 1:
                raise UserError(f"{where}: num_transformer_submodules={cfg['num_transformer_submodules']}; "
                                "an encoder classifier has 1")
            p = int(cfg["num_virtual_tokens"])
            if peft_type == "PREFIX_TUNING":    # transformers' BERT numbers the input after the prefix
                return methods.create("prefix", {"num_virtual_tokens": p, "prefix_projection": False,
                                                 "prefix_dropout": 0.0, "shift_positions": True}), modules
            return methods.create("prompt", {"num_virtual_tokens": p, "prompt_position": "front"}), modules
        for key, off in _LORA_UNSUPPORTED.items():
            if cfg.get(key) not in (None, off):
                raise UserError(f"{where}: {key}={cfg[key]!r} is not supported by jaxpeft's LoRA")
        targets = cfg.get("target_modules")
        if isinstance(targets, list):
            targets = ",".join(targets)
        if not targets:
            raise UserError(f"{where}: no target_modules")
        return methods.create("lora", {"lora_r": int(cfg["r"]), "lora_alpha": float(cfg["lora_alpha"]),
                                       "lora_dropout": float(cfg.get("lora_dropout") or 0.0),
                                       "target_modules": targets}), modules
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
