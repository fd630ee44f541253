"""Runs in one process reuse each other's compiled programs where the programs are the same
(another learning rate, seed or epoch count), and compile their own where anything baked into them
differs; a reused program trains exactly as a freshly compiled one."""

import json

import numpy as np
import pytest

from jaxpeft import config
from jaxpeft.adapters import folder as adapters
from jaxpeft.training import loop, program_store, single


def run(tmp_path, name, glue, model, **flags):
    values = {**dict(method="bitfit", task="rte", model=str(model), data_dir=str(glue), max_steps=3,
                     max_train_examples=48, max_eval_examples=16, batch_size=8, max_seq_length=32,
                     log_every=1, progress=False, export_adapter=True, keep=0,
                     output_dir=str(tmp_path / name)), **flags}
    single.run(config.build(values), echo=lambda s: None)
    res = json.loads((tmp_path / name / "results.json").read_text())
    return res, adapters.read_tensors(adapters.read_adapter(tmp_path / name / "adapter").weights)


@pytest.fixture
def fresh_programs():
    saved = dict(loop._PROGRAMS)
    loop._PROGRAMS.clear()
    yield loop._PROGRAMS
    loop._PROGRAMS.clear()
    loop._PROGRAMS.update(saved)


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


def test_a_later_process_loads_the_stored_programs_and_trains_the_same(tmp_path, glue, tiny_bert_dir,
                                                                        fresh_programs):
    """A run in a new process (the in-process programs cleared) with the same command loads the
    programs an earlier run stored beside the compilation cache, without tracing, and trains to the
    same weights; a store that cannot be read is dropped and the run compiles."""
    cache = str(tmp_path / "xla")
    first, first_w = run(tmp_path, "a", glue, tiny_bert_dir, compilation_cache=cache)
    assert first["programs_loaded"] is False and "lower_seconds" in first["compile_split"]
    stored = list((tmp_path / "xla" / program_store.FOLDER).glob("*.pkl"))
    assert len(stored) == 1
    fresh_programs.clear()
    again, again_w = run(tmp_path, "b", glue, tiny_bert_dir, compilation_cache=cache)
    assert again["programs_loaded"] is True and set(again["compile_split"]) == {"load_seconds"}
    assert again["final_dev"] == first["final_dev"] and again["best_dev"] == first["best_dev"]
    assert again_w.keys() == first_w.keys()
    for k in first_w:
        np.testing.assert_array_equal(again_w[k], first_w[k])

    stored[0].write_bytes(b"not a pickle")
    fresh_programs.clear()
    broken, broken_w = run(tmp_path, "c", glue, tiny_bert_dir, compilation_cache=cache)
    assert broken["programs_loaded"] is False and "lower_seconds" in broken["compile_split"]
    for k in first_w:
        np.testing.assert_array_equal(broken_w[k], first_w[k])
    # its programs came from JAX's compilation cache (which run "a" filled): executables read from
    # there are not stored again (on the CPU they would lose code), so the store stays empty
    assert not stored[0].exists() and not list(stored[0].parent.iterdir())


def test_the_source_digest_covers_every_module_of_the_package(tmp_path, monkeypatch):
    """An edit anywhere in jaxpeft (a task's loss, a model, a method) changes the digest, not only
    an edit of the trainer: a stored program built by other code is never loaded."""
    import shutil
    from pathlib import Path

    import jaxpeft

    root = Path(jaxpeft.__file__).resolve().parent
    assert program_store.package_root() == root
    copy = tmp_path / "jaxpeft"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(program_store, "package_root", lambda: copy)
    digest = program_store.source_digest.__wrapped__()
    assert digest == program_store.source_digest()     # the copy is the package
    for module in ("tasks/tagging.py", "models/bert.py", "methods/lora.py", "training/steps.py"):
        with open(copy / module, "a") as f:
            f.write("\n# edited\n")
        edited = program_store.source_digest.__wrapped__()
        assert edited != digest, module
        digest = edited


def test_stored_programs_are_keyed_by_the_code_and_the_environment(tmp_path, monkeypatch):
    store = program_store.ProgramStore(tmp_path)
    key = store.path("the trainer's key")
    assert store.path("the trainer's key") == key and store.path("another key") != key
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    assert store.path("the trainer's key") != key
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setattr(program_store, "source_digest", lambda: "edited source")
    assert store.path("the trainer's key") != key
    assert program_store.ProgramStore.beside(None) is None
