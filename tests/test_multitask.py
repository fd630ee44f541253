"""Multi-task training (jaxpeft.training.multitask, ``jaxpeft-train --tasks=...``): a mixed step's gradient
for task A's adapter is the single-task step's gradient on A's rows, and its update is A's single-task
update at A's own rate; each task takes its own config's rate, epochs and length; the batches follow
the sampling and are deterministic; a short run reports per-task metrics, exports adapters that
predict as the run evaluated them, and resumes exactly; bad flags are one line."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, config, masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import predict as prediction
from jaxpeft.compute import EXACT
from jaxpeft.data import encoding
from jaxpeft.methods.base import head_patterns
from jaxpeft.models.heads import Head
from jaxpeft.models.loading import LoadedModel, init_params
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.training import loop, multitask, optim, steps

from masked_step import SMALL, random_batch
from model_helpers import BERT, HEADS, classifier, seq_loss

#: three tasks: 2 and 3 classes (padded head) and a regression
TASKS = [tasks.get(n) for n in ("sst2", "mnli", "stsb")]


def mixed_job(method, cfg, base, task_list) -> tuple[multitask.MultiTask, object]:
    """A multi-task job's model parts around the random params ``base`` of the widest head's model,
    without data or a run: its loss (:meth:`MultiTask.loss_fn`) and its inference model
    (:meth:`MultiTask.inference_model`); returns the job and the inference model's frozen params."""
    width = max(t.num_labels for t in task_list)
    job = multitask.MultiTask.__new__(multitask.MultiTask)
    job.tasks, job.names, job.method = list(task_list), [t.name for t in task_list], method
    job.heads, job.modules_to_save, job.compute = HEADS, (), EXACT
    job.model = LoadedModel("small", Path("small"), BERT, cfg, classifier(cfg, width, method), base, None)
    job.inf_module, inf_frozen = job.inference_model(Head("sequence", width))
    return job, inf_frozen


@pytest.mark.parametrize("method,options", [
    ("bitfit", {}), ("ptuning", {"num_virtual_tokens": 3, "encoder_type": "mlp", "encoder_hidden_size": 16}),
    ("prefix", {"num_virtual_tokens": 3, "encoder_hidden_size": 16}), ("lora", {"lora_r": 4})])
def test_mixed_step_gradient_of_each_adapter_is_its_single_task_gradient(method, options):
    m = methods.create(method, options)
    cfg = SMALL.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)   # dropout off
    wide = classifier(cfg, 3, m)
    base = init_params(wide, jax.random.key(0))
    mask = m.mask(base, BERT)
    trainable, frozen = masks.split(base, mask)
    # each task's adapter: the init moved by its own noise (the base shared)
    noise = np.random.default_rng(1)
    trainables = [jax.tree_util.tree_map(lambda x: x + 0.2 * noise.standard_normal(x.shape).astype(np.float32),
                                         trainable) for _ in range(3)]
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trainables)
    job, inf_frozen = mixed_job(m, cfg, base, TASKS)

    rng = np.random.default_rng(0)
    batch = random_batch(rng, b=12, t=12, vocab=cfg.vocab_size)
    index = np.array([0, 1, 2, 1, 0, 0, 2, 1, 1, 0, 2, 1], np.int32)
    labels = np.where(index == 2, rng.uniform(0, 5, 12), rng.integers(0, 2 + (index == 1), 12)).astype(np.float32)
    weights = np.ones(12, np.float32)
    weights[[3, 10]] = 0.0                               # filler rows count for nothing
    batch = {**batch, "labels": labels, "weights": weights, "adapter_index": index}
    key = jax.random.key_data(jax.random.key(3))
    (total, aux), grads = jax.jit(jax.value_and_grad(job.loss_fn(), has_aux=True))(
        stacked, {"train": frozen, "inference": inf_frozen}, batch, key)
    per_task = aux["task_loss"]
    assert np.isclose(float(total), float(per_task.sum()))

    for k, task in enumerate(TASKS):
        rows = index == k
        single = classifier(cfg, task.num_labels, m)
        own = masks.flatten(trainables[k])
        own["classifier/kernel"] = own["classifier/kernel"][:, :task.num_labels]
        own["classifier/bias"] = own["classifier/bias"][:task.num_labels]
        t_k = masks.unflatten(own, trainable)
        b_k = {n: v[rows] for n, v in batch.items() if n != "adapter_index"}
        b_k["labels"] = b_k["labels"] if task.is_regression else b_k["labels"].astype(np.int32)
        (loss_k, _), want = jax.jit(jax.value_and_grad(seq_loss(single, task.is_regression), has_aux=True))(
            t_k, frozen, b_k, key)
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


def test_task_batches_without_group_by_length_hold_the_rows_as_drawn():
    """``group_by_length=False``: the same rows per epoch, but a batch holds the drawn rows taken
    ``batch_size`` at a time (each task's rows not sorted by length across batches)."""
    parts = []
    for k, n in enumerate((300, 100)):
        lengths = np.random.default_rng(k).integers(3, 32, n).astype(np.int32)
        ids = (np.arange(32)[None] < lengths[:, None]).astype(np.int32)
        parts.append(encoding.Encoded(ids, np.zeros_like(ids), lengths, np.zeros(n, np.int32)))
    probs = multitask.sampling_probs([300, 100], "proportional", 2.0)
    grouped = multitask.TaskBatches(parts, 16, 32, seed=2, probs=probs)
    drawn = multitask.TaskBatches(parts, 16, 32, seed=2, probs=probs, group_by_length=False)
    spread = lambda order: np.mean([drawn.data.lengths[b].std() for b in order])   # noqa: E731
    for epoch in range(2):
        a, b = grouped.order(epoch), drawn.order(epoch)
        assert sorted(np.concatenate(a).tolist()) == sorted(np.concatenate(b).tolist())
        draws, cursor = drawn._draws(epoch), drawn._cursor(epoch)
        rows = np.empty(len(draws), np.int64)
        for k in range(2):
            sel = np.flatnonzero(draws == k)
            rows[sel] = drawn._stream(k, int(cursor[k]), len(sel))
        want = {frozenset(rows[s:s + 16].tolist()) for s in range(0, len(rows), 16)}
        assert {frozenset(x.tolist()) for x in b} == want != {frozenset(x.tolist()) for x in a}
        assert spread(a) < 0.5 * spread(b)


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
        dev = glue_tasks.load_split(glue_tasks.get_task(name), "dev", glue).take(16)
        outputs, enc = prediction.outputs(loaded, params, m, task, dev, max_seq_length=32, batch_size=8)
        got = task.evaluate(outputs, enc, dev)
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


def test_each_task_takes_its_own_config_and_its_own_update_scale(glue, tiny_bert_dir, tmp_path):
    """With no flag setting them, each task's learning rate, head rate, epochs and length come from
    its own config (``jaxpeft/configs/bitfit.py``: SST-2 3e-3, 2 epochs, length 64; STS-B 1e-3, 10
    epochs, length 128); the rows are sampled in proportion to examples x epochs, and the run lasts
    as long as the tasks' own runs together. One multi-task step on a batch of one task's rows changes
    that task's adapter as its single-task step at its own rate does, and no other adapter."""
    names = ("sst2", "stsb")
    values = dict(method="bitfit", tasks=",".join(names), model=str(tiny_bert_dir), data_dir=str(glue),
                  output_dir=str(tmp_path / "run"), max_train_examples=16, max_eval_examples=16, batch_size=8,
                  keep=0, log_every=1, progress=False, seed=2)
    cfg = config.build(values)
    job = multitask.MultiTask(cfg, echo=lambda s: None)
    res = loop.run(job)

    fields = {"learning_rate": "optim", "head_learning_rate": "optim", "num_epochs": "optim",
              "max_seq_length": "data"}
    own = {n: {k: getattr(getattr(config.build({"method": "bitfit", "task": n}), g), k) for k, g in fields.items()}
           for n in names}
    assert own["sst2"]["learning_rate"] != own["stsb"]["learning_rate"]
    assert own["sst2"]["num_epochs"] != own["stsb"]["num_epochs"]
    assert own["sst2"]["max_seq_length"] != own["stsb"]["max_seq_length"]
    assert res["task_configs"] == own
    assert json.loads((tmp_path / "run" / "results.json").read_text())["task_configs"] == own
    for enc, n in zip(job.train_data, names):   # each task's rows encoded at its own length
        assert enc.max_length == own[n]["max_seq_length"]
    rows = [16 * own[n]["num_epochs"] for n in names]
    assert res["sampling"] == pytest.approx({n: r / sum(rows) for n, r in zip(names, rows)})
    assert res["steps"] == math.ceil(sum(rows) / 32 * math.ceil(32 / 8))
    trained = res["rows_trained"]
    assert sum(trained.values()) == 8 * res["steps"] and trained["stsb"] > 2 * trained["sst2"]

    # the update scale: dropout off, so the mixed (per-row) and the single-task model compute alike
    quiet = job.model.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    job.inf_module = job.inf_module.clone(config=quiet)
    tx = job.optimizer()
    trainable, frozen = job.initial()
    state = steps.init_state(trainable, tx, 0)
    mixed_step = jax.jit(steps.make_train_step(job.loss_fn(), tx))
    peak = cfg.optim.learning_rate                      # the run's schedule at its peak
    before = masks.flatten(state.trainable)
    for k, task in enumerate(job.tasks):
        idx = job.batches.offsets[k] + np.arange(8)   # 8 rows of task k, nothing else
        batch = steps.model_inputs(job.batches.batch(idx))
        assert set(batch["adapter_index"].tolist()) == {k}
        new, _ = mixed_step(state, frozen, batch, np.float32(peak))
        delta = {p: np.asarray(a) - np.asarray(before[p]) for p, a in masks.flatten(new.trainable).items()}
        for p, d in delta.items():
            assert not np.any(np.delete(d, k, axis=0)), p        # the other adapters stay as they were

        # task k's own single-task step: its own model, its own optimizer, at its own rate
        rate = job.own[task.name]
        module = job.model.module.clone(config=quiet, head=dataclasses.replace(job.model.module.head,
                                                                               num_labels=task.num_labels))
        flat = {p: np.asarray(a[k]) for p, a in before.items()}
        for p in ("classifier/kernel", "classifier/bias"):
            flat[p] = flat[p][..., :task.num_labels]
        mine = masks.unflatten(flat, jax.tree_util.tree_map(lambda a: a[0], trainable))
        own_tx = optim.make_optimizer(dataclasses.replace(cfg.optim, learning_rate=rate["learning_rate"],
                                                          head_learning_rate=rate["head_learning_rate"]),
                                      head_patterns(job.heads, ()))
        single = {n: v for n, v in batch.items() if n != "adapter_index"}
        if not task.is_regression:
            single["labels"] = single["labels"].astype(np.int32)
        own_state = steps.init_state(mine, own_tx, 0)
        own_new, _ = jax.jit(steps.make_train_step(steps.model_loss(module, task.loss), own_tx))(
            own_state, frozen["train"], single, np.float32(rate["learning_rate"]))
        want = {p: np.asarray(a) - flat[p] for p, a in masks.flatten(own_new.trainable).items()}
        assert max(np.abs(w).max() for w in want.values()) == pytest.approx(rate["learning_rate"], rel=1e-3)
        for p, w in want.items():
            got = delta[p][k]
            if p.startswith("classifier/"):
                assert not np.any(got[..., task.num_labels:]), p   # padded outputs stay
                got = got[..., :task.num_labels]
            # (a gradient of ~0, such as the key biases', moves by Adam's rounding noise, far below the rate)
            np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-3 * rate["learning_rate"],
                                       err_msg=f"{task.name} {p}")
