"""Adapters of the tagging and QA task kinds move between jaxpeft and peft (TOKEN_CLS, QUESTION_ANS),
checked against the real library on a tiny random BERT: logits within 1e-4, float32.

For LoRA both ways (jaxpeft -> ``peft.PeftModel.from_pretrained`` on ``BertForTokenClassification`` /
``BertForQuestionAnswering``, and a peft adapter with non-zero ``lora_B`` read by jaxpeft); for prompt
tuning (``prompt_position=front``, peft's placement) both ways, comparing the real tokens' outputs
(peft's output rows of its virtual tokens are dropped, as our heads drop them).

peft's ``PeftModelForQuestionAnswering`` drops ``token_type_ids`` (its ``forward`` takes them by name
and passes them on neither to the base model nor, under prompt learning, to the virtual tokens'
concatenation), so BERT under peft reads a question and its context as one segment. The LoRA
comparison calls peft's LoRA-wrapped model directly, with the token types; the prompt comparison
gives both sides all-zero token types."""

import warnings

import jax
import numpy as np
import pytest

from jaxpeft import masks, methods
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import predict as prediction
from jaxpeft.compute import EXACT
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.fingerprint import fingerprint
from jaxpeft.models.heads import head_modules
from jaxpeft.models.loading import load_model
from jaxpeft.tasks import qa, tagging
from jaxpeft.tasks.conll import TaggedSentences
from jaxpeft.tasks.squad import QAExample, SquadData

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import BertForQuestionAnswering, BertForTokenClassification  # noqa: E402

SEQ = 40
ATOL = 1e-4
TAGS = ("B-LOC", "I-LOC", "I-PER", "O")
SENTENCES = [["EU", "rejects", "German", "call"], ["Peter", "Blackburn", "in", "Brussels", "today", "."]]
QUESTIONS = [("Who rejects the call?", "The EU rejects the German call to boycott lamb."),
             ("Where is Peter?", "Peter Blackburn is in Brussels , it is said .")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tasks():
    tag = tagging.from_record({"task": "tags", "label_names": list(TAGS), "tag_metric": "seqeval"})
    span = qa.from_record({"task": "qa"})
    return {"token": tag, "span": span}


def raw(kind):
    if kind == "token":
        return TaggedSentences([list(s) for s in SENTENCES], None, "<test>", [0, 0])
    return SquadData([QAExample(f"q{i}", q, c, (), (), 0, "") for i, (q, c) in enumerate(QUESTIONS)], 1, "<test>")


def randomised(params, paths_rx, seed=0):
    """``params`` with the leaves matching ``paths_rx`` (and the head) drawn at random."""
    import re

    rng = np.random.default_rng(seed)
    flat = masks.flatten(params)
    for p, v in flat.items():
        if re.search(paths_rx, p) or p.startswith(("classifier/", "qa_outputs/")):
            flat[p] = jax.numpy.asarray(rng.normal(0, 0.2, v.shape), v.dtype)
    return masks.unflatten(flat, params)


def ours(model_dir, method, kind):
    task = tasks()[kind]
    loaded = load_model(str(model_dir), task.head(), method, compute=EXACT)
    rx = r"_lora/lora_[AB]/kernel$" if method.name == "lora" else r"^prompt/"
    params = randomised(method.init_params(loaded.params, BERT), rx)
    return loaded, params, task


def jax_outputs(loaded, params, method, task, kind, zero_types=False):
    if not zero_types:
        return prediction.outputs(loaded, params, method, task, raw(kind), max_seq_length=SEQ, batch_size=4)
    from jaxpeft.data.batches import BucketBatches
    from jaxpeft.training import steps

    enc = task.encode(loaded.tokenizer, raw(kind), SEQ)
    enc.token_type_ids[:] = 0
    trainable, frozen = masks.split(params, method.mask(params, BERT, head_modules(BERT, task.head())))
    fn = jax.jit(steps.make_predict_step(loaded.module))
    batches = BucketBatches(enc, 4, SEQ, 0).eval_batches(enc, 4)
    return steps.predict_outputs(fn, trainable, frozen, batches, len(enc), length=SEQ), enc


def torch_model(model_dir, kind):
    cls = BertForTokenClassification if kind == "token" else BertForQuestionAnswering
    kw = {"num_labels": len(TAGS)} if kind == "token" else {}
    return cls.from_pretrained(str(model_dir), **kw).eval()


def torch_outputs(model, model_dir, enc, kind, virtual=0):
    if isinstance(model, peft.PeftModel) and not model.active_peft_config.is_prompt_learning:
        model = model.base_model      # the LoRA-wrapped transformers model, which takes token_type_ids
    ids = torch.tensor(enc.input_ids, dtype=torch.long)
    mask = torch.tensor(np.arange(enc.input_ids.shape[1])[None] < enc.lengths[:, None], dtype=torch.long)
    types = torch.tensor(enc.token_type_ids, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    logits = out.logits if kind == "token" else torch.stack([out.start_logits, out.end_logits], -1)
    return logits.numpy()[:, virtual:], mask.numpy().astype(bool)


@pytest.mark.parametrize("kind", ["token", "span"])
@pytest.mark.parametrize("method_name,options", [("lora", {}), ("prompt", {"prompt_position": "front"})])
def test_jaxpeft_adapter_of_a_task_kind_loads_in_peft_and_back(tiny_bert_dir, tmp_path, kind, method_name,
                                                               options):
    method = methods.create(method_name, options)
    loaded, params, task = ours(tiny_bert_dir, method, kind)
    folder = adapters.save_adapter(
        tmp_path / "adapter", params, method, task, family=BERT, model_config=loaded.config,
        base_model=str(tiny_bert_dir), fingerprint=fingerprint(params, str(tiny_bert_dir), exclude=method.added),
        max_seq_length=SEQ, heads=head_modules(BERT, task.head()))
    cfg = adapters.read_adapter(folder).config
    assert cfg["task_type"] == ("TOKEN_CLS" if kind == "token" else "QUESTION_ANS")
    zero_types = kind == "span" and method_name == "prompt"     # what peft gives its QA prompt model
    ours_out, enc = jax_outputs(loaded, params, method, task, kind, zero_types)
    model = peft.PeftModel.from_pretrained(torch_model(tiny_bert_dir, kind), str(folder)).eval()
    virtual = method.extra_positions()
    theirs, real = torch_outputs(model, tiny_bert_dir, enc, kind, virtual)
    width = theirs.shape[1]
    np.testing.assert_allclose(ours_out[:, :width][real], theirs[real], atol=ATOL, rtol=0)
    # read back by jaxpeft: the same outputs
    loaded2, params2, method2, task2 = adapters.load_adapter(folder, compute=EXACT)
    again, _ = jax_outputs(loaded2, params2, method2, task2, kind, zero_types)
    np.testing.assert_allclose(again, ours_out, atol=1e-6)


@pytest.mark.parametrize("kind", ["token", "span"])
def test_peft_lora_adapter_of_a_task_kind_loads_in_jaxpeft(tiny_bert_dir, tmp_path, kind):
    torch.manual_seed(0)
    model = torch_model(tiny_bert_dir, kind)
    task_type = "TOKEN_CLS" if kind == "token" else "QUESTION_ANS"
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8,
                                                    target_modules=["query", "value"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "classifier" in name or "qa_outputs" in name:
                p.normal_(0, 0.2)
    pm.save_pretrained(str(tmp_path / "peft"))
    rec_task = tasks()[kind]    # a peft folder records no task: ours gives the labels
    folder = adapters.read_adapter(tmp_path / "peft")
    assert folder.task_kind == kind
    loaded = load_model(str(tiny_bert_dir), rec_task.head(), folder.method, compute=EXACT)
    arrays = adapters.adapter_arrays(folder, loaded.params, loaded.config)
    params = adapters.overlay(loaded.params, arrays, "peft")
    ours_out, enc = jax_outputs(loaded, params, folder.method, rec_task, kind)
    theirs, real = torch_outputs(pm.eval(), tiny_bert_dir, enc, kind)
    np.testing.assert_allclose(ours_out[:, :theirs.shape[1]][real], theirs[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["token", "span"])
def test_padding_to_fewer_lengths_keeps_every_output(tiny_bert_dir, kind):
    """``--length_buckets``: the same examples padded to the longest length only give the same
    per-token outputs as padded to the smallest bucket that fits each batch."""
    from jaxpeft.data.batches import BucketBatches
    from jaxpeft.training import steps

    method = methods.create("lora", {})
    loaded, params, task = ours(tiny_bert_dir, method, kind)
    enc = task.encode(loaded.tokenizer, raw(kind), SEQ)
    trainable, frozen = masks.split(params, method.mask(params, BERT, head_modules(BERT, task.head())))
    fn = jax.jit(steps.make_predict_step(loaded.module))
    fine, coarse = BucketBatches(enc, 2, SEQ, 0), BucketBatches(enc, 2, SEQ, 0)
    coarse.use_buckets((SEQ,))
    widths = {b["input_ids"].shape[1] for b in fine.eval_batches(enc, 2)}
    assert max(widths) < SEQ and {b["input_ids"].shape[1] for b in coarse.eval_batches(enc, 2)} == {SEQ}
    a = steps.predict_outputs(fn, trainable, frozen, fine.eval_batches(enc, 2), len(enc), length=SEQ)
    b = steps.predict_outputs(fn, trainable, frozen, coarse.eval_batches(enc, 2), len(enc), length=SEQ)
    real = np.arange(SEQ)[None] < enc.lengths[:, None]
    np.testing.assert_allclose(a[real], b[real], atol=1e-5)
    assert np.abs(a[real]).max() > 0.1
