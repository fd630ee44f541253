"""Runs in one process reuse each other's compiled programs where the programs are the same
(another learning rate, seed or epoch count), and compile their own where anything baked into them
differs; a reused program trains exactly as a freshly compiled one."""

import json

import numpy as np
import pytest

from jaxpeft import adapters, config, trainer


def run(tmp_path, name, glue, model, **flags):
    values = {**dict(method="bitfit", task="rte", model=str(model), data_dir=str(glue), max_steps=3,
                     max_train_examples=48, max_eval_examples=16, batch_size=8, max_seq_length=32,
                     log_every=1, progress=False, export_adapter=True, keep=0,
                     output_dir=str(tmp_path / name)), **flags}
    trainer.Trainer(config.build(values)).run()
    res = json.loads((tmp_path / name / "results.json").read_text())
    return res, adapters.read_adapter_weights(tmp_path / name / "adapter")


@pytest.fixture
def fresh_programs():
    saved = dict(trainer._PROGRAMS)
    trainer._PROGRAMS.clear()
    yield trainer._PROGRAMS
    trainer._PROGRAMS.clear()
    trainer._PROGRAMS.update(saved)


def test_a_second_run_reuses_the_programs_and_trains_the_same(tmp_path, glue, tiny_bert_dir, fresh_programs):
    first, _ = run(tmp_path, "a", glue, tiny_bert_dir, learning_rate=1e-3, seed=0)
    assert len(fresh_programs) == 1 and first["programs_reused"] is False
    programs = next(iter(fresh_programs.values()))
    reused, reused_w = run(tmp_path, "b", glue, tiny_bert_dir, learning_rate=3e-3, seed=1)
    assert len(fresh_programs) == 1 and next(iter(fresh_programs.values())) is programs
    assert reused["programs_reused"] is True
    fresh_programs.clear()          # the same run with programs compiled for it alone
    fresh, fresh_w = run(tmp_path, "c", glue, tiny_bert_dir, learning_rate=3e-3, seed=1)
    assert fresh["programs_reused"] is False
    assert reused["final_dev"] == fresh["final_dev"]
    assert reused_w.keys() == fresh_w.keys()
    for k in fresh_w:
        np.testing.assert_array_equal(reused_w[k], fresh_w[k])


@pytest.mark.parametrize("other", [dict(weight_decay=0.1), dict(max_grad_norm=0.5), dict(bitfit_terms="query"),
                                   dict(max_seq_length=16), dict(dropout_impl="random"), dict(pooling="mean")])
def test_anything_baked_into_the_programs_compiles_its_own(other, tmp_path, glue, tiny_bert_dir, fresh_programs):
    run(tmp_path, "a", glue, tiny_bert_dir)
    other_run, _ = run(tmp_path, "b", glue, tiny_bert_dir, **other)
    assert len(fresh_programs) == 2 and other_run["programs_reused"] is False
