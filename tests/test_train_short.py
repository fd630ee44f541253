"""Short real runs of the whole loop on the bundled model and the local GLUE copy."""

import json

import numpy as np

from jaxpeft import config
from jaxpeft.tasks import glue as glue_tasks, metrics
from jaxpeft.training import loop, single


def test_bitfit_sst2_few_hundred_steps_beats_majority(glue, tmp_path):
    cfg = config.build(dict(method="bitfit", task="sst2", data_dir=str(glue), output_dir=str(tmp_path),
                            max_steps=250, batch_size=32, max_seq_length=64, learning_rate=2e-3,
                            eval_every=0, log_every=50, progress=False))
    res = single.run(cfg, echo=lambda s: None)
    task = glue_tasks.get_task("sst2")
    train_labels = glue_tasks.load_split(task, "train", glue).labels
    dev_labels = glue_tasks.load_split(task, "dev", glue).labels
    majority = metrics.majority_baseline("sst2", train_labels, dev_labels)["accuracy"]
    assert res["final_dev"]["accuracy"] >= majority + 0.15, (res["final_dev"], majority)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    for key in ("method", "task", "model", "trainable_params", "total_params", "trainable_pct",
                "best_dev", "final_dev", "steps", "train_seconds", "examples_per_second", "tokens_per_second",
                "wall_seconds", "startup_seconds", "data_seconds", "compile_seconds", "eval_seconds",
                "checkpoint_seconds", "export_seconds"):
        assert key in on_disk, key
    assert on_disk["steps"] == 250
    assert 0.05 < on_disk["trainable_pct"] < 0.2   # MiniLM biases + head: ~0.12%
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 5 and losses[-1] < losses[0]


def test_regression_task_and_reproducibility(glue, tmp_path):
    def run(out):
        cfg = config.build(dict(method="bitfit", task="stsb", data_dir=str(glue), output_dir=str(out),
                                max_steps=12, batch_size=16, max_seq_length=32, max_train_examples=192,
                                max_eval_examples=128, log_every=4, progress=False, seed=3))
        return single.run(cfg, echo=lambda s: None)

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert set(a["final_dev"]) == {"pearson", "spearman"}
    assert a["final_dev"] == b["final_dev"]
    la = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    lb = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    loss = lambda lines: [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]  # noqa: E731
    assert loss(la) == loss(lb) and all(np.isfinite(loss(la)))


def test_packed_run_has_no_step_without_examples(glue, tmp_path):
    """The README's first command (BitFit on SST-2: its config packs rows of 64 tokens, 2 epochs,
    batch 32) on a few hundred examples: every step holds examples (each logged loss is > 0), and an
    epoch has as many steps as its packed rows fill."""
    cfg = config.build(dict(method="bitfit", task="sst2", data_dir=str(glue), output_dir=str(tmp_path),
                            max_train_examples=300, max_eval_examples=64, log_every=1, progress=False))
    assert cfg.data.packing and cfg.optim.num_epochs == 2
    job = single.SingleTask(cfg, echo=lambda s: None)
    res = loop.run(job)
    packed = job.batches
    per_epoch = []
    for epoch in range(2):
        order = packed.order(epoch)
        nonempty = [b for b in order if (b >= 0).any()]
        assert len(nonempty) == len(order) == packed.epoch_steps(epoch)
        per_epoch.append(len(order))
    assert max(per_epoch) <= -(-300 // 32)        # no more steps than unpacked batches of 32
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert res["steps"] == sum(per_epoch) == len(train) == job.total_steps
    assert [r["step"] for r in train] == list(range(1, res["steps"] + 1))
    assert all(r["loss"] > 0 for r in train), [r["step"] for r in train if not r["loss"] > 0]
    assert [r["step"] for r in records if r["event"] == "eval"] == [per_epoch[0], sum(per_epoch)]
