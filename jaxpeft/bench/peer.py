#!/usr/bin/env python
"""The PyTorch peer: HF transformers + peft, the same shapes and methods as ``jaxpeft-bench``.

Random-init ``BertForSequenceClassification`` of the given size, bf16 autocast, AdamW
(``torch.optim.AdamW`` defaults), gradient clipping at 1.0 (as our step and the HF Trainer do),
every position real. BitFit sets ``requires_grad`` on bias terms (+ classifier), as the BitFit
reference code does; prompt methods use peft configs with 20 virtual tokens. Eager or
``torch.compile``. Prints one JSON line per configuration.

    python -m jaxpeft.bench.peer --size=base --method=bitfit --batch=64 --mode=compile
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SIZES = {
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 vocab_size=1000, max_position_embeddings=256),
}


def build(size: str, method: str, virtual: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(**SIZES[size], num_labels=2))
    if method in ("full", "frozen", "bitfit"):
        for name, p in model.named_parameters():
            p.requires_grad = (method == "full" or name.startswith("classifier.")
                               or (method == "bitfit" and name.endswith("bias")))
        return model
    import peft

    kinds = {
        "prompt": lambda: peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                    encoder_hidden_size=128),
        "prefix": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual,
                                                  prefix_projection=True, encoder_hidden_size=512),
        "ptuning_v2": lambda: peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=virtual),
    }
    if method not in kinds:
        raise SystemExit(f"unknown method {method!r}")
    del torch
    return peft.get_peft_model(model, kinds[method]())


def run(size: str, method: str, batch: int, seq: int, mode: str, steps: int, repeats: int,
        warmup: int, virtual: int) -> dict:
    import torch

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(size, method, virtual).to(dev).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(1, vocab, (batch, seq), device=dev)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                  labels=torch.randint(0, 2, (batch,), device=dev))
    fwd = torch.compile(model) if mode == "compile" else model
    amp = dict(device_type=dev.type, dtype=torch.bfloat16)

    def step():
        with torch.autocast(**amp):
            loss = fwd(**inputs).loss
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
    return {
        "framework": f"torch {torch.__version__}", "mode": mode, "size": size, "method": method,
        "batch": batch, "seq": seq, "trainable_params": n_train, "total_params": n_total,
        "step_ms": 1e3 * step_s, "seq_per_s": batch / step_s, "first_step_s": first_step_s,
        "peak_bytes": torch.cuda.max_memory_allocated() if dev.type == "cuda" else None,
        "loss": float(loss),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", default="base", choices=sorted(SIZES))
    p.add_argument("--method", default="bitfit")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mode", default="eager", choices=["eager", "compile"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--virtual", type=int, default=20)
    a = p.parse_args()
    try:
        rec = run(a.size, a.method, a.batch, a.seq, a.mode, a.steps, a.repeats, a.warmup, a.virtual)
    except Exception as e:  # report the peer's failure (e.g. peft refusing BERT prefixes) as data
        rec = {"framework": "torch", "mode": a.mode, "size": a.size, "method": a.method, "batch": a.batch,
               "seq": a.seq, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
