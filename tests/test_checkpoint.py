"""Orbax training checkpoints: what is saved, best/latest retention, fallback from an interrupted or
damaged write, wrong base or other flags rejected, sharded state."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optax
import pytest

from jaxpeft import config, masks
from jaxpeft.training import checkpoint, loop, single
from jaxpeft.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def tiny_cfg(glue, model, out, **kw):
    base = dict(method="bitfit", task="sst2", model=str(model), data_dir=str(glue), output_dir=str(out),
                max_steps=12, batch_size=8, learning_rate=1e-3, max_train_examples=64, max_eval_examples=32,
                max_seq_length=16, eval_every=6, save_every=4, keep=2, log_every=4, progress=False, seed=5)
    base.update(kw)
    return config.build(base)


def run(cfg):
    lines = []
    job = single.SingleTask(cfg, echo=lines.append)
    return job, loop.run(job), lines


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def adapter_arrays(out: Path) -> dict:
    import safetensors.numpy

    return safetensors.numpy.load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def finished(glue, tiny_bert_dir, tmp_path_factory):
    """A 12-step BitFit run: saves at 4, 8 (periodic), 6, 12 (evaluations); keeps 2 latest + best."""
    out = tmp_path_factory.mktemp("run") / "out"
    job, res, _ = run(tiny_cfg(glue, tiny_bert_dir, out))
    return out, job, res


def test_checkpoints_hold_the_trainable_subtree_only(finished):
    out, job, res = finished
    ckpt = checkpoint.RunCheckpoints(out / "checkpoints", keep=2, main_metric="accuracy")
    steps = ckpt.steps()
    assert steps[-2:] == [8, 12] and set(steps) <= {4, 6, 8, 12}
    assert res["best_step"] in steps   # the best checkpoint outlives the "latest 2" rule
    trained = masks.trainable_paths(job.mask)
    assert all(p.endswith("/bias") or p.startswith("classifier/") for p in trained)
    for step in steps:
        keys = ckpt.saved_paths(step)
        params = sorted(k[len("trainable/"):] for k in keys if k.startswith("trainable/"))
        assert params == sorted(trained)
        mus = sorted(k.split("/mu/", 1)[1] for k in keys if "/mu/" in k)
        assert mus == sorted(trained)
        frozen_like = [k for k in keys if k.endswith(("/embedding", "/scale"))
                       or (k.endswith("/kernel") and "classifier/" not in k)]
        assert frozen_like == [], frozen_like
        assert {"step", "rng"} <= set(keys)
        meta = ckpt.read_meta(step)
        assert meta["step"] == step and meta["fingerprint"] == job.fingerprint
    ckpt.close()
    # Size: the frozen encoder is 6 MB of float32 here; a checkpoint holds the trainable part and two
    # Adam moments (18 KB) plus Orbax's per-array metadata -- under 5% of the frozen bytes.
    n_train, n_all = masks.count(job.params, job.mask)
    size = dir_bytes(out / "checkpoints" / "12")
    assert 3 * 4 * n_train < size < 0.05 * 4 * (n_all - n_train), size
    assert res["checkpoint_steps"] == steps and Path(res["adapter_dir"]) == out / "adapter"


def _break_latest(out: Path, how: str) -> None:
    d = out / "checkpoints" / "12"
    if how == "interrupted":
        # What a process killed during an async write leaves: a temporary folder, partly written.
        tmp = out / "checkpoints" / "12.orbax-checkpoint-tmp-1700000000000000"
        d.rename(tmp)
        shutil.rmtree(tmp / "meta")
        for f in (tmp / "state" / "d").iterdir():
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    else:
        # A complete-looking folder whose array data is damaged.
        for f in (d / "state" / "d").iterdir():
            f.write_bytes(b"\0" * 10)


@pytest.mark.parametrize("how", ["interrupted", "damaged"])
def test_bad_latest_checkpoint_falls_back_to_previous_complete_one(finished, how, tmp_path, glue,
                                                                 tiny_bert_dir):
    src, _, res = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    (out / "results.json").unlink()
    _break_latest(out, how)
    job, res2, lines = run(tiny_cfg(glue, tiny_bert_dir, out))
    assert any(ln.startswith("resuming from step 8 ") for ln in lines), lines
    assert not list((out / "checkpoints").glob("*orbax-checkpoint-tmp*"))
    if how == "damaged":
        assert (out / "unreadable_checkpoints" / "12" / "state").is_dir()
    # Resumed from 8, the run ends exactly where the original did.
    a, b = adapter_arrays(src), adapter_arrays(out)
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)
    for k in ("best_dev", "best_step", "final_dev", "steps"):
        assert res2[k] == res[k], k
    assert 12 in res2["checkpoint_steps"] and res["best_step"] in res2["checkpoint_steps"]
    # The best dev result of the steps before the resume point (only the evaluation at 6) carried over.
    events = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "resume"] == [{"event": "resume", "step": 8, "best_step": 6}]


def test_wrong_base_or_other_flags_rejected_before_anything_is_written(finished, tmp_path, glue,
                                                                      tiny_bert_dir, other_tiny_bert_dir,
                                                                      minilm_dir):
    src, _, _ = finished
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    cases = [
        (dict(model=str(other_tiny_bert_dir)), ["was trained on base model", "other weights",
                                                f"--model={tiny_bert_dir}"]),
        (dict(model=str(minilm_dir)), ["another architecture or size", "3 layers, hidden 48",
                                       "6 layers, hidden 384"]),
        (dict(learning_rate=3e-4), ["other settings", "learning_rate=0.001 (now 0.0003)"]),
        (dict(bitfit_terms="query"), ["other settings", "bitfit_terms=None (now 'query')"]),
        # a compute field that changes the trajectory (how dropout masks are drawn)
        (dict(dropout_impl="random"), ["other settings", "dropout_impl='hash' (now 'random')"]),
        (dict(packing=False), ["other settings", "packing=True (now False)"]),   # SST-2 packs by default
        (dict(resume=False), ["--no-resume", "latest step 12"]),
        (dict(keep=0), ["--keep=0"]),
    ]
    for overrides, needles in cases:
        model = overrides.pop("model", tiny_bert_dir)
        with pytest.raises(UserError) as e:
            run(tiny_cfg(glue, model, out, **overrides))
        msg = str(e.value)
        assert "\n" not in msg
        for n in needles:
            assert n in msg, (n, msg)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    with pytest.raises(UserError, match="--resume: no complete checkpoint in"):
        run(tiny_cfg(glue, tiny_bert_dir, tmp_path / "empty", resume=True))


def test_a_checkpoint_from_before_a_setting_existed_resumes_where_the_setting_keeps_the_old_behaviour(tmp_path):
    """A setting a checkpoint does not record matches how runs went before it existed: off
    (``None``/``False``), or its :data:`~jaxpeft.training.checkpoint.ADDED_SETTINGS` value
    (``group_by_length``: runs before it grouped batches by length)."""
    fp = {"structure_sha256": "s", "weights_sha256": "w"}
    meta = {"fingerprint": fp, "settings": {"learning_rate": 1e-3}, "total_steps": 10, "train_data_sha256": "d",
            "data_position": {"epoch": 0, "batch_order_sha256": "h"}}

    def checkpoints(**settings):
        ident = checkpoint.RunIdentity(settings={"learning_rate": 1e-3, **settings}, config={}, method="bitfit",
                                       method_options={}, task="rte", num_labels=2, fingerprint=fp,
                                       train_examples=8, train_data_sha256="d", total_steps=10, steps_per_epoch=5)
        return checkpoint.Checkpoints(tmp_path, ident, keep=2, save_every=0, resume=None, main_metric="accuracy",
                                      data_position=lambda step: {"batch_order_sha256": "h"}, echo=lambda s: None)

    checkpoints(group_by_length=True, packing=False, tasks=None).check_compatible(meta, 5)
    for settings, needle in ((dict(group_by_length=False), "group_by_length (now False)"),
                             (dict(packing=True), "packing (now True)")):
        with pytest.raises(UserError, match="other settings") as e:
            checkpoints(**settings).check_compatible(meta, 5)
        assert needle in str(e.value)
    checkpoints(group_by_length=False).check_compatible(
        {**meta, "settings": {"learning_rate": 1e-3, "group_by_length": False}}, 5)


def test_cli_resume_errors_are_one_line(tmp_path, glue, tiny_bert_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text('{"previous": true}')
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), f"--model={tiny_bert_dir}",
                        f"--data_dir={glue}", f"--output_dir={out}", "--resume", "--max_train_examples=16"],
                       capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: --resume: no complete checkpoint in"), lines
    assert json.loads((out / "results.json").read_text()) == {"previous": True}
    assert sorted(x.name for x in out.iterdir()) == ["results.json"]


SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxpeft import masks
    from jaxpeft.training import checkpoint, optim, steps
    from jaxpeft.config import Optim

    assert jax.device_count() == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "fsdp"))
    rng = np.random.default_rng(0)
    params = {"bert": {"dense": {"kernel": rng.normal(size=(8, 4)).astype(np.float32),
                                 "bias": rng.normal(size=(8,)).astype(np.float32)}},
              "classifier": {"kernel": rng.normal(size=(4, 2)).astype(np.float32),
                             "bias": np.zeros(2, np.float32)}}
    mask = masks.union(masks.bitfit(params), masks.match(params, include=r"^classifier/"))
    tx = optim.make_optimizer(Optim())

    def build(spec_of_param):
        trainable, _ = masks.split(params, mask)
        state = steps.init_state(trainable, tx, 0)

        def place(path, x):
            param = path.rsplit("/mu/", 1)[-1].rsplit("/nu/", 1)[-1].removeprefix("trainable/")
            return jax.device_put(x, NamedSharding(mesh, spec_of_param(param) if x.ndim else P()))

        return masks.unflatten({p: place(p, x) for p, x in masks.flatten(state).items()}, state)

    saved = build(lambda p: P("data") if p == "bert/dense/bias" else P())
    saved = saved.replace(trainable=jax.tree_util.tree_map(lambda x: x + 1.5, saved.trainable),
                          step=jax.device_put(jnp.asarray(7, jnp.int32), NamedSharding(mesh, P())))
    assert len(masks.flatten(saved.trainable)["bert/dense/bias"].sharding.device_set) == 4
    ckpt = checkpoint.RunCheckpoints(sys.argv[1], keep=2)
    ckpt.save(7, saved, {"step": 7})
    ckpt.wait()
    target = build(lambda p: {"bert/dense/bias": P("fsdp"), "classifier/kernel": P(None, "data")}.get(p, P()))
    got = ckpt.restore(7, target)
    ckpt.close()
    for (pa, a), (pb, b), (pt, t) in zip(masks.flatten(saved).items(), masks.flatten(got).items(),
                                         masks.flatten(target).items()):
        assert pa == pb == pt
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert b.sharding == t.sharding, (pb, b.sharding, t.sharding)
    assert int(got.step) == 7
    assert masks.flatten(got.trainable)["bert/dense/bias"].sharding.spec == P("fsdp")
    print("sharded ok")
""")


def test_sharded_state_saves_and_restores_onto_another_layout(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / "ckpt")], capture_output=True,
                       text=True, env=env, timeout=600, cwd=REPO)
    assert p.returncode == 0 and "sharded ok" in p.stdout, p.stderr[-3000:]


def test_latest_and_best_are_kept_across_restarts(tmp_path):
    state = {"w": np.arange(3, dtype=np.float32)}
    scores = {1: 0.5, 2: 0.9, 3: None, 4: 0.6, 5: None, 6: 0.9}

    def save(ckpt, steps):
        for s in steps:
            m = None if scores.get(s) is None else {"accuracy": scores[s]}
            assert ckpt.save(s, {"w": state["w"] + s}, {"step": s}, metrics=m)
        ckpt.wait()

    ckpt = checkpoint.RunCheckpoints(tmp_path, keep=2, main_metric="accuracy")
    save(ckpt, [1, 2, 3])
    ckpt.close()
    ckpt = checkpoint.RunCheckpoints(tmp_path, keep=2, main_metric="accuracy")  # a restarted process
    save(ckpt, [4, 5, 6, 7])
    assert ckpt.steps() == [2, 6, 7]          # best (0.9 first reached at 2, kept over the tie at 6)
    assert ckpt.manager.best_step() == 2       # and the 2 latest
    assert not ckpt.save(7, state, {})         # a step that exists is not written again
    ckpt.close()
    assert checkpoint.complete_steps(tmp_path) == [2, 6, 7]


def test_nest_rejects_ambiguous_paths():
    assert checkpoint.nest({"a/b": 1, "c": 2}) == {"a": {"b": 1}, "c": 2}
    with pytest.raises(ValueError):
        checkpoint.nest({"a": 1, "a/b": 2})
    like = {"x": {"y": np.zeros(2), "z": optax.MaskedNode()}}
    back = checkpoint.state_from_tree({"x": {"y": np.ones(2)}}, like)
    assert np.array_equal(back["x"]["y"], np.ones(2)) and isinstance(back["x"]["z"], optax.MaskedNode)
    with pytest.raises(ValueError, match="missing"):
        checkpoint.state_from_tree({"x": {}}, like)


def test_cadence_evaluates_and_saves_when_the_run_settings_say():
    from jaxpeft.training.checkpoint import Cadence

    def epoch_end(step):
        return step % 10 == 0

    per_epoch = Cadence(total=30, epoch_end=epoch_end, eval_every=0, save_every=0, save_minutes=0.0)
    assert [s for s in range(1, 31) if per_epoch.eval_due(s)] == [10, 20]    # the last step: the loop's end
    assert not any(per_epoch.save_due(s) for s in range(1, 31))              # no --save_every, no minutes
    every = Cadence(total=30, epoch_end=epoch_end, eval_every=4, save_every=6, save_minutes=10.0)
    assert [s for s in range(1, 31) if every.eval_due(s)] == [4, 8, 12, 16, 20, 24, 28]
    assert [s for s in range(1, 31) if every.save_due(s)] == [6, 12, 18, 24, 30]   # --save_every wins
    timed = Cadence(total=30, epoch_end=epoch_end, eval_every=0, save_every=0, save_minutes=1.0)
    assert timed.save_due(5) is None
    timed.last_save -= 61.0                                                  # a minute has passed
    assert timed.save_due(5) == "time" and timed.save_due(30) is None

    class Recorder:
        calls: list = []

        def save(self, step, state):
            self.calls.append(("save", step))

        def after_step(self, step, state):
            self.calls.append(("after_step", step))

    rec = Recorder()
    timed.save("time", 5, None, rec)
    every.save("every", 6, None, rec)
    assert rec.calls == [("save", 5), ("after_step", 6)] and timed.save_due(7) is None
