#!/usr/bin/env python
"""The PyTorch peer of the whole job: transformers + peft fine-tuning a GLUE task end to end.

The same work as ``jaxpeft-train`` for a method and task: the same pretrained model, the same
tokenized examples and batches (``jaxpeft.data``: the same length-bucketed batches of the same
size in the same order), AdamW with global-norm clipping at 1, linear warm-up then linear decay,
the same epochs, an evaluation on dev after every epoch, bf16 autocast on a GPU, eager or
``torch.compile``. BitFit, Frozen and full fine-tuning set ``requires_grad`` as the BitFit reference
code does; LoRA and the prompt methods are peft's. Prints one JSON line: the wall time split like
our ``results.json`` (``startup_seconds``, ``data_seconds``, ``train_seconds``, ``eval_seconds``,
``wall_seconds``), examples/s, and the dev metric after every epoch.

    python benchmarks/peft_job.py --method=bitfit --task=sst2 --data_dir=GLUE --model=DIR \\
        --learning_rate=3e-3 --num_epochs=2 --max_seq_length=64 --mode=eager
"""

from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(model_dir: str, method: str, num_labels: int, virtual: int):
    import torch
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels, dtype=torch.float32)
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
        "lora": lambda: peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]),
    }
    if method not in kinds:
        raise SystemExit(f"the peer has no method {method!r}")
    return peft.get_peft_model(model, kinds[method]())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="bitfit")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data_dir", required=True)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled MiniLM)")
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--eval_batch_size", type=int, default=128)
    ap.add_argument("--num_epochs", type=float, default=2)
    ap.add_argument("--max_seq_length", type=int, default=64)
    ap.add_argument("--warmup_ratio", type=float, default=0.06)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--max_train_examples", type=int, default=0)
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", default="eager", choices=("eager", "compile"))
    a = ap.parse_args()

    import numpy as np
    import torch

    from jaxpeft import data, metrics
    from jaxpeft.models import hf_weights

    torch.manual_seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task = data.get_task(a.task)
    model_dir = str(hf_weights.resolve_model_dir(a.model or hf_weights.DEFAULT_MODEL))
    model = build(model_dir, a.method, task.num_labels, a.num_virtual_tokens).to(dev)
    t_startup = time.perf_counter() - _START

    t0 = time.perf_counter()
    tok = hf_weights.load_tokenizer(Path(model_dir))
    train_ex = data.load_split(task, "train", a.data_dir)
    if a.max_train_examples:
        train_ex = train_ex.take(a.max_train_examples)
    dev_ex = data.load_split(task, task.eval_splits[0], a.data_dir)
    train = data.encode(tok, train_ex, a.max_seq_length)
    dev_enc = data.encode(tok, dev_ex, a.max_seq_length)
    buckets = data.length_buckets(a.max_seq_length)
    t_data = time.perf_counter() - t0

    def to_torch(b):
        out = {k: torch.from_numpy(b[k]).to(dev, non_blocking=True).long()
               for k in ("input_ids", "attention_mask", "token_type_ids")}
        return out

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and "LayerNorm" not in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not (p.ndim > 1 and "LayerNorm" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=a.learning_rate)
    spe = math.ceil(len(train) / a.batch_size)
    total = max(1, math.ceil(a.num_epochs * spe))
    warmup = int(round(a.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(warmup, 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))
    fwd = torch.compile(model) if a.mode == "compile" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def evaluate() -> dict:
        model.eval()
        logits = np.zeros((len(dev_enc), task.num_labels), np.float32)
        with torch.no_grad(), autocast:
            for idx in data.eval_order(dev_enc.lengths, a.eval_batch_size):
                b = data.make_batch(dev_enc, idx, buckets)
                out = fwd(**to_torch(b)).logits.float().cpu().numpy()
                real = idx >= 0
                logits[idx[real]] = out[real]
        model.train()
        preds = logits[:, 0] if task.is_regression else logits.argmax(-1)
        return metrics.compute(task.name, preds, dev_enc.labels)

    model.train()
    step, train_s, eval_s, examples, evals = 0, 0.0, 0.0, 0, []
    t_loop = time.perf_counter()
    while step < total:
        epoch = step // spe
        for idx in data.epoch_order(train.lengths, a.batch_size, a.seed, epoch):
            b = data.make_batch(train, idx, buckets)
            inputs = to_torch(b)
            labels = torch.from_numpy(b["labels"]).to(dev)
            weights = torch.from_numpy(b["weights"]).to(dev)
            with autocast:
                logits = fwd(**inputs).logits.float()
            if task.is_regression:
                per = (logits[:, 0] - labels.float()) ** 2
            else:
                per = torch.nn.functional.cross_entropy(logits, labels.long(), reduction="none")
            loss = (per * weights).sum() / weights.sum().clamp(min=1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            examples += int((idx >= 0).sum())
            if step % spe == 0 or step == total:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_e = time.perf_counter()
                m = evaluate()
                eval_s += time.perf_counter() - t_e
                evals.append({"step": step, "wall_seconds": time.perf_counter() - _START, **m})
            if step >= total:
                break
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s = time.perf_counter() - t_loop - eval_s
    print(json.dumps({
        "framework": f"torch {torch.__version__}", "mode": a.mode, "method": a.method, "task": task.name,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "steps": step,
        "startup_seconds": t_startup, "data_seconds": t_data, "train_seconds": train_s, "eval_seconds": eval_s,
        "wall_seconds": time.perf_counter() - _START, "examples_per_second": examples / max(train_s, 1e-9),
        "evals": evals, "final_dev": evals[-1] if evals else None,
        "trainable_params": sum(p.numel() for p in params)}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
