"""What the encoder-family tests share: tiny tokenizers of each kind, tiny transformers models saved
with them, our params with a transformers model's weights (head included), peft adapters copied
into our params, and the comparisons (float32, 1e-4)."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpeft import masks, methods, runtime
from jaxpeft.adapters import peft_format
from jaxpeft.compute import EXACT
from jaxpeft.models.family import name_table
from jaxpeft.models.heads import Head
from jaxpeft.models.layers import Prompt
from jaxpeft.models.loading import build_module, param_shapes

ATOL = 1e-4
#: every check pads to this length
LENGTH = 56
#: small sizes with odd widths (head_dim 12: not a Pallas kernel size, so the fallback is exercised)
TINY = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80, initializer_range=0.2)

SINGLES = ["it 's a charming and often affecting journey .", "unflinchingly bleak and desperate",
           "The drain is clogged with hair. It has to be cleaned, and quickly, before the guests arrive.", "Yes."]
PAIRS = [("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
         ("Three dogs.", "A cat sleeps on the warm windowsill while the rain keeps falling outside."),
         ("The drain is clogged with hair.", "The hair has to be cleaned."),
         ("unflinchingly bleak and desperate", "it 's a charming journey .")]
PREFIX_TEXT = "the weather was cold that day ."
#: the tests' own persistent compilation cache (conftest points it into the test cache): a second
#: run of a family's tests compiles nothing
runtime.enable_compilation_cache()
#: the parity numbers of this run: (family, what) -> max abs diff (each also printed)
RESULTS: dict[tuple[str, str], float] = {}


def quiet():
    warnings.simplefilter("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


# ----------------------------------------------------------------------------- tokenizers


def corpus(glue: Path | None, n: int = 400) -> list[str]:
    texts = SINGLES + [t for p in PAIRS for t in p] + [PREFIX_TEXT]
    if glue is not None:
        for line in (glue / "RTE" / "train.tsv").read_text().splitlines()[1:n]:
            texts += line.split("\t")[1:3]
    return texts


def bpe_tokenizer(d: Path, texts: Sequence[str], vocab_size: int = 600) -> None:
    """A byte-level BPE tokenizer of RoBERTa's kind (``<s>``=0, ``<pad>``=1, ``</s>``=2; pairs
    ``<s> a </s></s> b </s>``), saved by transformers' ``RobertaTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=True,
                                                      add_prefix_space=False)
    RobertaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                         unk_token="<unk>", pad_token="<pad>", mask_token="<mask>").save_pretrained(str(d))


def copy_wordpiece(d: Path, minilm_dir: Path) -> None:
    """The bundled MiniLM's WordPiece tokenizer (BERT's specials, ``[PAD]`` = 0)."""
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir / f).is_file():
            shutil.copy(minilm_dir / f, d / f)


def mpnet_tokenizer(d: Path, minilm_dir: Path) -> int:
    """A WordPiece tokenizer of MPNet's kind (MiniLM's word pieces behind ``<s>``=0, ``<pad>``=1,
    ``</s>``=2, ``[UNK]``=3; ``<mask>`` last), saved by transformers' ``MPNetTokenizer``; returns
    the vocabulary size."""
    from transformers import MPNetTokenizer

    words = [w for w in (minilm_dir / "vocab.txt").read_text().splitlines() if not w.startswith("[")]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "[UNK]"] + words + ["<mask>"])}
    MPNetTokenizer(vocab=vocab).save_pretrained(str(d))
    return len(vocab)


def encode(tok: Any, texts: Sequence[str] | Sequence[tuple[str, str]], length: int = LENGTH) -> dict[str, np.ndarray]:
    """transformers' encoding of sentences or pairs, padded to ``length`` (one shape for every
    check: compiled once): int32 ``input_ids``, ``attention_mask``, ``token_type_ids`` (zeros
    where the tokenizer gives none)."""
    kw = dict(padding="max_length", max_length=length, truncation=True, return_tensors="np")
    if isinstance(texts[0], tuple):
        enc = tok([a for a, _ in texts], [b for _, b in texts], **kw)
    else:
        enc = tok(list(texts), **kw)
    out = {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask")}
    out["token_type_ids"] = np.asarray(enc.get("token_type_ids", np.zeros_like(out["input_ids"])), np.int32)
    assert (out["attention_mask"] == 0).any() and (out["attention_mask"].sum(1) < length).all()
    return out


def torch_inputs(enc: dict[str, np.ndarray], keys: Sequence[str] = ("input_ids", "attention_mask")) -> dict:
    import torch

    return {k: torch.tensor(enc[k], dtype=torch.long) for k in keys}


# ----------------------------------------------------------------------------- models and params


@dataclasses.dataclass
class Built:
    """A task model of a checkpoint's family and config, without params (no init is compiled:
    every param comes from a transformers or peft model)."""

    family: Any
    config: Any
    module: Any
    shapes: Any
    tokenizer: Any


def build(model_dir: Path, head: Head, method: Any = None, compute: Any = EXACT) -> "Built":
    from jaxpeft.data.tokenizing import Tokenizer
    from jaxpeft.models import hf_weights

    family, config = hf_weights.load_config(Path(model_dir))
    module = build_module(family, config, head, method, compute)
    return Built(family, config, module, param_shapes(module), Tokenizer(model_dir))


def fill(shapes: Any, state_dict: dict[str, Any], arrays: dict[str, Any] | None = None) -> Any:
    """Params shaped like ``shapes``: each leaf from the transformers (or peft) state dict tensor of
    its name (by the one name rule) or from ``arrays`` (``{path: array}``); every leaf must get one."""
    flat = masks.flatten(shapes)
    table = name_table(list(flat))
    out = {}
    for name, t in state_dict.items():
        hit = table.get(name)
        if hit is None:
            continue
        path, transpose = hit
        arr = np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t, np.float32)
        out[path] = arr.T if transpose else arr
    out.update(arrays or {})
    missing = sorted(set(flat) - set(out))
    assert not missing, f"no tensor for {missing[:4]}"
    for path, arr in out.items():
        assert tuple(arr.shape) == tuple(flat[path].shape), (path, arr.shape, flat[path].shape)
    return masks.unflatten({p: jnp.asarray(out[p], jnp.float32) for p in flat}, shapes)


def load_like(model_dir: Path, torch_model: Any, head: Head, method: Any = None,
              arrays: dict[str, Any] | None = None) -> tuple[Built, Any]:
    """``(built, params)``: ``model_dir``'s task model with ``head`` (and ``method``), every param
    from the transformers model (encoder and head) or ``arrays``."""
    built = build(model_dir, head, method)
    return built, fill(built.shapes, torch_model.state_dict(), arrays)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(encoder: Any, params: Any, inputs: dict[str, Any], sow: bool = False) -> Any:
    if sow:
        return encoder.apply({"params": params}, **inputs, mutable=["intermediates"])
    return encoder.apply({"params": params}, **inputs)


def encoder_apply(built: Built, params: Any, enc: dict[str, np.ndarray], sow: bool = False) -> Any:
    """The bare encoder on ``enc`` (jitted): its output, and with ``sow`` its intermediates."""
    return _encode(built.family.encoder(built.config), params[built.family.prefix],
                   {k: jnp.asarray(v) for k, v in enc.items()}, sow)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module: Any, params: Any, inputs: dict[str, Any]) -> Any:
    return module.apply({"params": params}, **inputs)


def apply(built: Any, params: Any, enc: dict[str, np.ndarray], module: Any = None) -> np.ndarray:
    """The task model's outputs (jitted; a compiled program is reused for the same module and shapes)."""
    return np.asarray(_apply(module or built.module, params, {k: jnp.asarray(v) for k, v in enc.items()}))


def diff(ours: np.ndarray, theirs: np.ndarray, valid: np.ndarray | None = None) -> float:
    d = np.abs(np.asarray(ours, np.float32) - np.asarray(theirs, np.float32))
    return float((d[valid.astype(bool)] if valid is not None else d).max())


def check(family: str, what: str, ours: np.ndarray, theirs: np.ndarray, valid: np.ndarray | None = None,
          atol: float = ATOL) -> float:
    """Asserts ``ours`` equals ``theirs`` within ``atol`` (on the ``valid`` rows) and records the
    max abs diff; the outputs must not be trivially small."""
    d = diff(ours, theirs, valid)
    RESULTS[(family, what)] = d
    scale = float(np.abs(np.asarray(theirs)).max())
    print(f"PARITY {family:10s} {what:34s} max|diff| {d:.2e}  (max|value| {scale:.2f})")
    assert scale > 1e-2, f"{what}: outputs too small to tell anything apart"
    assert d <= atol, f"{family} {what}: {d}"
    return d


# ----------------------------------------------------------------------------- peft


def randomize_peft(pm: Any, seed: int = 0) -> None:
    """Non-trivial adapter weights (peft starts at the identity) and a head of unit scale."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "ia3_l" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.5)
            elif "prompt_encoder" in name or "prompt_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    pm.eval()


def peft_arrays(pm: Any, method: Any, config: Any, shapes: Any) -> dict[str, np.ndarray]:
    """Our arrays of the peft model's adapter and head (its ``get_peft_model_state_dict``), read as
    a peft folder is (:func:`jaxpeft.adapters.peft_format.from_tensors`)."""
    from peft import get_peft_model_state_dict

    tensors = {k: v.detach().cpu().numpy() for k, v in get_peft_model_state_dict(pm).items()}
    return peft_format.from_tensors(tensors, method, config, name_table(masks.paths(shapes)), "peft")


def compare_peft(case: "Case", what: str, peft_config: Any, method_name: str, options: dict,
                 enc: dict[str, np.ndarray], seed: int = 0) -> float:
    """peft's sequence classifier with ``peft_config`` (adapter weights randomised) against ours
    with method ``method_name`` and the same weights: logits within 1e-4. The adapter must
    change the logits by far more than that."""
    import peft
    import torch

    model = case.torch_model("sequence", seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    pm = peft.get_peft_model(model, peft_config)
    randomize_peft(pm, seed)
    with torch.no_grad():
        theirs = pm(**torch_inputs(enc, case.torch_keys)).logits.numpy()
    method = methods.create(method_name, options)
    built = build(case.model_dir, HEADS["sequence"], method)
    params = fill(built.shapes, base, peft_arrays(pm, method, built.config, built.shapes))
    d = check(case.family, what, apply(built, params, enc), theirs)
    plain = build(case.model_dir, HEADS["sequence"])
    assert diff(apply(plain, fill(plain.shapes, base), enc), theirs) > 100 * ATOL, "the adapter changes nothing"
    return d


# ----------------------------------------------------------------------------- prefixes


def prompt_module(prompt: Prompt):
    """A stand-in for a method's prompt module: the same :class:`Prompt` for every batch."""
    import flax.linen as nn

    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, batch_size: int, deterministic: bool = True) -> Prompt:
            return prompt

    return Fixed(name="prompt")


def cli_train(glue: Path, model_dir: Path, out: Path, method: str, task: str = "rte", **flags: Any) -> dict:
    """A 2-step run of ``jaxpeft-train`` on the tiny model; returns its ``results.json``."""
    from jaxpeft import cli

    base = dict(method=method, task=task, model=str(model_dir), data_dir=str(glue), output_dir=str(out), max_steps=2,
                batch_size=4, max_train_examples=8, max_eval_examples=4, max_seq_length=32, eval_every=0, keep=0,
                progress=False, plot=False, seed=0, compute="exact", pooling="cls")
    base.update(flags)
    argv = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in base.items()]
    rc = cli.guarded(lambda: cli.train(argv))
    assert rc == 0, f"{method}: exit {rc}"
    return json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------- shared checks


@dataclasses.dataclass
class Case:
    """One family's tiny checkpoint and its transformers classes."""

    family: str
    model_dir: Path
    seq_cls: Any
    tok_cls: Any
    qa_cls: Any
    #: the encoder's attribute in transformers' task models (``roberta``)
    prefix: str
    #: the inputs transformers' model takes
    torch_keys: tuple[str, ...] = ("input_ids", "attention_mask")
    #: transformers' sequence head on the encoder's output (default: ``model.classifier``, which
    #: reads row 0 itself)
    seq_head: Any = None
    num_labels: int = 3

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.model_dir))

    def torch_model(self, kind: str, seed: int = 0):
        import torch

        torch.manual_seed(seed)
        cls = {"sequence": self.seq_cls, "token": self.tok_cls, "span": self.qa_cls}[kind]
        kw = {"sequence": dict(num_labels=self.num_labels), "token": dict(num_labels=5), "span": dict(num_labels=2)}[kind]
        # the checkpoint's head (a sequence classifier's) may share a name with another head's
        # (DistilBERT's ``classifier``): that one starts fresh
        return cls.from_pretrained(str(self.model_dir), ignore_mismatched_sizes=kind != "sequence", **kw).eval()


HEADS = {"sequence": Head("sequence", 3), "token": Head("token", 5), "span": Head("span", 2)}


def torch_logits(case: Case, model: Any, kind: str, enc: dict[str, np.ndarray]) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**torch_inputs(enc, case.torch_keys))
    if kind == "span":
        return np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
    return out.logits.numpy()


def heads_parity(case: Case, enc: dict[str, np.ndarray], what: str = "") -> None:
    """Every head's logits (sequence, token, span) against transformers' task models."""
    valid = enc["attention_mask"].astype(bool)
    for kind in ("sequence", "token", "span"):
        model = case.torch_model(kind)
        loaded, params = load_like(case.model_dir, model, HEADS[kind])
        ours = apply(loaded, params, enc)
        theirs = torch_logits(case, model, kind, enc)
        check(case.family, f"{kind} head{what}", ours, theirs, None if kind == "sequence" else valid)


def encoder_parity(case: Case, enc: dict[str, np.ndarray], what: str) -> None:
    """The encoder's last hidden states (real rows) against transformers' bare model."""
    import torch

    model = case.torch_model("sequence")
    loaded, params = load_like(case.model_dir, model, HEADS["sequence"])
    out = encoder_apply(loaded, params, enc)
    with torch.no_grad():
        ref = getattr(model, case.prefix)(**torch_inputs(enc, case.torch_keys)).last_hidden_state.numpy()
    assert out.hidden.shape == ref.shape
    check(case.family, f"hidden states, {what}", np.asarray(out.hidden), ref, enc["attention_mask"])


def layer_kv(intermediates: Any) -> list[tuple[Any, Any]]:
    """The sown ``key_value`` of every layer, in layer order."""
    found = []

    def walk(tree, path):
        for k, v in tree.items():
            if k == "key_value":
                found.append((int(re.findall(r"layers?_(\d+)", "/".join(path))[-1]), v[0]))
            elif isinstance(v, dict) or hasattr(v, "items"):
                walk(v, path + [k])

    walk(intermediates, [])
    return [kv for _, kv in sorted(found, key=lambda x: x[0])]


def prefix_equivalence(case: Case, enc: dict[str, np.ndarray], prefix_ids: np.ndarray) -> None:
    """Prefixes equal to the keys/values of ``P`` real tokens in front of the input, the input
    numbered after them, give every head the logits transformers' model gives the joined text
    (its head reading the input's rows): the sequence and token heads through a fixed prompt
    (a prefix per row), the sequence head also through the P-tuning v2 method's params (one row)."""
    import torch

    b = enc["input_ids"].shape[0]
    p = len(prefix_ids)
    joined = {"input_ids": np.concatenate([np.tile(prefix_ids, (b, 1)), enc["input_ids"]], 1),
              "attention_mask": np.concatenate([np.ones((b, p), np.int32), enc["attention_mask"]], 1),
              "token_type_ids": np.concatenate([np.zeros((b, p), np.int32), enc["token_type_ids"]], 1)}
    valid = enc["attention_mask"].astype(bool)
    for kind in ("sequence", "token"):
        model = case.torch_model(kind)
        loaded, params = load_like(case.model_dir, model, HEADS[kind])
        _, state = encoder_apply(loaded, params, joined, sow=True)
        kv = tuple((k[:, :p], v[:, :p]) for k, v in layer_kv(state["intermediates"]))
        assert len(kv) == loaded.config.num_hidden_layers
        with torch.no_grad():
            hidden = getattr(model, case.prefix)(**torch_inputs(joined, case.torch_keys)).last_hidden_state[:, p:]
            if kind == "sequence":
                theirs = (case.seq_head or (lambda m, h: m.classifier(h)))(model, hidden).numpy()
            else:
                theirs = model.classifier(hidden).numpy()
        module = loaded.module.clone(prompt=prompt_module(Prompt(prefix_kv=kv, position_offset=p)))
        ours = np.asarray(jax.jit(lambda prm, x: module.apply({"params": prm}, **x))(
            params, {k: jnp.asarray(v) for k, v in enc.items()}))
        check(case.family, f"prefix = {p} tokens, {kind} head", ours, theirs, None if kind == "sequence" else valid)
        alone = apply(loaded, params, enc)
        assert diff(alone, theirs, None if kind == "sequence" else valid) > 100 * ATOL, "the prefix changes nothing"
        if kind == "sequence":   # the method's own params: one row, the prefix as [layers, P, hidden]
            method = methods.create("ptuning_v2", {"num_virtual_tokens": p, "prefix_dropout": 0.0,
                                                   "shift_positions": True})
            h = loaded.config.hidden_size
            prefix = {"prompt/prefix_keys": np.stack([np.asarray(k[0]).reshape(p, h) for k, _ in kv]),
                      "prompt/prefix_values": np.stack([np.asarray(v[0]).reshape(p, h) for _, v in kv])}
            built_m, params_m = load_like(case.model_dir, model, HEADS[kind], method, prefix)
            ours = apply(built_m, params_m, {k: v[:1] for k, v in enc.items()})
            check(case.family, "prefix method (ptuning_v2), sequence", ours, theirs[:1])


def packing_equivalence(case: Case, texts: Sequence[str]) -> None:
    """Examples packed into rows (each numbered from its own start, attending to itself) get the
    logits they get alone (the sequence head at each example's first token)."""
    from jaxpeft.data.encoding import Encoded
    from jaxpeft.data.packing import packed_batch

    model = case.torch_model("sequence")
    loaded, params = load_like(case.model_dir, model, HEADS["sequence"])
    ids, types, lengths = loaded.tokenizer.encode_arrays([list(texts)], 32)
    alone = apply(loaded, params, {"input_ids": ids, "attention_mask": (np.arange(32)[None] < lengths[:, None])
                                   .astype(np.int32), "token_type_ids": types})
    data = Encoded(ids, types, lengths, None)
    n = len(texts)
    rows = np.array([[i, i + 1] for i in range(0, n - 1, 2)], np.int32)
    batch = packed_batch(data, rows, int(lengths.max()) * 2)
    keys = ("input_ids", "token_type_ids", "position_ids", "segment_ids", "read_positions")
    packed = apply(loaded, params, {k: batch[k] for k in keys})
    assert packed.shape == (len(rows), 2, case.num_labels)
    check(case.family, "packed rows = alone", packed.reshape(-1, case.num_labels)[:len(rows) * 2], alone[:len(rows) * 2],
          atol=2e-5)


def tokenizer_matches_transformers(model_dir: Path, glue: Path, pad_id: int, max_length: int = 24) -> None:
    """jaxpeft's tokenizer (``tokenizer.json`` through ``tokenizers``) gives transformers'
    ``AutoTokenizer``'s ids for sentences and pairs (truncated longest-first), padded with the
    model's pad id."""
    from transformers import AutoTokenizer

    from jaxpeft.data.tokenizing import Tokenizer

    ours = Tokenizer(model_dir)
    theirs = AutoTokenizer.from_pretrained(str(model_dir))
    assert ours.pad_token_id == theirs.pad_token_id == pad_id
    rows = [line.split("\t") for line in (glue / "RTE" / "dev.tsv").read_text().splitlines()[1:13]]
    pairs = [(r[1], r[2]) for r in rows]
    for texts in ([[a for a, _ in pairs]], [[a for a, _ in pairs], [b for _, b in pairs]]):
        ids, _, lengths = ours.encode_arrays(texts, max_length)
        enc = theirs(*texts, truncation=True, max_length=max_length, padding="max_length")
        np.testing.assert_array_equal(ids, np.asarray(enc["input_ids"]))
        np.testing.assert_array_equal(lengths, np.asarray(enc["attention_mask"]).sum(1))
        assert (ids[np.arange(max_length)[None] >= lengths[:, None]] == pad_id).all()
    return ours, theirs


#: every method, as the family tests train them from the CLI (prompt methods with few virtual
#: tokens); the default run trains ``CLI_QUICK`` (one that changes dense layers, one with prefixes,
#: packing), the rest are marked ``slow`` (each run compiles its own train and eval programs)
CLI_METHODS = {
    "lora": {}, "prefix": {"num_virtual_tokens": 4, "shift_positions": True, "encoder_hidden_size": 16},
    "bitfit-packed": {"method": "bitfit", "task": "sst2", "packing": True},
    "full": {}, "frozen": {}, "bitfit": {}, "ia3": {}, "prompt": {"num_virtual_tokens": 4},
    "ptuning": {"num_virtual_tokens": 4, "encoder_type": "mlp"}, "ptuning_v2": {"num_virtual_tokens": 4},
    "bottleneck": {},
}
CLI_QUICK = ("lora", "prefix", "bitfit-packed")


def cli_params():
    import pytest

    return [pytest.param(k, marks=() if k in CLI_QUICK else pytest.mark.slow) for k in CLI_METHODS]


def cli_run(glue: Path, model_dir: Path, out: Path, key: str, family: str, **extra: Any) -> dict:
    flags = {**CLI_METHODS[key], **extra}
    method = flags.pop("method", key)
    res = cli_train(glue, model_dir, out, method, **flags)
    assert res["steps"] == 2 and res["model_family"] == family, res
    return res

