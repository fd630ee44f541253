"""The PyTorch peer of the accuracy comparison (benchmarks/peft_job.py): it trains what our config
trains, and the study driver runs it at each group's chosen learning rate."""

from pathlib import Path

import pytest

from benchmarks.peft_job import build, parser, peer_args
from jaxpeft import config
from jaxpeft.training import single

REPO = Path(__file__).resolve().parent.parent


def peer_namespace(flags: list[str]):
    """peft_job.py's parsed arguments for ``flags`` (its own parser, defaults included)."""
    return parser().parse_args([*flags, "--data_dir=unused"])


@pytest.mark.parametrize("method,options", [
    ("full", {}), ("frozen", {}), ("bitfit", {}), ("bitfit", {"bitfit_terms": "b_q,b_m2"}),
    ("bitfit", {"bitfit_terms": "key,value,attention_output,attention_layernorm,output,output_layernorm"}),
    ("lora", {}), ("bottleneck", {}), ("bottleneck", {"adapter_type": "pfeiffer"})])
def test_peer_trains_what_our_config_trains(method, options, tiny_bert_dir, glue, tmp_path):
    cfg = config.build({"method": method, "task": "rte", "model": str(tiny_bert_dir), "data_dir": str(glue),
                        "output_dir": str(tmp_path / "run"), **options})
    ours = single.SingleTask(cfg, echo=lambda s: None).param_report()["trainable_params"]
    a = peer_namespace(peer_args(cfg))
    model = build(str(tiny_bert_dir), a, num_labels=2)
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert theirs == ours


def test_peer_adapter_starts_as_the_identity(tiny_bert_dir):
    import torch
    from transformers import BertForSequenceClassification

    cfg = config.build({"method": "bottleneck", "task": "sst2"})
    a = peer_namespace(peer_args(cfg))
    torch.manual_seed(0)
    with_adapters = build(str(tiny_bert_dir), a, num_labels=2).eval()
    plain = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2).eval()
    plain.classifier.load_state_dict(with_adapters.classifier.state_dict())
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])
    with torch.no_grad():
        torch.testing.assert_close(with_adapters(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert sum(".adapter." in n for n, _ in with_adapters.named_parameters()) == 4 * 2 * 3


def test_peer_args_mirror_the_config():
    cfg = config.build({"method": "ptuning", "task": "rte", "seed": 2, "eval_every": 50})
    a = peer_namespace(peer_args(cfg))
    o = cfg.optim
    assert (a.method, a.task, a.learning_rate, a.head_learning_rate, a.num_epochs, a.seed, a.eval_every) == \
        ("ptuning", "rte", o.learning_rate, o.head_learning_rate, o.num_epochs, 2, 50)
    assert (a.encoder_type, a.encoder_num_layers, a.num_virtual_tokens) == ("lstm", 2, 20)
    assert a.pooling == cfg.head.pooling == "cosine"      # RTE's P-tuning config reads the cosine
    assert peer_namespace(peer_args(config.build({"method": "ptuning", "task": "sst2"}))).pooling == "cls"
    with pytest.raises(SystemExit, match="modules_to_save"):
        peer_args(config.build({"method": "bitfit", "task": "rte", "modules_to_save": "pooler"}))
    # unset: the peer decides by the task's kind, as ours (tests/test_data.py); set: mirrored either way
    assert a.group_by_length is None and not [f for f in peer_args(cfg) if "group_by_length" in f]
    for grouped in (False, True):
        given = config.build({"method": "bitfit", "task": "ner", "group_by_length": grouped})
        assert peer_namespace(peer_args(given)).group_by_length is grouped


@pytest.mark.parametrize("method", ["frozen", "prompt"])
def test_peer_mean_pooling_reads_the_mean_of_the_attended_outputs(method, tiny_bert_dir):
    import torch

    cfg = config.build({"method": method, "task": "rte", "pooling": "mean"})
    a = peer_namespace(peer_args(cfg))
    assert a.pooling == "mean"
    torch.manual_seed(0)
    model = build(str(tiny_bert_dir), a, num_labels=2).eval()
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 2023, 102, 0, 0, 0]])
    mask = (ids > 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        # the same model's last layer, read independently: every attended position, virtual tokens included
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    n_virtual = hidden.shape[1] - ids.shape[1]
    assert n_virtual == (cfg.method_obj().num_virtual_tokens if method == "prompt" else 0)
    full_mask = torch.cat([torch.ones(2, n_virtual), mask.float()], 1).unsqueeze(-1)
    mean = (hidden * full_mask).sum(1) / full_mask.sum(1)
    classifier = model.classifier if method == "frozen" else model.base_model.classifier.modules_to_save["default"]
    torch.testing.assert_close(logits, classifier(mean))
    assert torch.isfinite(logits).all() and not torch.allclose(logits[0], logits[1])


def test_peer_paused_and_resumed_trains_as_one_run(tiny_bert_dir, glue, tmp_path):
    """``--time_limit`` with ``--state``: a run paused after every step and resumed each time ends
    with the same evaluations as the run made in one go, and its state file is gone at the end."""
    import json
    import subprocess
    import sys

    from benchmarks.peft_job import PAUSED

    flags = [sys.executable, str(REPO / "benchmarks" / "peft_job.py"), "--method=ptuning", "--task=stsb",
             f"--data_dir={glue}", f"--model={tiny_bert_dir}", "--learning_rate=1e-2", "--max_steps=3",
             "--eval_every=2", "--max_train_examples=96", "--max_eval_examples=32", "--num_virtual_tokens=4"]

    def run(*extra) -> tuple[int, dict]:
        p = subprocess.run(flags + list(extra), capture_output=True, text=True, timeout=300)
        lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
        assert lines, p.stderr[-2000:]
        return p.returncode, json.loads(lines[-1])

    rc, whole = run()
    assert rc == 0 and whole["parts"] == 1
    state = tmp_path / "peer.state.pt"
    codes, steps = [], []
    while True:
        rc, out = run(f"--state={state}", "--time_limit=0.001")     # pauses after every step
        codes.append(rc)
        if rc != PAUSED:
            break
        steps.append(out["step"])
        assert state.is_file()
    assert codes == [PAUSED, PAUSED, 0] and steps == [1, 2]
    assert out["parts"] == 3 and not state.exists()
    assert [e["step"] for e in out["evals"]] == [e["step"] for e in whole["evals"]] == [2, 3]
    for a, b in zip(out["evals"], whole["evals"]):     # a continuous metric: equal weights, equal values
        assert a["pearson"] == b["pearson"] and a["spearman"] == b["spearman"]
    assert out["evals"][0]["pearson"] != out["evals"][1]["pearson"]
    assert out["steps"] == whole["steps"] == 3
    # a state saved with other settings is refused, not silently mixed in
    rc, _ = run(f"--state={state}", "--time_limit=0.001")
    assert rc == PAUSED
    p = subprocess.run(flags[:-1] + ["--num_virtual_tokens=5", f"--state={state}"], capture_output=True, text=True)
    assert p.returncode != 0 and "other settings (num_virtual_tokens)" in p.stderr


@pytest.mark.parametrize("method", ["frozen", "lora"])
def test_peer_cosine_pooling_gives_our_logits(method, tiny_bert_dir):
    """``--pooling=cosine``: the peer splits the pair rows on the host (numpy) and reads the cosine of
    the two sentences' means; with the same head, its logits are ours (LoRA starts as the identity)."""
    import numpy as np
    import torch

    from benchmarks.peft_job import split_pairs
    from jaxpeft.models.loading import load_classifier

    cfg = config.build({"method": method, "task": "rte", "pooling": "cosine"})
    a = peer_namespace(peer_args(cfg))
    assert a.pooling == "cosine"
    torch.manual_seed(0)
    model = build(str(tiny_bert_dir), a, num_labels=2).eval()
    ours = load_classifier(str(tiny_bert_dir), 2, pooling="cosine")
    enc = ours.tokenizer(["A man is dancing in the rain.", "Two dogs.", "The cat sat on the mat today."],
                         ["A man dances.", "Several animals play in a big green park.", "The cat sat."],
                         padding=True, return_tensors="np")
    enc = {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    head = model.classifier if method == "frozen" else model.base_model.model.classifier.modules_to_save["default"]
    kernel = head.dense.weight.detach().numpy().T
    ours_logits = np.asarray(ours.module.apply(
        {"params": {**ours.params, "classifier": {"kernel": kernel, "bias": head.dense.bias.detach().numpy()}}},
        **enc))
    split = split_pairs(enc)
    assert split["input_ids"].shape == (6, enc["input_ids"].shape[1])
    with torch.no_grad():
        theirs = model(**{k: torch.from_numpy(v).long() for k, v in split.items()}).logits.numpy()
    assert theirs.shape == (3, 2) and np.ptp(theirs[:, 0]) > 0
    np.testing.assert_allclose(ours_logits, theirs, atol=1e-5)


# ----------------------------------------------------------------------------- token and span tasks

SHARED = REPO.parent / "shared" / "data"


def shared_data(name: str) -> Path:
    d = SHARED / name
    if not d.is_dir():
        pytest.fail(f"no local copy of {name} at {d}")
    return d


def peer_run(cfg, model_dir, data_dir, capsys) -> tuple[dict, dict]:
    """The peer of ``cfg`` run in this process: its JSON line and what it keeps (model, task, data)."""
    import json

    from benchmarks.peft_job import main

    keep: dict = {}
    capsys.readouterr()
    assert main([*peer_args(cfg), f"--data_dir={data_dir}", f"--model={model_dir}"], keep=keep) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1]
    return json.loads(line), keep


def row_outputs(model, enc, kind: str, virtual: int = 0):
    """The model's outputs on every encoded row, one row at a time at its own length (no padding, no
    batching), zero-padded to the rows' width as ours: ``[N, L, C]``. A span task's model is called
    through peft's wrapped transformers model with the token types (peft's QA model drops them)."""
    import numpy as np
    import torch

    model = model.eval()
    out = None
    with torch.no_grad():
        for i, n in enumerate(enc.lengths):
            ids = torch.tensor(enc.input_ids[i:i + 1, :n], dtype=torch.long)
            types = torch.tensor(enc.token_type_ids[i:i + 1, :n], dtype=torch.long)
            ones = torch.ones_like(ids)
            if kind == "span":
                o = model.base_model(input_ids=ids, attention_mask=ones, token_type_ids=types)
                got = torch.stack([o.start_logits, o.end_logits], -1)
            else:
                got = model(input_ids=ids, attention_mask=ones, token_type_ids=types).logits[:, virtual:]
            got = got[0].numpy()
            assert got.shape[0] == n
            if out is None:
                out = np.zeros((len(enc), enc.max_length, got.shape[-1]), np.float32)
            out[i, :n] = got
    return out


@pytest.mark.parametrize("task,method", [("ner", "ptuning"), ("squad", "lora")])
def test_peer_on_token_and_span_tasks_is_scored_by_our_task_code(task, method, tiny_bert_dir, tmp_path, capsys):
    """The peer trains a tagging task (P-tuning: virtual tokens in front, dropped) and SQuAD (LoRA) a
    few steps from our config, and its reported dev metrics are our task's code (``Task.evaluate``:
    seqeval / n-best decoding and the official EM/F1) applied to its own model's outputs computed here
    row by row; training moved the trainable weights from their (seeded) start."""
    import numpy as np
    import torch

    data = shared_data({"ner": "conll2003", "squad": "squad"}[task])
    options = {"lora_r": 4} if method == "lora" else {"num_virtual_tokens": 4}
    cfg = config.build({"method": method, "task": task, "model": str(tiny_bert_dir), "data_dir": str(data),
                        "output_dir": str(tmp_path / "run"), "learning_rate": 1e-2, "max_steps": 3,
                        "batch_size": 8, "max_train_examples": 24, "max_eval_examples": 24,
                        "max_seq_length": 96, "doc_stride": 48, **options})
    out, keep = peer_run(cfg, tiny_bert_dir, data, capsys)
    assert out["steps"] == 3 and out["task"] == task and out["main_metric"] == keep["task"].main_metric
    kind = keep["task"].kind
    assert kind == {"ner": "token", "squad": "span"}[task]
    outputs = row_outputs(keep["model"], keep["dev"], kind, virtual=4 if method == "ptuning" else 0)
    ours = keep["task"].evaluate(outputs, keep["dev"], keep["dev_raw"])
    reported = {k: v for k, v in out["final_dev"].items() if k not in ("step", "wall_seconds")}
    assert reported.keys() == ours.keys()
    assert reported == pytest.approx(ours, rel=1e-9, abs=1e-12)
    if kind == "token":      # the predictions are not one tag everywhere: the metric reads each of them
        scored = keep["dev"].labels != -100
        assert len(np.unique(outputs.argmax(-1)[scored])) > 1 and 0 < ours["accuracy"] < 1
    else:
        assert ours["f1"] > 0
    # the trainable weights moved: the same seed builds the same start
    from benchmarks.peft_job import build

    torch.manual_seed(cfg.optim.seed)
    start = dict(build(str(tiny_bert_dir), peer_namespace(peer_args(cfg)), keep["task"].num_labels, kind)
                 .named_parameters())
    trained = {n: p for n, p in keep["model"].named_parameters() if p.requires_grad}
    moved = [n for n in trained if "lora_B" in n or "prompt_encoder" in n]
    assert moved and all(n in start for n in trained)
    assert all(not torch.equal(trained[n], start[n]) for n in moved)


@pytest.fixture(scope="module")
def tiny_mpnet_dir(tmp_path_factory, minilm_dir) -> Path:
    """A tiny random MPNet sequence classifier saved by transformers, with a tokenizer of MPNet's kind."""
    import torch
    from encoder_family_helpers import TINY, mpnet_tokenizer
    from transformers import MPNetConfig, MPNetForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-mpnet")
    vocab = mpnet_tokenizer(d, minilm_dir)
    torch.manual_seed(0)
    MPNetForSequenceClassification(MPNetConfig(vocab_size=vocab, **TINY, max_position_embeddings=130, pad_token_id=1,
                                               bos_token_id=0, eos_token_id=2)).save_pretrained(str(d))
    return d


def _flat_head(tree: dict, prefix: str = "classifier") -> dict:
    """Our head's arrays by the transformers name of their tensor (``classifier.dense.weight``)."""
    import numpy as np

    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat_head(v, f"{prefix}.{k}"))
        else:
            out[f"{prefix}.{'weight' if k == 'kernel' else k}"] = np.asarray(v).T if k == "kernel" else np.asarray(v)
    return out


@pytest.mark.parametrize("family,task,method", [("bert", "ner", "frozen"), ("bert", "ner", "bitfit"),
                                                ("mpnet", "mrpc", "frozen"), ("mpnet", "mrpc", "bitfit")])
def test_peer_and_ours_take_the_same_steps_without_dropout(family, task, method, request, glue, tmp_path, capsys,
                                                           monkeypatch):
    """With every dropout off (a copy of the tiny model whose config says 0), the same starting head
    and the same batches, ours and the peer train step for step alike: the loss, the gradient norm
    before clipping and the learning rate of every step, and the trained head, agree to float32
    round-off. Dropout's placement and rates are the only randomness left between the two runs. On
    BERT's token classifier (NER) and MPNet's sequence head (dense, tanh, output layer; MRPC)."""
    import json
    import shutil

    import numpy as np
    import torch

    import benchmarks.peft_job as peft_job
    from jaxpeft.training import loop

    data = shared_data("conll2003") if task == "ner" else glue
    model = tmp_path / "no-dropout"
    shutil.copytree(request.getfixturevalue("tiny_bert_dir" if family == "bert" else "tiny_mpnet_dir"), model)
    c = json.loads((model / "config.json").read_text())
    c.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (model / "config.json").write_text(json.dumps(c))
    cfg = config.build({"method": method, "task": task, "model": str(model), "data_dir": str(data),
                        "output_dir": str(tmp_path / "run"), "learning_rate": 1e-2, "max_steps": 10,
                        "batch_size": 8, "max_train_examples": 40, "max_eval_examples": 16,
                        "max_seq_length": 64, "compute": "exact", "log_every": 1, "progress": False,
                        "plot": False, "packing": False})   # the peer's batches, one example a row
    job = single.SingleTask(cfg, echo=lambda s: None)
    head = _flat_head(job.params["classifier"])
    assert len(head) == (2 if family == "bert" else 4)
    loop.run(job)
    ours = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines())
            if r.get("event") == "train"]
    trained = _flat_head(job.final_state.trainable["classifier"])

    seen: dict[str, list] = {"loss": [], "grad_norm": [], "lr": []}
    build0, loss0, clip0, step0 = (peft_job.build, peft_job.task_loss, torch.nn.utils.clip_grad_norm_,
                                   torch.optim.AdamW.step)

    def build_with_our_head(*a, **k):
        m = build0(*a, **k)
        tensors = dict(m.named_parameters())
        with torch.no_grad():
            for name, value in head.items():
                tensors[name].copy_(torch.from_numpy(value.copy()))
        return m

    def loss(*a, **k):
        out = loss0(*a, **k)
        seen["loss"].append(float(out.detach()))
        return out

    def clip(params, max_norm, *a, **k):
        norm = clip0(params, max_norm, *a, **k)
        seen["grad_norm"].append(float(norm))
        return norm

    def step(self, *a, **k):
        seen["lr"].append(self.param_groups[0]["lr"])
        return step0(self, *a, **k)

    monkeypatch.setattr(peft_job, "build", build_with_our_head)
    monkeypatch.setattr(peft_job, "task_loss", loss)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out, keep = peer_run(cfg, model, data, capsys)

    assert out["steps"] == len(ours) == len(seen["loss"]) == 10
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[name] for r in ours], seen[name], rtol=1e-4, err_msg=name)
    np.testing.assert_allclose([r["lr"] for r in ours], seen["lr"], rtol=1e-5, atol=1e-9)
    assert seen["loss"][-1] < seen["loss"][0]          # they trained
    theirs = {n: p.detach().numpy() for n, p in keep["model"].named_parameters() if n in head}
    assert set(theirs) == set(head)
    for k in head:
        assert not np.allclose(trained[k], head[k]), k
        np.testing.assert_allclose(trained[k], theirs[k], atol=1e-4 * np.abs(trained[k]).max(), err_msg=k)


def test_peer_gives_bert_the_token_types_peft_drops_for_qa(tiny_bert_dir):
    """peft's QA model drops ``token_type_ids``; with the peer's hook BERT reads them (both segments),
    as the LoRA-wrapped transformers model called with them does."""
    import torch

    a = peer_namespace(peer_args(config.build({"method": "lora", "task": "squad", "lora_r": 4})))
    torch.manual_seed(0)
    model = build_span(tiny_bert_dir, a).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            if "lora_B" in _:
                p.normal_(0, 0.2)
    ids = torch.tensor([[101, 2040, 2003, 102, 1996, 4937, 2003, 2182, 102]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model.base_model(input_ids=ids, attention_mask=mask, token_type_ids=types).start_logits
        model.token_types.types = None
        dropped = model(input_ids=ids, attention_mask=mask, token_type_ids=types).start_logits
        model.token_types.types = types
        got = model(input_ids=ids, attention_mask=mask, token_type_ids=types).start_logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(dropped, want, atol=1e-5)


def build_span(model_dir, a):
    from benchmarks.peft_job import build

    return build(str(model_dir), a, num_labels=2, kind="span")


def test_peer_ner_labels_sit_on_first_sub_words(tiny_bert_dir):
    """The peer's tagging rows and loss: each word's tag on its first sub-word, -100 on the others
    and on special tokens (transformers' ``word_ids``, computed here independently); the loss is
    PyTorch's cross-entropy over exactly those positions."""
    import torch
    from transformers import AutoTokenizer

    from benchmarks.peft_job import load_task, prepare, task_loss
    from jaxpeft.data import batches
    from jaxpeft.models import hf_weights

    data = shared_data("conll2003")
    a = peer_namespace(peer_args(config.build({"method": "lora", "task": "ner", "max_train_examples": 40,
                                               "max_eval_examples": 8, "max_seq_length": 64})))
    a.data_dir = str(data)
    task = load_task(a)
    train, _, _ = prepare(a, task, hf_weights.load_tokenizer(tiny_bert_dir))
    raw = task.take(task.read("train"), 40)
    hf = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    feats = train.host["features"]
    checked = split_words = 0
    for row in range(len(train)):
        s = int(feats.example_index[row])
        words = raw.tokens[s]
        if tuple(feats.word_spans[row]) != (0, len(words)):
            continue                     # a window of a long sentence
        enc = hf(words, is_split_into_words=True)
        want, seen = [], set()
        for w in enc.word_ids():
            first = w is not None and w not in seen
            seen.add(w)
            want.append(task.label_names.index(raw.tags[s][w]) if first else -100)
        n = int(train.lengths[row])
        assert list(train.input_ids[row, :n]) == enc["input_ids"]
        assert list(train.labels[row, :n]) == want and (train.labels[row, n:] == -100).all()
        checked += 1
        split_words += len(enc["input_ids"]) - 2 > len(words)
    assert checked >= 30 and split_words > 0
    # the loss of a batch: cross-entropy over the labelled positions only
    b = batches.make_batch(train, batches.BucketBatches(train, 8, 64, 0).order(0)[0], batches.length_buckets(64))
    logits = torch.randn(*b["input_ids"].shape, task.num_labels)
    labels = torch.from_numpy(b["labels"]).long()
    got = task_loss(logits, {"labels": labels, "weights": torch.from_numpy(b["weights"])}, "token")
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want)


def peft_runs_prefix_on_bert(model_dir) -> bool:
    """Whether the installed peft runs prefix tuning on transformers' BERT (peft 0.22 does; up to
    0.21 it raises, as transformers 5's ``BertModel.forward`` does not name ``past_key_values``)."""
    import peft
    import torch
    from transformers import BertForTokenClassification

    model = peft.get_peft_model(BertForTokenClassification.from_pretrained(str(model_dir), num_labels=3),
                                peft.PrefixTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=2))
    try:
        model(input_ids=torch.tensor([[101, 2023, 102]]))
    except ValueError as e:
        assert "does not support past key values" in str(e)
        return False
    return True


def test_peer_refuses_what_it_cannot_run(tiny_bert_dir, capsys):
    """One ``error:`` line and exit status 2: a pooling a token head does not have; prefix tuning where
    the installed peft cannot run it on BERT (the refusal names the method and peft's reason), and
    where it can, a prefix that reaches the logits passes the same check."""
    from benchmarks.peft_job import CANNOT, build, main, parser
    from jaxpeft.bench.peer import prefixes_dropped

    data = shared_data("conll2003")
    cases = [(["--method=lora", "--pooling=mean"], "--pooling=mean")]
    if peft_runs_prefix_on_bert(tiny_bert_dir):
        for method in ("prefix", "ptuning_v2"):
            a = parser().parse_args(["--task=ner", f"--data_dir={data}", f"--model={tiny_bert_dir}",
                                     f"--method={method}"])
            assert prefixes_dropped(build(str(tiny_bert_dir), a, 9, "token"), method) is None
    else:
        cases.append((["--method=prefix"], "--method=prefix: peft cannot run it"))
    for flags, needle in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["--task=ner", f"--data_dir={data}", f"--model={tiny_bert_dir}", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == CANNOT and err[-1].startswith("error: ") and needle in err[-1]
        assert sum(x.startswith("error:") for x in err) == 1


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory, minilm_dir, glue):
    """Tiny random MPNet (WordPiece, no token types) and RoBERTa (BPE, one token type) folders with
    a trained sequence head, as a sentence-transformers or hub checkpoint of the family would be."""
    import sys

    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from encoder_family_helpers import TINY as FAMILY_TINY
    from encoder_family_helpers import bpe_tokenizer, corpus, mpnet_tokenizer
    from transformers import MPNetConfig, MPNetForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

    out = {}
    d = tmp_path_factory.mktemp("peer-mpnet")
    vocab = mpnet_tokenizer(d, minilm_dir)
    torch.manual_seed(0)
    MPNetForSequenceClassification(MPNetConfig(vocab_size=vocab, **FAMILY_TINY, max_position_embeddings=130,
                                               pad_token_id=1, bos_token_id=0, eos_token_id=2)).save_pretrained(str(d))
    out["mpnet"] = d
    d = tmp_path_factory.mktemp("peer-roberta")
    bpe_tokenizer(d, corpus(glue))
    vocab = len(__import__("json").loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    RobertaForSequenceClassification(RobertaConfig(vocab_size=vocab, **FAMILY_TINY, max_position_embeddings=130,
                                                   type_vocab_size=1, pad_token_id=1)).save_pretrained(str(d))
    out["roberta"] = d
    return out


@pytest.mark.parametrize("family", ["mpnet", "roberta"])
@pytest.mark.parametrize("method", ["full", "frozen", "bitfit", "lora", "ia3"])
def test_peer_of_another_family_loads_its_weights_and_trains_what_ours_trains(family, method, tiny_family_dirs,
                                                                             glue, tmp_path):
    """The peer's sequence classifier is the folder's family with every weight of the folder (before,
    MPNet's went into a BERT of random weights), and it trains what ours trains: the same number of
    parameters, on the family's own LoRA/IA3 targets."""
    import torch
    from safetensors.torch import load_file

    d = tiny_family_dirs[family]
    cfg = config.build({"method": method, "task": "rte", "model": str(d), "data_dir": str(glue),
                        "output_dir": str(tmp_path / "run")})
    report = single.SingleTask(cfg, echo=lambda s: None).param_report()
    model = build(str(d), peer_namespace(peer_args(cfg)), num_labels=2)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert base.config.model_type == family and type(base).__name__.lower().startswith(family)
    saved = load_file(str(d / "model.safetensors"))
    state = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    enc = [k for k in saved if ".layer.1." in k and k.endswith("weight")]
    assert enc and all(torch.equal(state[k], saved[k]) for k in enc), "the encoder's weights did not load"
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert theirs == report["trainable_params"]
    if method in ("lora", "ia3"):
        from jaxpeft.bench.peer import PEFT_TARGETS

        names = [n for n, p in model.named_parameters() if p.requires_grad and f"{method}_" in n]
        assert names and all(any(f".{t}." in n for t in PEFT_TARGETS[family][0 if method == "lora" else 1])
                             for n in names)


def test_peer_of_another_family_runs_and_refuses_what_is_bert_only(tiny_family_dirs, glue, capsys):
    """A whole peer run on MPNet (no token types in its forward) trains and scores; BERT-only options
    end in one ``error:`` line."""
    import json

    from benchmarks.peft_job import CANNOT, main

    d = tiny_family_dirs["mpnet"]
    main(["--method=lora", "--task=rte", f"--data_dir={glue}", f"--model={d}", "--max_steps=2",
          "--max_train_examples=64", "--max_eval_examples=32", "--learning_rate=1e-3"])
    out = json.loads([x for x in capsys.readouterr().out.splitlines() if x.startswith("{")][-1])
    assert out["steps"] == 2 and 0.0 <= out["final_dev"]["accuracy"] <= 1.0
    for flags, needle in ((["--method=lora", "--pooling=mean"], "--pooling=mean"),
                          (["--method=bottleneck"], "bottleneck"), (["--method=bitfit", "--bitfit_terms=b_q"], "bias terms")):
        with pytest.raises(SystemExit) as e:
            main(["--task=rte", f"--data_dir={glue}", f"--model={d}", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == CANNOT and err[-1].startswith("error: ") and needle in err[-1], err
