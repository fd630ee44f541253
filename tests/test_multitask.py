"""Multi-task training (jaxpeft.training.multitask, ``jaxpeft-train --tasks=...``): a mixed step's gradient
for task A's adapter is the single-task step's gradient on A's rows; the batches follow the
sampling and are deterministic; a short run reports per-task metrics, exports adapters that
predict as the run evaluated them, and resumes exactly; bad flags are one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, config, masks, methods
from jaxpeft.adapters import folder as adapters
from jaxpeft.data import encoding
from jaxpeft.tasks import glue as glue_tasks, metrics
from jaxpeft.training import multitask, steps
from jaxpeft.models.bert import BertForSequenceClassification
from jaxpeft.models.loading import init_params

from masked_step import SMALL, random_batch

#: three tasks: 2 and 3 classes (padded head) and a regression
TASKS = [glue_tasks.get_task(n) for n in ("sst2", "mnli", "stsb")]


@pytest.mark.parametrize("method,options", [
    ("bitfit", {}), ("ptuning", {"num_virtual_tokens": 3, "encoder_type": "mlp", "encoder_hidden_size": 16}),
    ("prefix", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}), ("lora", {"lora_r": 4})])
def test_mixed_step_gradient_of_each_adapter_is_its_single_task_gradient(method, options):
    m = methods.create(method, options)
    cfg = SMALL.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # dropout off
    wide = BertForSequenceClassification(cfg, 3, adapter=m.adapter(cfg), extras=m.extras(cfg))
    base = init_params(wide, jax.random.key(0))
    mask = m.mask(base)
    trainable, frozen = masks.split(base, mask)
    # each task's adapter: the init moved by its own noise (the base shared)
    noise = np.random.default_rng(1)
    trainables = [jax.tree_util.tree_map(lambda x: x + 0.2 * noise.standard_normal(x.shape).astype(np.float32),
                                         trainable) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trainables)
    mixed, inf_frozen = multitask.build_mixed(m, cfg, base, TASKS)

    rng = np.random.default_rng(0)
    batch = random_batch(rng, b=12, t=12, vocab=cfg.vocab_size)
    index = np.array([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2, 1], np.int32)
    labels = np.where(index == 2, rng.uniform(0, 5, 12), rng.integers(0, 2 + (index == 1), 12)).astype(np.float32)
    weights = np.ones(12, np.float32)
    weights[[3, 10]] = 0.0                               # filler rows count for nothing
    batch = {**batch, "labels": labels, "weights": weights, "adapter_index": index}
    key = jax.random.key_data(jax.random.key(3))
    (total, per_task), grads = jax.jit(jax.value_and_grad(mixed.loss, has_aux=True))(
        stacked, frozen, inf_frozen, batch, key)
    assert np.isclose(float(total), float(per_task.sum()))

    for k, task in enumerate(TASKS):
        rows = index == k
        single = BertForSequenceClassification(cfg, task.num_labels, adapter=m.adapter(cfg), extras=m.extras(cfg))
        own = masks.flatten(trainables[k])
        own["classifier/kernel"] = own["classifier/kernel"][:, :task.num_labels]
        own["classifier/bias"] = own["classifier/bias"][:task.num_labels]
        t_k = masks.unflatten(own, trainable)
        b_k = {n: v[rows] for n, v in batch.items() if n != "adapter_index"}
        b_k["labels"] = b_k["labels"] if task.is_regression else b_k["labels"].astype(np.int32)
        loss_fn = steps.make_loss(single, task.is_regression)
        loss_k, want = jax.jit(jax.value_and_grad(loss_fn))(t_k, frozen, b_k, key)
        np.testing.assert_allclose(float(per_task[k]), float(loss_k), rtol=1e-5, atol=1e-6)
        got = masks.flatten(jax.tree_util.tree_map(lambda g: g[k], grads))
        for path, g in masks.flatten(want).items():
            mine = np.asarray(got[path])
            if path.startswith("classifier/"):
                assert not np.any(mine[..., task.num_labels:]), path   # padded outputs get nothing
                mine = mine[..., :task.num_labels]
            np.testing.assert_allclose(mine, np.asarray(g), rtol=1e-4, atol=1e-6, err_msg=f"{task.name} {path}")


def test_task_batches_follow_the_sampling_and_each_tasks_order():
    parts = []
    for k, n in enumerate((300, 60, 40)):   # the tasks' lengths differ: batches must mix them all the same
        lengths = np.random.default_rng(k).integers(3 + 8 * k, 14 + 8 * k, n).astype(np.int32)
        ids = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
        parts.append(encoding.Encoded(ids, np.zeros_like(ids), lengths, np.zeros(n, np.int32)))
    probs = multitask.sampling_probs([300, 60, 40], "temperature", 2.0)
    tb = multitask.TaskBatches(parts, 16, 32, seed=1, probs=probs)
    assert tb.steps_per_epoch == 25
    epochs = [tb.order(e) for e in range(3)]
    again = multitask.TaskBatches(parts, 16, 32, seed=1, probs=probs)
    assert all(np.array_equal(a, b) for a, b in zip(again.order(2), epochs[2]))   # (seed, epoch) decide
    rows = np.concatenate([b for e in epochs for b in e])
    counts = np.bincount(tb.task_of[rows], minlength=3)
    np.testing.assert_allclose(counts / counts.sum(), probs, atol=0.03)
    for k in range(3):   # a task's examples come in whole passes: no example twice before all once
        mine = rows[tb.task_of[rows] == k]
        order_in_time = np.concatenate([np.concatenate([b[tb.task_of[b] == k] for b in e]) for e in epochs])
        assert sorted(order_in_time.tolist()) == sorted(mine.tolist())
    mixed = [len(set(tb.task_of[b].tolist())) == 3 for e in epochs for b in e]
    assert np.mean(mixed) > 0.8
    batch = tb.batch(epochs[0][0])
    assert batch["adapter_index"].tolist() == tb.task_of[epochs[0][0]].tolist()
    assert batch["input_ids"].shape[0] == 16


def _flags(glue, model, out, **extra):
    flags = dict(method="bitfit", tasks="sst2,cola,mrpc", model=str(model), data_dir=str(glue), output_dir=str(out),
                 max_steps=8, batch_size=8, max_train_examples=48, max_eval_examples=16, max_seq_length=32,
                 eval_every=4, save_every=4, keep=3, learning_rate=1e-2, progress=False, log_every=2, seed=1)
    flags.update(extra)
    return flags


def test_short_run_reports_per_task_exports_adapters_and_resumes(glue, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = _flags(glue, tiny_bert_dir, out, task_sampling="temperature", sampling_temperature=3.0)
    argv = [(f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k}={v}" for k, v in flags.items()]
    rc = cli.guarded(lambda: cli.train(argv))
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["sst2", "cola", "mrpc"] and res["steps"] == 8
    assert set(res["final_dev"]) == {"sst2/accuracy", "cola/matthews_correlation", "cola/accuracy",
                                     "mrpc/accuracy", "mrpc/f1", "average"}
    assert np.isclose(res["final_dev"]["average"], np.mean([res["final_dev"][k] for k in
                                                            ("sst2/accuracy", "cola/matthews_correlation", "mrpc/f1")]))
    assert sum(res["rows_trained"].values()) == 64
    evals = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["event"] == "eval"] == [4, 8]
    assert all(set(r["task_loss"]) == {"sst2", "cola", "mrpc"} for r in evals if r["event"] == "train")

    # each exported adapter is a normal one: it predicts its dev subset with the metrics the run had
    for name in ("sst2", "cola", "mrpc"):
        loaded, params, m, task = adapters.load_adapter(out / "adapters" / name)
        assert task.name == name and m.name == "bitfit"
        dev = glue_tasks.load_split(task, "dev", glue).take(16)
        logits = adapters.predict(loaded, params, m, dev, max_seq_length=32, batch_size=8)
        got = metrics.compute(name, logits.argmax(-1), dev.labels)
        assert got == pytest.approx(res["final_dev_by_task"][name], abs=1e-9)

    # resume from step 4 (the run cut short there) ends where the uninterrupted run ended
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "8")
    shutil.rmtree(cut / "adapters")
    (cut / "results.json").unlink()
    again = multitask.run(config.build({**flags, "output_dir": str(cut)}), echo=lambda s: None)
    assert again["final_dev"] == res["final_dev"]
    assert any(json.loads(x).get("event") == "resume" for x in (cut / "log.jsonl").read_text().splitlines())
    for name in ("sst2", "cola", "mrpc"):
        assert ((cut / "adapters" / name / "adapter_model.safetensors").read_bytes()
                == (out / "adapters" / name / "adapter_model.safetensors").read_bytes())
    # other sampling settings are another trajectory: no resume
    with pytest.raises(Exception, match="task_sampling"):
        multitask.run(config.build({**flags, "output_dir": str(cut), "task_sampling": "proportional"}),
                      echo=lambda s: None)


@pytest.mark.parametrize("args,needle", [
    (["--tasks=sst2,nope"], "unknown task 'nope'"),
    (["--tasks=sst2,cola,sst2"], "sst2 is listed twice"),
    (["--tasks=sst2,cola", "--method=full"], "--method=full cannot train several tasks in one batch"),
    (["--tasks=sst2,cola", "--packing"], "--packing is not supported"),
    (["--tasks=sst2,cola", "--task_sampling=uniform"], "choose one of proportional, temperature"),
    (["--tasks=sst2,cola", "--sampling_temperature=0"], "--sampling_temperature=0.0: must be > 0"),
])
def test_bad_multitask_flags_are_one_line(args, needle, glue, tmp_path, capsys):
    rc = cli.guarded(lambda: cli.train([*args, f"--data_dir={glue}", f"--output_dir={tmp_path / 'o'}"]))
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "o").exists()
