#!/usr/bin/env python
"""The PyTorch peer of the whole job: transformers + peft fine-tuning a task end to end.

The same work as ``jaxpeft-train`` for a method and task: the same pretrained model, the same
tokenized examples and batches (``jaxpeft.data``: the same length-bucketed batches of the same
size in the same order), AdamW with global-norm clipping at 1, linear warm-up then linear decay,
the same epochs, an evaluation on dev after every epoch, bf16 autocast on a GPU, eager or
``torch.compile``. BitFit, Frozen and full fine-tuning set ``requires_grad`` as the BitFit reference
code does (``--bitfit_terms`` as ours); LoRA and the prompt methods are peft's; bottleneck adapters,
which peft lacks, are ours written in PyTorch (Houlsby's placement, the LayerNorms train). The
classifier can take its own rate (``--head_learning_rate``) and read the pooler on [CLS] or, as ours,
the mean of the last layer (``--pooling=mean``) or the cosine of a pair's two sentences encoded apart
(``--pooling=cosine``). Prints one JSON line: the wall time split
like our ``results.json`` (``startup_seconds``, ``data_seconds``, ``train_seconds``, ``eval_seconds``,
``wall_seconds``), examples/s, and the dev metric after every evaluation (every epoch, or every
``--eval_every`` steps) with the final and the best. :func:`peer_args` gives the flags that mirror one
of our runs' config. ``--time_limit`` with ``--state`` splits a long run into parts: the run pauses at
a step boundary, saving its trainable weights, optimizer, schedule, random state and evaluations, and
the same command resumes it where it stopped, to the same result.

Models: the folder's family (``AutoModelFor...``: BERT, RoBERTa, MPNet...), its peft targets for
LoRA and IA3 as ours name them (``jaxpeft.bench.peer.PEFT_TARGETS``), token types only where the
encoder has more than one, and every module of its sequence head beside the encoder trained (as
ours); BERT's pooler-replacing mean and cosine pooling, its bias-term names and the bottleneck
adapters stay BERT's (one ``error:`` line elsewhere).

Tasks: GLUE's (``AutoModelForSequenceClassification``, peft ``SEQ_CLS``), and the token and span tasks
of ``jaxpeft.tasks``: ``--task=pos|ner`` or your own tagging files (``--task_type=tagging
--train_file=... --validation_file=...``) with ``AutoModelForTokenClassification`` (peft
``TOKEN_CLS``), ``--task=squad`` or your own SQuAD files (``--task_type=qa``) with
``AutoModelForQuestionAnswering`` (peft ``QUESTION_ANS``). The task object is ours
(``jaxpeft.tasks.get``): the same windows, labels (a word's tag on its first sub-word, ``-100``
elsewhere; a QA window's start/end positions), the same loss (mean cross-entropy over the
batch's labelled tokens; the mean of the start and end cross-entropies over each window's real
tokens) and the same metric code on the dev outputs (``Task.evaluate``: seqeval entity F1 for
ner, token accuracy for pos, the official v1.1 EM/F1 after n-best decoding for squad). peft's
prompt methods put their virtual tokens in front, and their outputs are dropped before the loss
and the metric (as our heads drop them). peft's ``PeftModelForQuestionAnswering`` drops
``token_type_ids`` (it passes them on to BERT under no method), so the peer hands the batch's
token types to BERT itself (a forward pre-hook on ``model.bert``; 0 on virtual tokens, as peft's
other task types do): both sides read a question and its context as two segments.

What the peer cannot run (one ``error:`` line, exit status 2):

* ``prefix`` and ``ptuning_v2`` where the installed peft cannot run them on the family's encoder:
  peft up to 0.21 raises "Model does not support past key values" on transformers 5's encoders;
  peft 0.22 runs them. The check is one forward pass of the built model before training, whose
  logits must move with the prefixes (``jaxpeft.bench.peer.prefixes_dropped``);
* on a family other than BERT: ``--pooling=mean|cosine``, ``--bitfit_terms``, bottleneck adapters;
* ``--pooling=mean|cosine`` on token and span tasks (their heads read every token; ours refuses
  them too);
* your own classification files or ``--dataset`` (the peer reads GLUE's, and own tagging/QA files).

    python benchmarks/peft_job.py --method=bitfit --task=sst2 --data_dir=GLUE --model=DIR \\
        --learning_rate=3e-3 --num_epochs=2 --max_seq_length=64 --mode=eager
    python benchmarks/peft_job.py --method=lora --task=ner --data_dir=CONLL2003 --learning_rate=1e-3 \\
        --num_epochs=3 --max_seq_length=128
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


#: Our BitFit terms (``jaxpeft.masks.BERT_BIAS_TERMS``) match transformers' names once ``.`` is ``/``.
def _ours(name: str) -> str:
    return name.replace(".", "/")


def add_adapters(model, size: int, sites: tuple[str, ...]) -> list:
    """Houlsby bottleneck adapters, as ours (``jaxpeft.methods.bottleneck``): ``y + up(gelu(down(y)))``
    on each sublayer's projection output after its dropout, before its residual LayerNorm; ``down``
    ``N(0, 0.02)``, ``up`` zero. Returns the adapter modules."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, hidden: int):
            super().__init__()
            self.down, self.up = nn.Linear(hidden, size), nn.Linear(size, hidden)
            nn.init.normal_(self.down.weight, std=0.02)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, y):
            return y + self.up(torch.nn.functional.gelu(self.down(y)))

    def patch(block):  # BertSelfOutput / BertOutput: dense -> dropout -> adapter -> LayerNorm(+ input)
        block.adapter = Bottleneck(block.dense.out_features)
        block.forward = lambda h, x: block.LayerNorm(block.adapter(block.dropout(block.dense(h))) + x)
        return block.adapter

    out = []
    for layer in model.bert.encoder.layer:
        if "attention" in sites:
            out.append(patch(layer.attention.output))
        if "output" in sites:
            out.append(patch(layer.output))
    return out


def read_mean(model) -> None:
    """``--pooling=mean``, as ours (``jaxpeft.models.bert``): the classifier reads the mean of the
    last layer's outputs over the attended positions (a prompt's virtual tokens included, a prefix's
    keys not), summed in float32, instead of the pooler on [CLS]. The pooler is replaced by the
    mean; the attention mask comes from BERT's own call (peft's prompt methods pass it with the
    virtual tokens' ones in front, so its last ``T`` columns are the ``T`` outputs' own)."""
    from torch import nn

    class MeanPool(nn.Module):
        mask = None

        def forward(self, hidden):
            h = hidden.float()
            if self.mask is None:
                return h.mean(1)
            m = self.mask[:, -h.shape[1]:].to(h.dtype).unsqueeze(-1)
            return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    pool = MeanPool()

    def grab_mask(module, args, kwargs):
        pool.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)

    model.bert.register_forward_pre_hook(grab_mask, with_kwargs=True)
    model.bert.pooler = pool


def read_cosine(model) -> None:
    """``--pooling=cosine``, as ours: the batch's rows are the pairs' first sentences then their
    second ones (:func:`split_pairs`), each read as its mean (:func:`read_mean`), and the classifier
    reads the cosine of the two means through a linear layer of one input (no dropout)."""
    import torch
    from torch import nn

    class CosineHead(nn.Module):
        def __init__(self, num_labels: int):
            super().__init__()
            self.dense = nn.Linear(1, num_labels)
            nn.init.normal_(self.dense.weight, std=model.config.initializer_range)
            nn.init.zeros_(self.dense.bias)

        def forward(self, pooled):
            u, v = pooled.float().chunk(2)
            return self.dense(torch.nn.functional.cosine_similarity(u, v, eps=1e-8)[:, None])

    read_mean(model)
    model.dropout = nn.Identity()
    model.classifier = CosineHead(model.num_labels)


def split_pairs(b: dict) -> dict:
    """Host rows ``[CLS] a [SEP] b [SEP]`` as ``2B`` rows ``[CLS] a [SEP]`` then ``[CLS] b [SEP]``
    (each as the tokenizer encodes one sentence; token types 0), right-padded with 0."""
    import numpy as np

    ids, mask, types = b["input_ids"], b["attention_mask"].astype(bool), b["token_type_ids"]
    n, width = ids.shape
    out_ids, out_mask = np.zeros((2 * n, width), ids.dtype), np.zeros((2 * n, width), b["attention_mask"].dtype)
    for i in range(n):
        row, kind = ids[i][mask[i]], types[i][mask[i]]
        for j, part in ((i, row[kind == 0]), (n + i, np.concatenate([row[:1], row[kind != 0]]))):
            out_ids[j, :len(part)], out_mask[j, :len(part)] = part, 1
    return {"input_ids": out_ids, "attention_mask": out_mask, "token_type_ids": np.zeros_like(out_ids)}


#: ``--method`` of bottleneck adapters (``adapter``: their earlier name)
BOTTLENECK = ("bottleneck", "adapter")
#: peft's task type and the head's module of each task kind (``jaxpeft.tasks.base.Task.kind``)
PEFT_TASK_TYPE = {"sequence": "SEQ_CLS", "token": "TOKEN_CLS", "span": "QUESTION_ANS"}
HEAD = {"sequence": "classifier", "token": "classifier", "span": "qa_outputs"}
#: Exit status of a run the peer cannot make (one ``error:`` line says why).
CANNOT = 2


def cannot_run(a, kind: str) -> str | None:
    """Why the peer cannot run ``a.method`` on a task of ``kind`` (see the module docstring), or ``None``."""
    if kind != "sequence" and a.pooling != "cls":
        return (f"--pooling={a.pooling} reads one vector per example; the {kind} head of --task={a.task} "
                "reads every token (ours refuses it too)")
    family = model_type(a.model)
    if family != "bert":
        if a.pooling != "cls":
            return f"--pooling={a.pooling}: the peer reads a mean only through BERT's pooler (this model is {family})"
        if a.method in BOTTLENECK:
            return f"--method={a.method}: the peer's bottleneck adapters are written for BERT's layers (this model is {family})"
        if a.bitfit_terms:
            return f"--bitfit_terms names BERT's bias terms (this model is {family})"
    return None


def _model_dir(model: str | None) -> Path:
    from jaxpeft.models import hf_weights

    return Path(hf_weights.resolve_model_dir(model or hf_weights.DEFAULT_MODEL))


def model_type(model: str | None) -> str:
    """The ``model_type`` of the model folder (``bert``, ``mpnet``, ``roberta``...)."""
    return json.loads((_model_dir(model) / "config.json").read_text())["model_type"]


def takes_token_types(model) -> bool:
    """Whether the encoder reads token types (BERT, ELECTRA); RoBERTa's single type, and families
    without any (MPNet, DistilBERT, DeBERTa-v2 as configured), get none."""
    return getattr(model.config, "type_vocab_size", 0) > 1


class TokenTypes:
    """Hands the batch's token types to BERT under peft's ``QUESTION_ANS`` models, which drop them:
    a forward pre-hook on ``model.bert`` that fills in :attr:`types` (0 on the virtual tokens in
    front, as peft's other task types do) where the call brings none."""

    def __init__(self, model):
        self.types = None
        getattr(model, model.base_model_prefix).register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        import torch

        if self.types is None or kwargs.get("token_type_ids") is not None or len(args) > 2:
            return None
        ref = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if ref is None and args:
            ref = args[0]
        t = self.types
        extra = ref.shape[1] - t.shape[1]
        if extra > 0:
            t = torch.cat([t.new_zeros(t.shape[0], extra), t], 1)
        return args, {**kwargs, "token_type_ids": t}


def build(model_dir: str, a, num_labels: int, kind: str = "sequence"):
    """The model of ``a.method`` with our config's trainable set, for a task of ``kind``
    (``sequence``, ``token`` or ``span``)."""
    import re

    import torch
    import transformers

    from jaxpeft.bench.peer import PEFT_TARGETS, head_names

    if kind == "span":
        model = transformers.AutoModelForQuestionAnswering.from_pretrained(model_dir, dtype=torch.float32)
        if takes_token_types(model):
            model.token_types = TokenTypes(model)
    elif kind == "token":
        model = transformers.AutoModelForTokenClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                             dtype=torch.float32)
    else:   # the folder's family: BertForSequenceClassification, MPNetForSequenceClassification...
        model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                                                dtype=torch.float32)
    family = model.config.model_type
    # the head: every top-level module beside the encoder (DeBERTa's pooler too) on a sequence task
    heads = head_names(model) if kind == "sequence" else [HEAD[kind]]
    if a.pooling == "mean":
        read_mean(model)
    elif a.pooling == "cosine":
        read_cosine(model)
    if a.method in ("full", "frozen", "bitfit") + BOTTLENECK:
        from jaxpeft.masks import BERT_BIAS_TERMS, BITFIT_ALIASES

        terms = [BITFIT_ALIASES.get(t.strip().lower(), t.strip()) for t in (a.bitfit_terms or "").split(",")
                 if t.strip()]
        bias = re.compile("|".join(f"(?:{BERT_BIAS_TERMS[t]})" for t in terms)) if terms else None
        if a.method in BOTTLENECK:
            sites = ("attention", "output") if a.adapter_type == "houlsby" else ("output",)
            add_adapters(model, a.adapter_size, sites)
        for name, p in model.named_parameters():
            if a.method == "full" or name.split(".", 1)[0] in heads:
                p.requires_grad = True
            elif a.method == "bitfit":
                p.requires_grad = name.endswith("bias") and (bias is None or bool(bias.search(_ours(name))))
            elif a.method in BOTTLENECK:
                p.requires_grad = ".adapter." in name or (a.adapter_type == "houlsby" and "LayerNorm" in name)
            else:
                p.requires_grad = False
        return model
    import peft

    v, H, task_type = a.num_virtual_tokens, model.config.hidden_size, PEFT_TASK_TYPE[kind]
    # the family's targets as ours name them (jaxpeft.bench.peer.PEFT_TARGETS); BERT: peft's own
    lora_targets, ia3_targets, ia3_ff = PEFT_TARGETS.get(family, (("query", "value"), None, None))
    ia3_targets, ia3_ff = (list(ia3_targets) if ia3_targets else None), (list(ia3_ff) if ia3_ff else None)
    # peft adds the classifier itself; the head's other modules (DeBERTa's pooler) train with it, as ours
    more = [h for h in heads if h != HEAD[kind]] or None
    kinds = {
        "prompt": lambda: peft.PromptTuningConfig(
            task_type=task_type, num_virtual_tokens=v,
            prompt_tuning_init={"sample_vocab": "SAMPLE_VOCAB"}.get(a.prompt_init, "RANDOM"), modules_to_save=more),
        "ptuning": lambda: peft.PromptEncoderConfig(
            task_type=task_type, num_virtual_tokens=v, encoder_reparameterization_type=a.encoder_type.upper(),
            encoder_num_layers=a.encoder_num_layers,   # ours: H/2 per LSTM direction, H for the MLP
            encoder_hidden_size=a.encoder_hidden_size or H // (2 if a.encoder_type == "lstm" else 1),
            modules_to_save=more),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=v, prefix_projection=True,
                                                  encoder_hidden_size=a.encoder_hidden_size or 512,
                                                  modules_to_save=more),
        "ptuning_v2": lambda: peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=v,
                                                      modules_to_save=more),
        "lora": lambda: peft.LoraConfig(task_type=task_type, r=a.lora_r, lora_alpha=a.lora_alpha,
                                        lora_dropout=a.lora_dropout,
                                        target_modules=(a.target_modules or ",".join(lora_targets)).split(","),
                                        use_dora=a.use_dora, use_rslora=a.use_rslora, modules_to_save=more),
        "ia3": lambda: peft.IA3Config(   # None on BERT: peft's defaults, as ours; the family's elsewhere
            task_type=task_type,
            target_modules=a.target_modules.split(",") if a.target_modules else ia3_targets,
            feedforward_modules=a.feedforward_modules.split(",") if a.feedforward_modules else ia3_ff,
            modules_to_save=more),
    }
    if a.method not in kinds:
        raise SystemExit(f"the peer has no method {a.method!r}")
    model = peft.get_peft_model(model, kinds[a.method]())
    from jaxpeft.bench.peer import prefixes_dropped

    why = prefixes_dropped(model, a.method)      # prefix methods: peft must run them and reach attention
    if why:
        raise error(why)
    return model


#: Exit status of a run paused by ``--time_limit`` (its state saved; run it again to go on).
PAUSED = 75

#: Flags a resumed run may change; every other flag must be the paused run's.
_FREE_ON_RESUME = ("data_dir", "state", "time_limit")


def peer_args(cfg) -> list[str]:
    """This script's flags for the run ``cfg`` (a ``jaxpeft.config.TrainConfig``) describes: the same
    method, task, schedule, evaluations and method options. Packing, the dropout and compute settings
    and P-tuning v2's dropout on the prefixes have no counterpart here (peft has no prefix dropout).
    The pooling is the one ours trains with: a method config's cosine falls back to ``cls`` on a
    family whose pairs have no token types (``jaxpeft.training.single.default_pooling``)."""
    import copy

    from jaxpeft.training.single import default_pooling

    cfg = copy.deepcopy(cfg)
    default_pooling(cfg, lambda _: None)
    o, d, r, m = cfg.optim, cfg.data, cfg.run, dict(cfg.method_options)
    if cfg.head.modules_to_save:
        raise SystemExit("the peer trains no modules_to_save but the classifier")
    args = [f"--method={cfg.method}", f"--task={cfg.task}", f"--learning_rate={o.learning_rate}",
            f"--batch_size={o.batch_size}", f"--num_epochs={o.num_epochs}", f"--max_seq_length={d.max_seq_length}",
            f"--max_steps={o.max_steps}", f"--warmup_ratio={o.warmup_ratio}", f"--weight_decay={o.weight_decay}",
            f"--max_grad_norm={o.max_grad_norm}", f"--eval_batch_size={d.eval_batch_size}",
            f"--max_train_examples={d.max_train_examples}",
            f"--max_eval_examples={d.max_eval_examples}", f"--eval_every={r.eval_every}", f"--seed={o.seed}",
            f"--pooling={cfg.head.pooling}"]
    if o.head_learning_rate is not None:
        args.append(f"--head_learning_rate={o.head_learning_rate}")
    if d.group_by_length is not None:   # unset: the peer's own default, ours (random batches where a task tags)
        args.append("--group_by_length" if d.group_by_length else "--no-group_by_length")
    if d.dataset:
        raise SystemExit("the peer reads no --dataset (a named task or your own tagging/QA files)")
    if d.train_file:
        args += [f"--train_file={d.train_file}", f"--task_type={d.task_type}"] + \
            ([f"--validation_file={d.validation_file}"] if d.validation_file else [])
    args.append(f"--doc_stride={d.doc_stride}")
    method = cfg.method_obj()
    for k in ("num_virtual_tokens", "bitfit_terms", "prompt_init", "encoder_type", "encoder_hidden_size",
              "encoder_num_layers", "lora_r", "lora_alpha", "lora_dropout", "target_modules", "feedforward_modules",
              "adapter_size", "adapter_type"):
        v = m.get(k, getattr(method, k, None))
        if v is not None:
            args.append(f"--{k}={v}")
    for k in ("use_dora", "use_rslora"):
        if m.get(k, getattr(method, k, False)):
            args.append(f"--{k}")
    return args


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="bitfit")
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--data_dir", default=None, help="the named task's data folder (as ours)")
    ap.add_argument("--train_file", default=None, help="your own tagging or QA training file (as ours)")
    ap.add_argument("--validation_file", default=None, help="your own tagging or QA validation file")
    ap.add_argument("--task_type", default="auto", choices=("auto", "tagging", "qa"),
                    help="your own files' task (auto: what they look like)")
    ap.add_argument("--doc_stride", type=int, default=128, help="QA: tokens shared by consecutive windows")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled MiniLM)")
    ap.add_argument("--learning_rate", type=float, default=3e-3)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--eval_batch_size", type=int, default=128)
    ap.add_argument("--num_epochs", type=float, default=2)
    ap.add_argument("--max_seq_length", type=int, default=64)
    ap.add_argument("--warmup_ratio", type=float, default=0.06)
    ap.add_argument("--weight_decay", type=float, default=0.0)
    ap.add_argument("--max_train_examples", type=int, default=0)
    ap.add_argument("--max_eval_examples", type=int, default=0)
    ap.add_argument("--max_steps", type=int, default=0, help="stop after N steps (0: --num_epochs decides)")
    ap.add_argument("--max_grad_norm", type=float, default=1.0)
    ap.add_argument("--head_learning_rate", type=float, default=None,
                    help="the classifier's own peak rate (default: --learning_rate)")
    ap.add_argument("--eval_every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    ap.add_argument("--num_virtual_tokens", type=int, default=20)
    ap.add_argument("--bitfit_terms", default=None, help="BitFit: comma list of bias terms (default: every bias)")
    ap.add_argument("--prompt_init", default="random")
    ap.add_argument("--encoder_type", default="lstm")
    ap.add_argument("--encoder_hidden_size", type=int, default=None)
    ap.add_argument("--encoder_num_layers", type=int, default=2)
    ap.add_argument("--lora_r", type=int, default=8)
    ap.add_argument("--lora_alpha", type=float, default=16.0)
    ap.add_argument("--lora_dropout", type=float, default=0.0)
    ap.add_argument("--target_modules", default=None, help="LoRA/IA3 targets (default: peft's for BERT)")
    ap.add_argument("--feedforward_modules", default=None, help="IA3's feed-forward targets (default: peft's)")
    ap.add_argument("--use_dora", action="store_true")
    ap.add_argument("--use_rslora", action="store_true")
    ap.add_argument("--adapter_size", type=int, default=64)
    ap.add_argument("--adapter_type", default="houlsby")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group_by_length", action=argparse.BooleanOptionalAction, default=None,
                    help="batches of examples of similar lengths, as ours (--no-group_by_length: random "
                         "batches, as transformers' Trainer by default; unset: as ours, random for "
                         "tagging, grouped otherwise)")
    ap.add_argument("--pooling", default="cls", choices=("cls", "mean", "cosine"),
                    help="cls: the pooler on [CLS]; mean: the mean of the last layer's outputs; cosine: the "
                         "cosine of a pair's two sentences encoded apart; as ours")
    ap.add_argument("--mode", default="eager", choices=("eager", "compile"))
    ap.add_argument("--state", default=None,
                    help="resumable run: where its state is kept when --time_limit pauses it; a run started "
                         "with an existing state file resumes from it (and deletes it when it finishes)")
    ap.add_argument("--time_limit", type=float, default=0.0,
                    help="pause after the first step that ends this many seconds after the start, saving "
                         f"the state to --state, and exit with status {PAUSED} (0: no limit)")
    return ap


def error(message: str) -> SystemExit:
    """One ``error:`` line on stderr; raise the result to exit with status :data:`CANNOT`."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return SystemExit(CANNOT)


def load_task(a):
    """Our task object for the run (``jaxpeft.tasks.get``, the task code our runs use)."""
    from types import SimpleNamespace

    from jaxpeft import tasks
    from jaxpeft.errors import UserError

    data = SimpleNamespace(data_dir=a.data_dir, train_file=a.train_file, validation_file=a.validation_file,
                           test_file=None, dataset=None, task_type=a.task_type, doc_stride=a.doc_stride,
                           text_columns=None, label_column="label", validation_fraction=0.1)
    try:
        task = tasks.get(a.task, data, a.seed)
    except UserError as e:
        raise error(str(e)) from None
    if task.kind == "sequence" and a.train_file:
        raise error("your own classification files: the peer reads GLUE's, and your own tagging or QA files "
                    "(--task_type=tagging|qa)")
    why = cannot_run(a, task.kind)
    if why:
        raise error(why)
    return task


def prepare(a, task, tok) -> tuple:
    """``(train, dev_raw, dev)``: the encoded training rows, the dev split's raw examples and their
    encoded rows -- ours (``Task.encode``: a tagging task's windows and first-sub-word labels, a QA
    task's windows and start/end positions; GLUE's rows as ``jaxpeft.data.encoding.encode``)."""
    from jaxpeft.data import encoding

    train_raw = task.read("train")
    if a.max_train_examples:
        train_raw = task.take(train_raw, a.max_train_examples)
    dev_raw = task.read(task.eval_splits[0])
    if a.max_eval_examples:
        dev_raw = task.take(dev_raw, a.max_eval_examples)
    if task.kind == "sequence":     # uncached, as before: the peer's data time is its own tokenizing
        return (encoding.encode(tok, train_raw, a.max_seq_length), dev_raw,
                encoding.encode(tok, dev_raw, a.max_seq_length))
    return task.encode(tok, train_raw, a.max_seq_length), dev_raw, task.encode(tok, dev_raw, a.max_seq_length)


def task_outputs(out, kind: str, width: int):
    """The model's outputs as ours: ``[B, C]`` logits of a sequence task, ``[B, T, C]`` of a token
    task, ``[B, T, 2]`` start/end logits of a span task -- the last ``width`` positions (peft's prompt
    methods put their virtual tokens in front; ours drop their outputs too)."""
    import torch

    if kind == "sequence":
        return out.logits.float()
    if kind == "token":
        return out.logits.float()[:, -width:]
    return torch.stack([out.start_logits, out.end_logits], -1).float()[:, -width:]


def task_loss(logits, b: dict, kind: str, regression: bool = False):
    """Our task's loss (``Task.loss``) in PyTorch, on the batch ``b`` (torch tensors)."""
    import torch
    from torch.nn.functional import cross_entropy

    if kind == "token":     # mean over the batch's labelled tokens (-100 elsewhere)
        labels = b["labels"].long()
        scored = labels != -100
        per = cross_entropy(logits.flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
        return (per * scored.flatten()).sum() / scored.sum().clamp(min=1)
    weights = b["weights"]
    if kind == "span":      # start and end over each window's real tokens, averaged, weighted per window
        real = torch.arange(logits.shape[1], device=logits.device)[None, :] < b["attention_mask"].sum(-1, keepdim=True)
        masked = logits.masked_fill(~real[..., None], -1e9)
        per = (cross_entropy(masked[..., 0], b["start_positions"].long(), reduction="none")
               + cross_entropy(masked[..., 1], b["end_positions"].long(), reduction="none")) / 2
    elif regression:
        per = (logits[:, 0] - b["labels"].float()) ** 2
    else:
        per = cross_entropy(logits, b["labels"].long(), reduction="none")
    return (per * weights).sum() / weights.sum().clamp(min=1.0)


def main(argv: list[str] | None = None, keep: dict | None = None) -> int:
    """Runs the job of ``argv`` (default: the command line) and prints its JSON line. ``keep``
    (a dict) receives the trained ``model``, the ``task`` and the ``dev_raw`` / ``dev`` data."""
    a = parser().parse_args(argv)

    import numpy as np
    import torch

    from jaxpeft.data import batches
    from jaxpeft.models import hf_weights

    torch.manual_seed(a.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_import = time.perf_counter() - _START

    t0 = time.perf_counter()
    task = load_task(a)
    kind = task.kind
    model_dir = str(hf_weights.resolve_model_dir(a.model or hf_weights.DEFAULT_MODEL))
    tok = hf_weights.load_tokenizer(Path(model_dir))
    train, dev_raw, dev_enc = prepare(a, task, tok)
    grouped = a.group_by_length if a.group_by_length is not None else batches.groups_by_length([kind])  # as ours
    train_batches = batches.BucketBatches(train, a.batch_size, a.max_seq_length, a.seed,  # ours: the same order
                                          group_by_length=grouped)
    buckets = train_batches.buckets
    t_data = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = build(model_dir, a, task.num_labels, kind).to(dev)
    types_hook = getattr(model, "token_types", None)
    types = takes_token_types(model)
    t_startup = t_import + time.perf_counter() - t0
    if keep is not None:
        keep.update(model=model, task=task, dev_raw=dev_raw, dev=dev_enc, train=train)

    def to_torch(b):
        if a.pooling == "cosine":
            b = split_pairs(b)
        out = {k: torch.from_numpy(b[k]).to(dev, non_blocking=True).long()
               for k in ("input_ids", "attention_mask") + (("token_type_ids",) if types else ())}
        if types_hook is not None:
            types_hook.types = out["token_type_ids"]
        return out

    def forward(b):
        inputs = to_torch(b)
        return task_outputs(fwd(**inputs), kind, inputs["input_ids"].shape[1])

    params = [p for p in model.parameters() if p.requires_grad]
    # weight decay on matrices but not on embeddings or LayerNorms (ours: jaxpeft.training.optim.decay_mask);
    # the classifier at its own rate where the config gives one
    head_lr = a.head_learning_rate or a.learning_rate
    groups: dict[tuple[bool, bool], list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            decays = p.ndim > 1 and "LayerNorm" not in n and "embeddings" not in n
            groups.setdefault((HEAD[kind] in n, decays), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": a.weight_decay if decays else 0.0,
                              "lr": head_lr if head else a.learning_rate}
                             for (head, decays), ps in groups.items()], lr=a.learning_rate)
    spe = train_batches.steps_per_epoch
    total = a.max_steps if a.max_steps > 0 else max(1, math.ceil(a.num_epochs * spe))
    warmup = int(round(a.warmup_ratio * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(warmup, 1) if s < warmup else max(0.0, (total - s) / max(total - warmup, 1)))
    fwd = torch.compile(model) if a.mode == "compile" else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        "cpu", enabled=False)

    def evaluate() -> dict:
        """Our task's metrics (``Task.evaluate``) of the dev outputs, per-token outputs zero-padded
        to the rows' length as ours (``jaxpeft.training.steps.predict_outputs``)."""
        model.eval()
        shape = {"sequence": (task.num_labels,), "token": (dev_enc.max_length, task.num_labels),
                 "span": (dev_enc.max_length, 2)}[kind]
        outputs = np.zeros((len(dev_enc), *shape), np.float32)
        with torch.no_grad(), autocast:
            for idx in batches.eval_order(dev_enc.lengths, a.eval_batch_size):
                b = batches.make_batch(dev_enc, idx, buckets)
                out = forward(b).cpu().numpy()
                real = idx >= 0
                if kind == "sequence":
                    outputs[idx[real]] = out[real]
                else:
                    outputs[idx[real], :out.shape[1]] = out[real]
        model.train()
        return task.evaluate(outputs, dev_enc, dev_raw)

    model.train()
    step, train_s, eval_s, examples, evals, parts, wall0 = 0, 0.0, 0.0, 0, [], 1, 0.0
    state = Path(a.state) if a.state else None
    if state is not None and state.is_file():
        saved = torch.load(state, map_location=dev, weights_only=False)
        flags = parser()   # a flag added since the state was saved: that run had its default
        differ = [k for k, v in vars(a).items() if k not in _FREE_ON_RESUME
                  and saved["args"].get(k, flags.get_default(k)) != v]
        if differ:
            raise SystemExit(f"{state}: saved by a run with other settings ({', '.join(differ)}); delete it to start over")
        model.load_state_dict(saved["trainable"], strict=False)
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"]["cpu"].cpu())
        if dev.type == "cuda":
            torch.cuda.set_rng_state(saved["rng"]["cuda"].cpu())
        step, train_s, eval_s, examples, evals = (saved[k] for k in ("step", "train_s", "eval_s", "examples", "evals"))
        parts, wall0 = saved["parts"] + 1, saved["wall_s"]
        print(f"resuming at step {step} of {total} from {state}", file=sys.stderr, flush=True)

    def pause() -> int:
        """Saves what the next run needs to go on from ``step`` exactly (written whole, then renamed)."""
        if dev.type == "cuda":
            torch.cuda.synchronize()
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        tmp = state.with_name(state.name + ".tmp")
        torch.save({"args": vars(a), "step": step, "examples": examples, "evals": evals, "parts": parts,
                    "wall_s": wall0 + time.perf_counter() - _START,
                    "train_s": train_s + time.perf_counter() - t_loop - (eval_s - eval_s0), "eval_s": eval_s,
                    "trainable": {n: t for n, t in model.state_dict().items() if n in names},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "rng": {"cpu": torch.get_rng_state(),
                            "cuda": torch.cuda.get_rng_state() if dev.type == "cuda" else None}}, tmp)
        os.replace(tmp, state)
        print(json.dumps({"paused": True, "step": step, "steps": total, "state": str(state), "evals": evals}),
              flush=True)
        return PAUSED

    t_loop, eval_s0 = time.perf_counter(), eval_s
    while step < total:
        epoch = step // spe
        for i, idx in enumerate(train_batches.order(epoch)):
            if i < step - epoch * spe:      # done before the pause
                continue
            b = batches.make_batch(train, idx, buckets)
            targets = {k: torch.from_numpy(b[k]).to(dev)
                       for k in ("labels", "weights", "attention_mask", "start_positions", "end_positions") if k in b}
            with autocast:
                logits = forward(b)
            loss = task_loss(logits, targets, kind, task.is_regression)
            loss.backward()
            if a.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            examples += int((idx >= 0).sum())
            if (step % a.eval_every == 0 if a.eval_every > 0 else step % spe == 0) or step == total:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t_e = time.perf_counter()
                m = evaluate()
                eval_s += time.perf_counter() - t_e
                evals.append({"step": step, "wall_seconds": wall0 + time.perf_counter() - _START, **m})
            if step >= total:
                break
            if state is not None and a.time_limit > 0 and time.perf_counter() - _START > a.time_limit:
                return pause()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    train_s += time.perf_counter() - t_loop - (eval_s - eval_s0)
    print(json.dumps({
        "framework": f"torch {torch.__version__}", "mode": a.mode, "method": a.method, "task": task.name, "task_kind": task.kind,
        "seed": a.seed, "args": vars(a),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "steps": step,
        "startup_seconds": t_startup, "data_seconds": t_data, "train_seconds": train_s, "eval_seconds": eval_s,
        "wall_seconds": wall0 + time.perf_counter() - _START, "examples_per_second": examples / max(train_s, 1e-9),
        "evals": evals, "final_dev": evals[-1] if evals else None, "main_metric": task.main_metric,
        "best_dev": max(evals, key=lambda e: e[task.main_metric]) if evals else None,
        "trainable_params": sum(p.numel() for p in params), "parts": parts}), flush=True)
    if state is not None:
        state.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # transformers from 5.2x fetches fused kernels from the hub for a model on a GPU unless this is
    # off; the benchmark machines have no network, and the peer runs transformers' own modules
    os.environ.setdefault("USE_HUB_KERNELS", "0")
    sys.exit(main())
