"""Adapter folders: exported predictions equal the trained model's, BitFit adapters are small, and
scripts/predict.py reads TSV files, --text and stdin and rejects bad input with one line."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxpeft import cli, config, masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import predict as prediction
from jaxpeft.data import batches as batching
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.models import fingerprint
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.training import loop, single, steps
from jaxpeft.errors import UserError
from jaxpeft.models.loading import load_classifier

REPO = Path(__file__).resolve().parent.parent
SEQ, BATCH = 32, 16


@pytest.fixture(scope="module")
def trained(glue, tiny_bert_dir, tmp_path_factory):
    """Short runs on the tiny BERT, one per method, trained lazily: ``trained(method) -> SingleTask``
    (after its run)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / "out"
            cfg = config.build(dict(method=method, task="sst2", model=str(tiny_bert_dir), data_dir=str(glue),
                                    output_dir=str(out), max_steps=10, batch_size=8, max_train_examples=80,
                                    max_eval_examples=32, max_seq_length=SEQ, eval_every=0, keep=1,
                                    learning_rate=5e-3, progress=False, seed=2))
            job = single.SingleTask(cfg, echo=lambda s: None)
            loop.run(job)
            runs[method] = job
        return runs[method]

    return get


def dev_examples(glue, n=48, task="sst2"):
    return glue_tasks.load_split(glue_tasks.get_task(task), "dev", glue).take(n)


def in_memory_logits(t, examples, batch_size=BATCH):
    """The trained run's own logits (its final state, its model) on ``examples``."""
    enc = t.task.encode(t.model.tokenizer, examples, SEQ)
    fn = jax.jit(steps.make_predict_step(t.model.module))
    batches = batching.BucketBatches(enc, batch_size, SEQ, 0).eval_batches(enc, batch_size)
    return steps.predict_outputs(fn, t.final_state.trainable, t.frozen, batches, len(enc))


def adapter_logits(directory, examples, **kw):
    """The logits of the adapter in ``directory``, loaded again, on ``examples``."""
    loaded, params, m, task = adapters.load_adapter(directory)
    return prediction.outputs(loaded, params, m, task, examples, max_seq_length=SEQ, **kw)[0]


def adapter_arrays(directory):
    """The adapter's arrays by our param paths."""
    loaded, _, _, _ = adapters.load_adapter(directory)
    return adapters.adapter_arrays(adapters.read_adapter(directory), loaded.params, loaded.config)


@pytest.mark.parametrize("method", ["bitfit", "full"])
def test_exported_adapter_predicts_exactly_like_the_trained_model(method, trained, glue):
    t = trained(method)
    examples = dev_examples(glue)
    in_memory = in_memory_logits(t, examples)

    adapter = Path(t.cfg.run.output_dir) / "adapter"
    _, _, m, task = adapters.load_adapter(adapter)
    assert (m.name, task.name, task.label_names) == (method, "sst2", ("negative", "positive"))
    exported = adapter_logits(adapter, examples, batch_size=BATCH)
    np.testing.assert_array_equal(exported, in_memory)
    assert len(set(in_memory.argmax(-1))) >= 1 and np.isfinite(in_memory).all()

    arrays = adapter_arrays(adapter)
    assert sorted(arrays) == masks.trainable_paths(t.mask)
    tensors = safetensors.numpy.load_file(str(adapter / "adapter_model.safetensors"))
    assert all(a.dtype == np.float32 for a in tensors.values())
    # transformers' names and layout: BertForSequenceClassification's state dict keys, [out, in]
    assert tensors["classifier.weight"].shape == (2, 48) and "bert.encoder.layer_0" not in "".join(tensors)
    assert "bert.encoder.layer.2.intermediate.dense.bias" in tensors
    raw = json.loads((adapter / "adapter_config.json").read_text())
    assert raw["task_type"] == "SEQ_CLS" and "peft_type" not in raw   # peft has no such method
    assert raw["base_model_name_or_path"] == str(Path(t.cfg.model).resolve())
    cfg = raw["jaxpeft"]
    assert cfg["format"] == "jaxpeft-adapter" and cfg["format_version"] == 3
    assert cfg["method"] == method and cfg["task"] == "sst2" and cfg["num_labels"] == 2
    assert cfg["task_kind"] == "sequence" and cfg["label_names"] == ["negative", "positive"]
    assert cfg["main_metric"] == "accuracy" and cfg["model_family"] == "bert"
    assert cfg["base_model"] == str(Path(t.cfg.model).resolve()) and cfg["step"] == 10
    assert cfg["fingerprint"] == t.fingerprint and cfg["jaxpeft_version"]
    assert cfg["max_seq_length"] == SEQ and cfg["num_params"] == sum(a.size for a in arrays.values())


def test_bitfit_adapter_of_bundled_model_is_under_1mb(minilm_dir, tmp_path):
    method = methods.create("bitfit")
    task = tasks.get("sst2")
    model = load_classifier(str(minilm_dir), task.num_labels)
    params = model.params
    fp = fingerprint.fingerprint(params, str(minilm_dir))
    d = adapters.save_adapter(tmp_path / "a", params, method, task, family=BERT, model_config=model.config,
                              base_model=str(minilm_dir), fingerprint=fp)
    size = sum(f.stat().st_size for f in d.iterdir())
    n_trainable, n_all = masks.count(params, method.mask(params, BERT))
    assert size < 1_000_000 and 4 * n_trainable < size < 4 * n_trainable + 20_000, size
    assert n_all * 4 > 80e6   # the copy it replaces: ~90 MB of float32
    _, loaded_params, _, _ = adapters.load_adapter(d)
    for path, v in method.export_params(params, BERT).items():
        assert np.asarray(masks.flatten(loaded_params)[path]).tobytes() == np.asarray(v).tobytes()


def test_adapters_of_the_previous_format_still_load(trained, glue, tmp_path):
    """A folder of format version 1 (adapter.safetensors with our param paths, our fields at the top
    of adapter_config.json) predicts exactly as the same adapter in today's format."""
    t = trained("bitfit")
    new = Path(t.cfg.run.output_dir) / "adapter"
    old = tmp_path / "v1"
    old.mkdir()
    safetensors.numpy.save_file(adapter_arrays(new), str(old / "adapter.safetensors"),
                                metadata={"format": "jaxpeft-adapter"})
    cfg = {**json.loads((new / "adapter_config.json").read_text())["jaxpeft"], "format_version": 1}
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    assert adapters.read_adapter(old).kind == "jaxpeft-v1" and adapters.read_adapter(new).kind == "jaxpeft"
    examples = dev_examples(glue, 16)
    got = [adapter_logits(d, examples) for d in (old, new)]
    np.testing.assert_array_equal(got[0], got[1])


def test_adapter_is_replaced_only_by_a_complete_one(trained, tmp_path, monkeypatch):
    t = trained("bitfit")
    d = shutil.copytree(Path(t.cfg.run.output_dir) / "adapter", tmp_path / "a")
    before = {f.name: f.read_bytes() for f in d.iterdir()}
    params = masks.merge(t.final_state.trainable, t.frozen)

    def full_disk(arrays, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(adapters.safetensors.numpy, "save_file", full_disk)
    with pytest.raises(OSError):
        adapters.save_adapter(d, params, t.method, t.task, family=t.model.family, model_config=t.model.config,
                              base_model=t.cfg.model, fingerprint=t.fingerprint)
    assert {f.name: f.read_bytes() for f in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# ----------------------------------------------------------------------------- scripts/predict.py


def run_script(args, capsys, stdin_text=None, monkeypatch=None):
    """``jaxpeft-predict ARGS`` (what ``scripts/predict.py`` runs), in this process."""
    from jaxpeft.cli import predict

    if stdin_text is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin_text))
    rc = cli.guarded(lambda: predict.main(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_predict_script_on_tsv_text_and_stdin(trained, glue, tmp_path, capsys, monkeypatch):
    t = trained("bitfit")
    adapter = str(Path(t.cfg.run.output_dir) / "adapter")
    test_tsv = tmp_path / "test.tsv"
    test_tsv.write_text("".join((glue / "SST-2" / "test.tsv").read_text().splitlines(True)[:21]))
    out = tmp_path / "preds" / "sst2.tsv"
    rc, _, err = run_script([f"--adapter={adapter}", f"--input={test_tsv}", f"--output={out}"], capsys)
    assert rc == 0, err
    rows = [r.split("\t") for r in out.read_text().splitlines()]
    # one format for one adapter or many: index, adapter, prediction, probabilities (label names)
    assert rows[0] == ["index", "adapter", "prediction", "probabilities"] and len(rows) == 21
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(20)] and {r[1] for r in rows[1:]} == {"adapter"}
    pairs = [[x.split(":") for x in r[3].split(",")] for r in rows[1:]]
    assert all([k for k, _ in p] == ["negative", "positive"] for p in pairs)
    probs = np.array([[float(v) for _, v in p] for p in pairs])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert [r[2] for r in rows[1:]] == [("negative", "positive")[i] for i in probs.argmax(1)]
    # Same numbers as the library on the same texts.
    loaded, params, m, task = adapters.load_adapter(adapter)
    preds = prediction.predict(loaded, params, m, task, task.read_input(test_tsv), max_seq_length=SEQ)
    np.testing.assert_allclose(probs, [[p["scores"][k] for k in ("negative", "positive")] for p in preds],
                               atol=1e-6)
    assert [p["prediction"] for p in preds] == [r[2] for r in rows[1:]]

    texts = task.read_input(test_tsv).texts[0][:2]
    rc, stdout, err = run_script([f"--adapter={adapter}", f"--text={texts[0]}", f"--text={texts[1]}"], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[1:] == ["\t".join(r) for r in rows[1:3]]
    rc, stdout, err = run_script([f"--adapter={adapter}"], capsys, "\n".join(texts) + "\n", monkeypatch)
    assert rc == 0, err
    assert stdout.splitlines()[1:] == ["\t".join(r) for r in rows[1:3]]

    dev = tmp_path / "dev.tsv"
    dev.write_text("".join((glue / "SST-2" / "dev.tsv").read_text().splitlines(True)[:30]))
    rc, stdout, err = run_script([f"--adapter={adapter}", f"--input={dev}"], capsys)
    assert rc == 0 and "sst2 on 29 labelled examples: accuracy=" in err, err


def _bad_adapters(src: Path, tmp: Path) -> dict:
    cases = {}
    broken = shutil.copytree(src, tmp / "broken_json")
    (broken / "adapter_config.json").write_text('{"format": "jaxpeft-adapter", ')
    cases["broken_json"] = (broken, "adapter_config.json is not valid JSON")
    nokey = shutil.copytree(src, tmp / "no_key")
    cfg = json.loads((nokey / "adapter_config.json").read_text())
    del cfg["jaxpeft"]["fingerprint"]
    (nokey / "adapter_config.json").write_text(json.dumps(cfg))
    cases["no_key"] = (nokey, "missing key 'jaxpeft.fingerprint'")
    badm = shutil.copytree(src, tmp / "bad_method")
    text = (src / "adapter_config.json").read_text()
    assert '"method": "bitfit"' in text
    (badm / "adapter_config.json").write_text(text.replace('"method": "bitfit"', '"method": "loraa"'))
    cases["bad_method"] = (badm, "unknown method 'loraa'")
    cases["missing"] = (tmp / "nope", "adapter folder")
    noconfig = shutil.copytree(src, tmp / "no_config")
    (noconfig / "adapter_config.json").unlink()
    cases["no_config"] = (noconfig, "is not an adapter folder: it has no adapter_config.json")
    noweights = shutil.copytree(src, tmp / "no_weights")
    (noweights / "adapter_model.safetensors").unlink()
    cases["no_weights"] = (noweights, "has no adapter_model.safetensors")
    damaged = shutil.copytree(src, tmp / "damaged")
    (damaged / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases["damaged"] = (damaged, "adapter_model.safetensors cannot be read")
    neither = shutil.copytree(src, tmp / "neither")
    (neither / "adapter_config.json").write_text('{"r": 8}')
    cases["neither"] = (neither, "neither a jaxpeft nor a peft adapter config")
    return cases


def test_predict_script_bad_input_is_one_line_and_keeps_output(trained, glue, tmp_path, capsys):
    src = Path(trained("bitfit").cfg.run.output_dir) / "adapter"
    out = tmp_path / "out.tsv"
    out.write_text("previous\n")
    cases = _bad_adapters(src, tmp_path)
    cases["missing_input"] = (src, "data file")
    for name, (adapter, needle) in cases.items():
        extra = [f"--input={tmp_path / 'none.tsv'}"] if name == "missing_input" else ["--text=fine"]
        rc, _, err = run_script([f"--adapter={adapter}", *extra, f"--output={out}"], capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, err)
        assert out.read_text() == "previous\n"


def test_adapter_of_another_base_is_rejected_at_the_cli(trained, other_tiny_bert_dir, tiny_bert_dir, tmp_path):
    adapter = Path(trained("bitfit").cfg.run.output_dir) / "adapter"
    with pytest.raises(UserError, match="other weights"):
        adapters.load_adapter(adapter, str(other_tiny_bert_dir))
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "predict.py"), f"--adapter={adapter}",
                        f"--model={other_tiny_bert_dir}", "--text=a fine film"], capture_output=True,
                       text=True, env=env, timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: adapter {adapter} was trained on base model {tiny_bert_dir.resolve()}")
    assert f"use --model={tiny_bert_dir.resolve()}" in lines[0]


@pytest.mark.parametrize("pooling,modules,task", [("cls", "pooler", "sst2"), ("mean", None, "sst2"),
                                                  ("cosine", None, "mrpc")])
def test_head_options_are_recorded_and_restored(pooling, modules, task, glue, tiny_bert_dir, tmp_path):
    """``--modules_to_save=pooler``: the pooler trains with BitFit (its kernel too); ``--pooling=mean``:
    the head reads the mean of the token outputs (and there is no pooler); ``--pooling=cosine``: the
    head reads one number, the cosine of a pair's two sentences. They go into the adapter, and the
    loaded adapter predicts with them exactly as the trained model did."""
    out = tmp_path / "run"
    cfg = config.build(dict(method="bitfit", task=task, model=str(tiny_bert_dir), data_dir=str(glue),
                            output_dir=str(out), max_steps=4, batch_size=8, max_train_examples=32,
                            max_eval_examples=16, max_seq_length=SEQ, keep=0, progress=False,
                            pooling=pooling, modules_to_save=modules, packing=False))
    t = single.SingleTask(cfg, echo=lambda s: None)
    loop.run(t)
    flat = masks.flatten(t.params)
    n_bias = sum(v.size for p, v in flat.items() if p.endswith("bias") and p.startswith("bert/"))
    hidden = t.model.config.hidden_size
    head = (1 if pooling == "cosine" else hidden) * 2 + 2
    if modules == "pooler":
        assert masks.count(t.params, t.mask)[0] == n_bias + hidden * hidden + head
        assert "bert/pooler/dense/kernel" in masks.trainable_paths(t.mask)
    else:
        assert not any("pooler" in p for p in flat) and masks.count(t.params, t.mask)[0] == n_bias + head
    record = adapters.read_adapter_config(out / "adapter")
    record = record.get("jaxpeft", record)
    assert record["pooling"] == pooling and record["modules_to_save"] == ([modules] if modules else [])
    loaded, params, m, loaded_task = adapters.load_adapter(out / "adapter")
    assert loaded.module.head.pooling == pooling and loaded_task.name == task
    examples = dev_examples(glue, 16, task)
    want = in_memory_logits(t, examples, batch_size=8)
    got = prediction.outputs(loaded, params, m, loaded_task, examples, max_seq_length=SEQ, batch_size=8)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
