"""Every task kind trains from the command line with every method, on a tiny random BERT: tagging
(CoNLL-2003 NER), extractive QA (the SQuAD split) and your own CSV data; the heads read the real
tokens only, virtual tokens and shifted positions included."""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, methods
from jaxpeft.compute import EXACT
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.heads import Head
from jaxpeft.models.layers import remove_virtual
from jaxpeft.models.loading import build_module, init_params
from jaxpeft.training import steps

from conftest import REPO, TINY

DATA = REPO.parent / "shared" / "data"
SHORT = ["--max_steps=1", "--batch_size=4", "--max_train_examples=8", "--max_eval_examples=6", "--no-progress",
         "--compilation_cache=off", "--eval_every=0", "--no-plot", "--keep=0", "--compute=exact"]


def _run(tmp_path, method, task_flags, name):
    out = tmp_path / f"{method}-{name}"
    code = cli.train([f"--method={method}", *task_flags, f"--output_dir={out}", *SHORT])
    assert code == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 1
    assert (out / "adapter" / "adapter_config.json").is_file()
    return res


#: the methods of the default run; the others (``-m slow``) share their code paths: full and frozen
#: BitFit's, prompt and P-tuning the prompt module's, P-tuning v2 prefix tuning's, IA3 and
#: bottleneck adapters LoRA's hooks
DEFAULT_RUN = ("bitfit", "lora", "prefix")


@pytest.mark.parametrize("method", [m if m in DEFAULT_RUN else pytest.param(m, marks=pytest.mark.slow)
                                    for m in methods.REGISTRY])
def test_every_method_trains_tagging_and_qa(tiny_bert_dir, tmp_path, method):
    model = f"--model={tiny_bert_dir}"
    ner = _run(tmp_path, method, ["--task=ner", f"--data_dir={DATA / 'conll2003'}", model, "--max_seq_length=32"],
               "ner")
    assert ner["task_kind"] == "token" and set(ner["final_dev"]) >= {"f1", "precision", "recall"}
    qa = _run(tmp_path, method, ["--task=squad", f"--data_dir={DATA / 'squad'}", model, "--max_seq_length=64",
                                 "--doc_stride=16"], "squad")
    assert qa["task_kind"] == "span" and set(qa["final_dev"]) == {"f1", "exact_match"}


def test_your_own_csv_trains_and_records_its_labels(tiny_bert_dir, tmp_path):
    path = tmp_path / "tickets.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f, lineterminator="\r\n")
        w.writerow(["body", "team"])
        for i in range(24):
            w.writerow([f'ticket {i}, "urgent"\nsecond line', ["billing", "shipping", "returns"][i % 3]])
    res = _run(tmp_path, "bitfit", [f"--train_file={path}", "--text_columns=body", "--label_column=team",
                                    f"--model={tiny_bert_dir}", "--max_seq_length=32"], "own")
    assert res["task"] == "tickets" and set(res["final_dev"]) == {"accuracy", "macro_f1"}
    rec = json.loads((tmp_path / "bitfit-own" / "adapter" / "adapter_config.json").read_text())["jaxpeft"]
    assert rec["label_names"] == ["billing", "returns", "shipping"] and rec["text_columns"] == ["body"]


@pytest.mark.parametrize("method,options", [("prompt", {}), ("prompt", {"prompt_position": "front"}),
                                            ("ptuning_v2", {"shift_positions": True}), ("lora", {})])
def test_token_head_reads_each_real_token_in_place(method, options):
    """The token head's row i is input token i: with virtual tokens in the sequence, the head still
    reads the real tokens, each at its own position."""
    from jaxpeft.models.bert import BertConfig

    cfg = BertConfig(**TINY)
    m = methods.create(method, options)
    module = build_module(BERT, cfg, Head("token", 5), m, EXACT)
    params = init_params(module, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(5, 100, (2, 9)), jnp.int32)
    mask = jnp.asarray([[1] * 9, [1] * 6 + [0] * 3], jnp.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": jnp.zeros_like(ids)}
    logits = steps.apply_model(module, params, batch, True)
    assert logits.shape == (2, 9, 5)
    prompt = module.prompt.apply({"params": params["prompt"]}, 2) if module.prompt is not None else None
    encoder = BERT.encoder(cfg, EXACT, module.hooks)
    from jaxpeft.models.layers import NO_PROMPT
    out = encoder.apply({"params": params["bert"]}, ids, mask, jnp.zeros_like(ids), prompt=prompt or NO_PROMPT)
    p = 0 if prompt is None else prompt.num_virtual
    hidden = remove_virtual(out.hidden, p, prompt.front if prompt is not None else False)
    k, b = params["classifier"]["kernel"], params["classifier"]["bias"]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(hidden @ k + b), atol=1e-5)


def test_packed_tagging_and_qa_train_and_evaluate(tiny_bert_dir, tmp_path, monkeypatch):
    """Packed rows serve tagging and QA: each example's labels stay at its own tokens (each QA
    window's answer at its own positions, ``tests/test_packing.py``); evaluation packs too, one
    program for each, and reads every example's outputs back out of its row. The NER run imports
    seqeval while it compiles."""
    from jaxpeft import runtime

    warmed, prewarm = [], runtime.prewarm
    monkeypatch.setattr(runtime, "prewarm", lambda modules: warmed.append(tuple(modules)) or prewarm(modules))
    flags = ["--task=ner", f"--data_dir={DATA / 'conll2003'}", f"--model={tiny_bert_dir}", "--max_seq_length=48"]
    packed = _run(tmp_path, "bitfit", flags + ["--packing"], "packed")
    assert len(warmed) == 1 and "seqeval.metrics" in warmed[0] and "orbax.checkpoint" in warmed[0]
    assert packed["task_kind"] == "token" and 0.0 <= packed["final_dev"]["accuracy"] <= 1.0
    assert len(packed["compiled_shapes"]["train"]) == len(packed["compiled_shapes"]["predict"]) == 1
    qa = _run(tmp_path, "lora", ["--task=squad", f"--data_dir={DATA / 'squad'}", f"--model={tiny_bert_dir}",
                                 "--max_seq_length=96", "--doc_stride=32", "--packing"], "squad-packed")
    assert qa["task_kind"] == "span" and 0.0 <= qa["final_dev"]["f1"] <= 100.0
    assert len(qa["compiled_shapes"]["train"]) == len(qa["compiled_shapes"]["predict"]) == 1
    from jaxpeft.data.encoding import IGNORE
    from jaxpeft.data.packing import packed_batch
    from jaxpeft.tasks import tagging
    from jaxpeft.models.loading import load_model

    task = tagging.ner(type("D", (), {"data_dir": str(DATA / "conll2003")})())
    tok = load_model(str(tiny_bert_dir), task.head()).tokenizer
    enc = task.encode(tok, task.take(task.read("dev"), 40), 48)
    # the three shortest sentences, which fit one row together
    ids = [int(i) for i in np.argsort(enc.lengths, kind="stable")[:3]]
    assert sum(int(enc.lengths[i]) for i in ids) <= 48
    b = packed_batch(enc, np.array([ids]), 48)
    # every labelled token of the packed row is its example's, at its example's position
    for k, i in enumerate(ids):
        seg = b["segment_ids"][0] == k + 1
        got = b["labels"][0][seg]
        want = enc.labels[i][:enc.lengths[i]]
        assert (got != IGNORE).any()
        assert got.tolist() == want.tolist()
    assert (b["labels"][0][b["segment_ids"][0] == 0] == IGNORE).all()


def test_the_splits_tokenize_in_the_background_while_the_weights_load(tiny_bert_dir, tmp_path, monkeypatch):
    """A run tokenizes its splits in a thread of its own, started before the weights load, with a
    tokenizer of its own; what it encodes equals encoding the same sentences on the main thread with
    the model's tokenizer."""
    import threading

    from jaxpeft import config
    from jaxpeft.tasks import tagging
    from jaxpeft.training import single

    events = []
    encode, load_model = tagging.Tagging.encode, single.load_model

    def spy_encode(self, tok, raw, max_length):
        events.append(("encode", threading.current_thread().name))
        return encode(self, tok, raw, max_length)

    def spy_load(*a, **kw):
        events.append(("load", threading.current_thread().name))
        return load_model(*a, **kw)

    monkeypatch.setattr(tagging.Tagging, "encode", spy_encode)
    monkeypatch.setattr(single, "load_model", spy_load)
    cfg = config.parse_args(["--method=bitfit", "--task=ner", f"--data_dir={DATA / 'conll2003'}",
                             f"--model={tiny_bert_dir}", f"--output_dir={tmp_path / 'o'}", *SHORT,
                             "--max_seq_length=32"])
    job = single.SingleTask(cfg, echo=lambda s: None)
    assert ("load", "MainThread") in events
    assert [e for e in events if e[0] == "encode"] == [("encode", "jaxpeft-tokenize")] * 2   # train, dev
    direct = encode(job.task, job.model.tokenizer, job.task.take(job.raw_train, 8), 32)
    assert job.train_data.input_ids.tolist() == direct.input_ids.tolist()
    assert job.train_data.labels.tolist() == direct.labels.tolist()
    assert job.eval_data["dev"].input_ids.shape[0] >= 6


def test_background_work_returns_its_value_and_raises_its_error():
    """What a run does in the background (the tokenizing) hands back its result, or raises its
    error (a bad input line: one ``error:`` line, as on the main thread) where the run waits for it,
    from a daemon thread that does not hold the process open after an error elsewhere."""
    from jaxpeft import runtime
    from jaxpeft.errors import UserError

    ok = runtime.Background(lambda: 41 + 1, "t-ok")
    assert ok.result() == 42 and ok._thread.daemon

    def bad():
        raise UserError("dev.conll:4: tag 'B-MISC' is not one of the training tags")

    with pytest.raises(UserError, match="dev.conll:4"):
        runtime.Background(bad, "t-bad").result()


def test_tagging_takes_random_batches_unless_told(tiny_bert_dir, tmp_path):
    """``--group_by_length`` unset: a tagging run one example a row draws random batches (its loss is
    a mean over the batch's words, which length-grouped batches skew towards short sentences), a
    resumed run must keep that, and the flag still groups them; the peer's job leaves it unset too, for
    the same rule (``batches.groups_by_length``) to decide."""
    from jaxpeft import config
    from jaxpeft.training import single

    from benchmarks.peft_job import parser as peer_parser

    base = ["--method=bitfit", "--task=ner", f"--data_dir={DATA / 'conll2003'}", f"--model={tiny_bert_dir}",
            *SHORT, "--max_seq_length=32", "--no-packing"]
    for extra, grouped in (([], False), (["--group_by_length"], True)):
        cfg = config.parse_args(base + [f"--output_dir={tmp_path / str(grouped)}", *extra])
        job = single.SingleTask(cfg, echo=lambda s: None)
        assert job.batches.group_by_length is grouped
        assert job.cfg.resume_settings(job.compute)["group_by_length"] is grouped
    assert peer_parser().parse_args(["--task=ner"]).group_by_length is None   # resolved by the task's kind
