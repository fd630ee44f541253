#!/usr/bin/env python
"""The PyTorch peer: HF transformers + peft, the same shapes and methods as ``jaxpeft-bench``.

Random-init ``BertForSequenceClassification`` of the given size (the sizes of
``jaxpeft.models.sizes``), bf16 autocast, AdamW (``torch.optim.AdamW`` defaults), gradient clipping
at 1.0 (as our step and the HF Trainer do), every position real. BitFit sets ``requires_grad`` on
bias terms (+ classifier), as the BitFit reference code does; LoRA (r 8, alpha 16 on query and value)
and IA3 use peft's configs with our defaults; prompt methods use peft configs with 20 virtual tokens;
peft has no bottleneck adapters (the record says so). Eager or ``torch.compile``. Prints one JSON
line per configuration.

``--base_dtype`` stores the frozen base as our runs do: ``bfloat16`` puts the encoder's frozen
``nn.Linear`` weights and the word embeddings in bf16 (biases, norms and what trains stay float32);
``int8`` and ``nf4`` load the encoder through transformers' ``BitsAndBytesConfig`` (LLM.int8() with
its 6.0 outlier threshold; 4-bit NormalFloat with bf16 compute, no double quantization), from a
random checkpoint of the size saved once under ``--cache_dir``. bitsandbytes is imported only then;
missing, the run ends with one line. ``--remat=layer`` is transformers' gradient checkpointing per
layer. The peak is ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer
state and activations); ``--max_batch`` then tries larger batches until one runs out of memory
(doubling, then bisection; each failure recorded), the try-and-catch peer of our compiled estimate.

``--family`` (default ``bert``) picks another encoder family (:data:`FAMILY_CONFIGS`): the model is
``AutoModelForSequenceClassification.from_config`` of the transformers config of that family's base
checkpoint (``--size=base``; ``--size=tiny`` for tests), the same config ``jaxpeft-bench
--families`` builds our encoder from. What trains follows the family: its head (every top-level
module but the encoder), peft's LoRA and IA3 targets as ours (:data:`PEFT_TARGETS`), the head's
modules beyond ``classifier`` in peft's ``modules_to_save``; BitFit on an encoder without biases
(ModernBERT) is refused as ours refuses it.

    python -m jaxpeft.bench.peer --size=base --method=bitfit --batch=64 --mode=compile
    python -m jaxpeft.bench.peer --family=deberta-v2 --method=lora --batch=64 --mode=compile
    python -m jaxpeft.bench.peer --size=3.5b --method=lora --base_dtype=nf4 --batch=8 --max_batch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: The sizes of ``jaxpeft.models.sizes.SHAPES`` (kept here so the peer needs no JAX; a test checks
#: they agree).
SIZES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, intermediate_size=8192),
    "3.5b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, intermediate_size=10240,
                 vocab_size=250002),
    "10.7b": dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, intermediate_size=16384,
                  vocab_size=250002),
}
BASE_DTYPES = ("float32", "bfloat16", "int8", "nf4")
REMATS = ("none", "layer")

#: The encoder families beyond BERT (whose shapes are :data:`SIZES`) at their base checkpoint's
#: shapes: transformers' config class and what the checkpoint's ``config.json`` sets apart from the
#: class defaults (the shapes; ``xlm-roberta`` is read by jaxpeft's roberta family). Our encoder is
#: built from the same config (``jaxpeft.bench.step.family_config``), so both columns have one shape.
FAMILY_CONFIGS: dict[str, tuple[str, dict]] = {
    # roberta-base
    "roberta": ("RobertaConfig", dict(max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5)),
    # xlm-roberta-base
    "xlm-roberta": ("XLMRobertaConfig", dict(vocab_size=250002, max_position_embeddings=514, type_vocab_size=1,
                                             layer_norm_eps=1e-5)),
    # google/electra-base-discriminator (the class defaults are ELECTRA-small's)
    "electra": ("ElectraConfig", dict(embedding_size=768, hidden_size=768, num_attention_heads=12,
                                      intermediate_size=3072)),
    # distilbert-base-uncased (6 layers)
    "distilbert": ("DistilBertConfig", {}),
    # microsoft/mpnet-base
    "mpnet": ("MPNetConfig", dict(max_position_embeddings=514)),
    # microsoft/deberta-v3-base (the class defaults are DeBERTa-v2-xlarge's)
    "deberta-v2": ("DebertaV2Config", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                           intermediate_size=3072, pooler_hidden_size=768, relative_attention=True,
                                           position_buckets=256, max_relative_positions=-1, pos_att_type="p2c|c2p",
                                           position_biased_input=False, norm_rel_ebd="layer_norm",
                                           share_att_key=True, layer_norm_eps=1e-7)),
    # answerdotai/ModernBERT-base (22 layers, a gated MLP of 1152)
    "modernbert": ("ModernBertConfig", {}),
}
#: Every family name ``--family`` takes.
FAMILY_NAMES = ("bert",) + tuple(FAMILY_CONFIGS)
#: The shapes of a family beyond BERT: ``base`` (its base checkpoint's) or ``tiny`` (tests).
FAMILY_SIZES = ("base", "tiny")
#: ``tiny``: BERT's tiny size (``SIZES["tiny"]``), in each config's own field names.
_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_TINY_FIELDS = {
    "electra": dict(_TINY, embedding_size=64),
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
    "deberta-v2": dict(_TINY, pooler_hidden_size=64),
}
#: peft's LoRA targets, IA3 targets and IA3 feed-forward modules of each family beyond BERT: our
#: families' (``jaxpeft.models.FAMILIES``: ``lora_targets``, ``ia3_targets``, ``ia3_feedforward``;
#: a test checks they agree).
PEFT_TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "roberta": (("query", "value"), ("key", "value", "output.dense"), ("output.dense",)),
    "xlm-roberta": (("query", "value"), ("key", "value", "output.dense"), ("output.dense",)),
    "electra": (("query", "value"), ("key", "value", "output.dense"), ("output.dense",)),
    "distilbert": (("q_lin", "v_lin"), ("k_lin", "v_lin", "ffn.lin2"), ("ffn.lin2",)),
    "mpnet": (("q", "v"), ("k", "v", "output.dense"), ("output.dense",)),
    "deberta-v2": (("query_proj", "value_proj"), ("key_proj", "value_proj", "output.dense"), ("output.dense",)),
    "modernbert": (("Wqkv",), ("Wqkv", "mlp.Wo"), ("mlp.Wo",)),
}


class Unavailable(Exception):
    """What this peer cannot run here (a missing package, no GPU): one line, exit status 2."""


def prefixes_dropped(model, method: str) -> str | None:
    """Why ``model`` (peft's prefix model, any task head) cannot be run, or None: a forward pass must
    not fail, and its logits must change when the prefix encoder's weights move. peft hands the
    prefixes to the encoder as ``past_key_values``: peft up to 0.21 refuses transformers 5's
    encoders, whose ``forward`` does not name them ("Model does not support past key values");
    peft 0.22 runs them. An encoder that swallowed them in ``**kwargs`` would train a prefix encoder
    whose output never reaches attention."""
    import torch
    import transformers

    if method not in ("prefix", "ptuning_v2"):
        return None
    dev = next(model.parameters()).device
    ids = torch.arange(5, 11, device=dev)[None]
    x = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    weights = list(model.prompt_encoder.parameters())
    kept = [w.detach().clone() for w in weights]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            before = _logits(model(**x))
            for w in weights:
                w.add_(torch.randn_like(w))
            after = _logits(model(**x))
    except (ValueError, TypeError) as e:
        return f"--method={method}: peft cannot run it on this encoder ({str(e).splitlines()[0]})"
    finally:
        with torch.no_grad():
            for w, k in zip(weights, kept):
                w.copy_(k)
        model.train(was_training)
    if torch.equal(before, after):
        base = type(model.get_base_model().base_model).__name__
        return (f"--method={method}: transformers {transformers.__version__}'s {base} drops the prefixes peft "
                "hands it as past_key_values, so the run would train a prefix that never reaches attention")
    return None


def _logits(out):
    """Every ``*logits`` output of a forward pass (a QA head's start and end logits), as one vector."""
    import torch

    return torch.cat([v.float().flatten() for k, v in out.items() if k.endswith("logits")])


def hf_config(family: str, size: str = "base", num_labels: int = 2):
    """transformers' config of ``family`` (not ``bert``: see :data:`FAMILY_CONFIGS`) at ``size``
    (``base`` or ``tiny``), with a sequence-classification head of ``num_labels``."""
    import transformers

    if family not in FAMILY_CONFIGS:
        raise Unavailable(f"unknown family {family!r}; the families: {', '.join(FAMILY_NAMES)}")
    if size not in FAMILY_SIZES:
        raise Unavailable(f"--family={family} comes in the sizes {', '.join(FAMILY_SIZES)}, not {size!r}")
    cls, kw = FAMILY_CONFIGS[family]
    if size == "tiny":
        kw = {**kw, **_TINY_FIELDS.get(family, _TINY)}
    return getattr(transformers, cls)(**kw, num_labels=num_labels)


def _family_model(family: str, size: str, dtype=None):
    """A random sequence classifier of ``family`` at ``size`` (BERT: :data:`SIZES`), in ``dtype``
    (``None``: float32)."""
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        if family == "bert":
            return BertForSequenceClassification(BertConfig(**SIZES[size], num_labels=2))
        return AutoModelForSequenceClassification.from_config(hf_config(family, size))
    finally:
        torch.set_default_dtype(old)


def head_names(model) -> list[str]:
    """The top-level modules of a sequence classifier outside its encoder, holding params (its
    head: ``classifier``; ``pre_classifier``, ``pooler`` or ``head`` in some families)."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def bnb_config(base_dtype: str):
    """transformers' ``BitsAndBytesConfig`` of an int8 or nf4 base (imports bitsandbytes lazily)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise Unavailable(f"--base_dtype={base_dtype} needs bitsandbytes (pip install bitsandbytes) and a CUDA "
                          "GPU") from None
    import torch
    from transformers import BitsAndBytesConfig

    if base_dtype == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=["classifier"])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                              bnb_4bit_use_double_quant=False, llm_int8_skip_modules=["classifier"])


def random_checkpoint(size: str, cache_dir: str, family: str = "bert") -> Path:
    """A random sequence classifier of ``family`` at ``size`` saved in bf16 (once per size)."""
    import torch

    d = Path(cache_dir) / (f"random-{size}" if family == "bert" else f"random-{family}-{size}")
    if not (d / "config.json").exists():
        torch.manual_seed(0)
        # built in bf16 (a 10.7B model: 21 GB, not 43) and on the GPU where there is one: the random
        # init of billions of weights takes minutes on a host's cores
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = _family_model(family, size, torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir))
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        tmp.rename(d)
    return d


def _store_frozen_bf16(model) -> None:
    """Frozen encoder ``nn.Linear`` weights and the word embeddings in bf16, as our bfloat16 base."""
    import torch

    prefix = model.base_model_prefix + "."
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith(prefix) and not mod.weight.requires_grad:
            mod.weight.data = mod.weight.data.to(torch.bfloat16)
    words = model.get_input_embeddings().weight
    if not words.requires_grad:
        words.data = words.data.to(torch.bfloat16)


def build(size: str, method: str, virtual: int, base_dtype: str = "float32", remat: str = "none",
          cache_dir: str | None = None, device: str = "cpu", family: str = "bert"):
    """The peer's model of ``family`` at ``size`` with ``method`` on a ``base_dtype`` base, on ``device``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    if family != "bert":
        hf_config(family, size)   # an unknown family or size ends here, in one line
    if method == "bottleneck":
        raise Unavailable("peft has no bottleneck (Houlsby) adapters")
    quantized = base_dtype in ("int8", "nf4")
    if quantized and method == "full":
        raise Unavailable(f"--method=full trains the matrices an {base_dtype} base cannot hold")
    if quantized:
        cfg = bnb_config(base_dtype)
        if device != "cuda":
            raise Unavailable(f"--base_dtype={base_dtype} (bitsandbytes) needs a CUDA GPU")
        model = AutoModelForSequenceClassification.from_pretrained(
            random_checkpoint(size, cache_dir or tempfile.gettempdir(), family), num_labels=2,
            quantization_config=cfg, torch_dtype=torch.float32, device_map={"": 0})
        words = model.get_input_embeddings()
        words.weight.data = words.weight.data.to(torch.bfloat16)
    else:
        with torch.device(device):
            model = _family_model(family, size)
    if remat == "layer":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif remat != "none":
        raise Unavailable(f"--remat={remat}: the peer has none or layer (gradient checkpointing)")
    heads = head_names(model)
    if method in ("full", "frozen", "bitfit"):
        prefix = model.base_model_prefix + "."
        if method == "bitfit" and not any(n.startswith(prefix) and n.endswith("bias")
                                          for n, _ in model.named_parameters()):
            raise Unavailable(f"--method=bitfit: the {family} encoder has no bias terms to train")
        for name, p in model.named_parameters():
            p.requires_grad = (method == "full" or name.split(".", 1)[0] in heads
                               or (method == "bitfit" and name.endswith("bias")))
    else:
        import peft

        lora, ia3, ia3_ff = PEFT_TARGETS.get(family, (("query", "value"), ("key", "value", "output.dense"),
                                                      ("output.dense",)))
        # peft adds the classifier itself; a head of several modules trains whole, as ours
        more = [h for h in heads if h != "classifier"] or None
        kinds = {
            "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=list(lora), modules_to_save=more),
            "ia3": lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=list(ia3),
                                          feedforward_modules=list(ia3_ff), modules_to_save=more),
            "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                      modules_to_save=more),
            "ptuning": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                        encoder_hidden_size=128, modules_to_save=more),
            "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                      prefix_projection=True, encoder_hidden_size=512,
                                                      modules_to_save=more),
            "ptuning_v2": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                          modules_to_save=more),
        }
        if method not in kinds:
            raise SystemExit(f"unknown method {method!r}")
        model = peft.get_peft_model(model, kinds[method]())
        refusal = prefixes_dropped(model, method)
        if refusal:
            raise Unavailable(refusal)
    if base_dtype == "bfloat16" and method != "full":
        _store_frozen_bf16(model.get_base_model() if hasattr(model, "get_base_model") else model)
    return model.to(device) if not quantized else model


def run(size: str, method: str, batch: int, seq: int, mode: str, steps: int, repeats: int,
        warmup: int, virtual: int, base_dtype: str = "float32", remat: str = "none", max_batch: bool = False,
        cache_dir: str | None = None, family: str = "bert") -> dict:
    import inspect

    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(size, method, virtual, base_dtype, remat, cache_dir, dev.type, family).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    fwd = torch.compile(model) if mode == "compile" else model
    amp = dict(device_type=dev.type, dtype=torch.bfloat16)
    # DistilBERT, MPNet and ModernBERT take no token types
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    types = "token_type_ids" in inspect.signature(base_model.forward).parameters

    def inputs_of(b):
        ids = torch.randint(1, min(vocab, 30522), (b, seq), device=dev)
        x = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (b,), device=dev))
        return {**x, "token_type_ids": torch.zeros_like(ids)} if types else x

    inputs = inputs_of(batch)

    def step(x=None):
        with torch.autocast(**amp):
            loss = fwd(**(x or inputs)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    loss = step()
    sync()
    first_step_s = time.perf_counter() - t0
    for _ in range(warmup):
        loss = step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync()
        times.append((time.perf_counter() - t0) / steps)
    step_s = statistics.median(times)
    rec = {
        "framework": f"torch {torch.__version__}", "mode": mode, "family": family, "size": size, "method": method,
        "batch": batch, "seq": seq, "base_dtype": base_dtype, "remat": remat,
        "trainable_params": n_train, "total_params": n_total,
        "step_ms": 1e3 * step_s, "seq_per_s": batch / step_s, "first_step_s": first_step_s,
        "peak_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "loss": float(loss.detach()),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }
    if max_batch and dev.type == "cuda":
        rec.update(largest_batch(lambda b: step(inputs_of(b)), batch))
    return rec


def largest_batch(try_step, batch: int, multiple: int = 8, cap: int = 1 << 16) -> dict:
    """The largest batch whose step runs, by trying: doubling from ``batch`` until one runs out of
    CUDA memory, then bisection; every failure is recorded (``oom_at``)."""
    import torch

    failed: list[int] = []

    def ok(b: int) -> bool:
        try:
            try_step(b)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            failed.append(b)
            return False
        finally:
            torch.cuda.empty_cache()

    good, bad = 0, batch
    while bad <= cap and ok(bad):
        good, bad = bad, bad * 2
    while bad - good > multiple:
        mid = (good + bad) // 2 // multiple * multiple
        if mid <= good:
            break
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return {"max_batch": good, "oom_at": failed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="bert", choices=list(FAMILY_NAMES),
                   help="the encoder family (bert: the sizes of --size; the others: base or tiny)")
    p.add_argument("--size", default="base", choices=list(SIZES))
    p.add_argument("--method", default="bitfit")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mode", default="eager", choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--virtual", type=int, default=20)
    p.add_argument("--base_dtype", default="float32", choices=BASE_DTYPES,
                   help="how the frozen base is stored (float32: as created, autocast only)")
    p.add_argument("--remat", default="none", help="none, or layer (gradient checkpointing)")
    p.add_argument("--max_batch", action="store_true", help="also find the largest batch that runs (CUDA)")
    p.add_argument("--cache_dir", default=os.environ.get("JAXPEFT_PEER_CACHE"),
                   help="where random checkpoints for the bitsandbytes bases are saved (default: the temp dir)")
    a = p.parse_args()
    base = {"framework": "torch", "mode": a.mode, "family": a.family, "size": a.size, "method": a.method,
            "batch": a.batch, "seq": a.seq, "base_dtype": a.base_dtype, "remat": a.remat}
    code = 0
    try:
        rec = run(a.size, a.method, a.batch, a.seq, a.mode, a.steps, a.repeats, a.warmup, a.virtual,
                  a.base_dtype, a.remat, a.max_batch, a.cache_dir, a.family)
    except Unavailable as e:
        rec, code = {**base, "error": str(e)}, 2
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # report the peer's failure (e.g. peft refusing BERT prefixes) as data
        rec = {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print(json.dumps(rec), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
