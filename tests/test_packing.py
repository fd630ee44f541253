"""Packed rows (jaxpeft.data.packing): a packed example's logits equal its logits alone, the packing
covers every example once, and a packed epoch takes no more steps than the unpacked one, none of
them empty."""

import jax
import numpy as np
import pytest

from jaxpeft import config, masks, methods
from jaxpeft.data import batches as batching, encoding, packing
from jaxpeft.errors import UserError
from jaxpeft.tasks import glue as glue_tasks, qa
from jaxpeft.training import single, steps
from jaxpeft.compute import EXACT
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.heads import Head
from jaxpeft.models.loading import build_module, init_params, load_classifier

from masked_step import SMALL
from model_helpers import classifier, mask as method_mask


def test_pack_rows_covers_every_example_once_and_fits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, size=500).astype(np.int32)
    rows = packing.pack_rows(lengths, rng.permutation(500), capacity=64, pool=128)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(500))
    assert all(lengths[r].sum() <= 64 for r in rows)
    fill = lengths.sum() / (64 * len(rows))
    assert fill > 0.9, fill


def _encoded(rng, n=40, t=24, vocab=120):
    lengths = rng.integers(3, t + 1, size=n).astype(np.int32)
    ids = rng.integers(5, vocab, size=(n, t)).astype(np.int32)
    types = (np.arange(t)[None] >= (lengths // 2)[:, None]).astype(np.int32)
    ids[:, 0] = 1                                             # a [CLS] of its own
    valid = np.arange(t)[None] < lengths[:, None]
    return encoding.Encoded(ids * valid, types * valid, lengths, rng.integers(0, 2, size=n).astype(np.int32))


@pytest.mark.parametrize("method", ["full", "bitfit", "prefix"])
def test_packed_example_logits_equal_its_unpacked_logits(method):
    rng = np.random.default_rng(1)
    enc = _encoded(rng)
    m = methods.create(method, {"num_virtual_tokens": 3} if method == "prefix" else {})
    module = classifier(SMALL, 2, m, EXACT)
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, method_mask(m, params))
    predict = jax.jit(steps.make_predict_step(module))
    unpacked = steps.predict_outputs(predict, trainable, frozen,
                                     batching.BucketBatches(enc, 8, 24, 0).eval_batches(enc, 8), len(enc))
    batches = list(packing.eval_batches(enc, 48, rows_per_batch=4))
    assert len({tuple(b["input_ids"].shape) for b in batches}) == 1          # one shape
    assert max(int((b["index"] >= 0).sum(1).max()) for b in batches) > 1     # rows really hold several
    packed = steps.predict_outputs(predict, trainable, frozen, batches, len(enc))
    assert packed.shape == (len(enc), 2)
    np.testing.assert_allclose(packed, unpacked, atol=2e-5, rtol=1e-5)


def test_cls_only_and_all_rows_agree_on_packed_rows():
    rng = np.random.default_rng(2)
    enc = _encoded(rng)
    batch = next(packing.eval_batches(enc, 48, rows_per_batch=6))
    outs = []
    for cls_only in (True, False):
        module = classifier(SMALL, 2, compute=EXACT.replace(cls_only_last_layer=cls_only))
        params = init_params(module, jax.random.key(0))
        outs.append(np.asarray(steps.apply_model(module, params, steps.model_inputs(batch), True)))
    np.testing.assert_allclose(outs[0], outs[1], atol=2e-5)


def test_packed_batches_keep_the_schedule(glue, minilm_dir):
    loaded = load_classifier(str(minilm_dir), 2)
    ex = glue_tasks.load_split(glue_tasks.get_task("sst2"), "train", glue).take(2000)
    enc = encoding.encode(loaded.tokenizer, ex, 64)
    pb = packing.PackedBatches(enc, batch_size=32, max_length=64, seed=0, epochs=2)
    assert pb.steps_per_epoch == 63                                     # the unpacked epoch's steps
    rows = []
    for epoch in (0, 1):
        order = pb.order(epoch)
        n = pb.epoch_steps(epoch)
        assert len(order) == n <= pb.steps_per_epoch
        seen = np.concatenate([s[s >= 0] for s in order])
        assert sorted(seen.tolist()) == list(range(2000))               # every example once an epoch
        # as many steps as the packed rows fill, rows_per_step at a time: no empty step
        filled = [int((s >= 0).any(1).sum()) for s in order]
        assert all(f == pb.rows_per_step for f in filled[:-1]) and 1 <= filled[-1] <= pb.rows_per_step
        assert all((s >= 0).any() for s in order)
        rows.append(sum(filled))
    # the fewest rows per step that fit every planned epoch into the unpacked number of steps
    assert (pb.rows_per_step - 1) * pb.steps_per_epoch < max(rows) <= pb.rows_per_step * pb.steps_per_epoch
    # a step holds at least batch_size examples on average, in far fewer tokens than padded batches
    order = pb.order(0)
    per_step = np.array([(s >= 0).sum() for s in order])
    assert abs(per_step.mean() - 2000 / len(order)) < 1e-9 and per_step.mean() >= 2000 / pb.steps_per_epoch
    b = pb.batch(order[0])
    assert b["input_ids"].shape == (pb.rows_per_step, 64) and b["read_positions"].shape == (pb.rows_per_step, pb.slots)
    real = (b["segment_ids"] > 0).sum()
    assert real == enc.lengths[order[0][order[0] >= 0]].sum()
    assert pb.order(0)[5].tobytes() == packing.PackedBatches(enc, 32, 64, 0, 2).order(0)[5].tobytes()


def test_packed_run_trains_and_refuses_input_prompts(glue, tmp_path):
    cfg = config.build(dict(method="bitfit", task="sst2", data_dir=str(glue), output_dir=str(tmp_path / "a"),
                            max_steps=60, max_train_examples=1920, max_eval_examples=200, packing=True,
                            progress=False, learning_rate=3e-3))
    res = single.run(cfg, echo=lambda s: None)
    assert res["steps"] == 60 and len(res["compiled_shapes"]["train"]) == 1
    assert len(res["compiled_shapes"]["predict"]) == 1
    assert res["final_dev"]["accuracy"] > 0.6
    with pytest.raises(UserError, match="--packing"):
        single.SingleTask(config.build(dict(method="prompt", task="sst2", data_dir=str(glue), packing=True,
                                          output_dir=str(tmp_path / "b"))))


def test_mean_pooling_packed_equals_unpacked():
    rng = np.random.default_rng(3)
    enc = _encoded(rng)
    module = classifier(SMALL, 2, compute=EXACT, pooling="mean")
    params = init_params(module, jax.random.key(0))
    predict = jax.jit(steps.make_predict_step(module))
    trainable, frozen = masks.split(params, method_mask(methods.create("bitfit"), params))
    unpacked = steps.predict_outputs(predict, trainable, frozen,
                                     batching.BucketBatches(enc, 8, 24, 0).eval_batches(enc, 8), len(enc))
    packed = steps.predict_outputs(predict, trainable, frozen, packing.eval_batches(enc, 48, 4), len(enc))
    np.testing.assert_allclose(packed, unpacked, atol=2e-5, rtol=1e-5)


def test_packed_mask_gives_every_query_a_key_and_real_queries_only_their_segment():
    """Fused attention kernels (cuDNN's) turn a query with no key into NaN: padding queries see the
    padding keys; a real query sees exactly the keys of its own example (and the prefix)."""
    from jaxpeft.models.layers import KeyMask

    seg = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 2, 2, 2, 3, 3, 3]], np.int32)
    for p in (0, 2):
        valid = np.concatenate([np.ones((2, p), bool), seg > 0], axis=1)
        dense = np.asarray(KeyMask(valid=valid, segments=seg).dense())[:, 0]      # [B, T, P + T]
        assert dense.shape == (2, 8, p + 8)
        assert dense.any(-1).all()
        assert dense[:, :, :p].all()
        real = seg > 0
        want = (seg[:, :, None] == seg[:, None, :])
        np.testing.assert_array_equal(dense[:, :, p:][real], want[real])
        assert not (dense[:, :, p:][real] & ~real[:, None, :].repeat(8, 1)[real]).any()   # no padding key


def _spans(rng, enc):
    """Each example's answer span: a start and an end within its own tokens (0, 0: none)."""
    start = np.array([rng.integers(0, n) for n in enc.lengths], np.int32)
    end = np.array([rng.integers(s, n) for s, n in zip(start, enc.lengths)], np.int32)
    start[::5] = end[::5] = 0
    return encoding.Encoded(enc.input_ids, enc.token_type_ids, enc.lengths, None,
                            extra={"start_positions": start, "end_positions": end})


@pytest.mark.parametrize("kind", ["token", "span"])
def test_packed_per_token_outputs_equal_each_example_alone(kind):
    """A tagging or QA head on packed rows: each example's per-token outputs, cut back out of its
    row, are its outputs alone; past its tokens they are zero."""
    rng = np.random.default_rng(4)
    enc = _encoded(rng)
    module = build_module(BERT, SMALL, Head(kind, 3 if kind == "token" else 2), None, EXACT)
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, method_mask(methods.create("bitfit"), params))
    predict = jax.jit(steps.make_predict_step(module))
    unpacked = steps.predict_outputs(predict, trainable, frozen, batching.BucketBatches(enc, 8, 24, 0)
                                     .eval_batches(enc, 8), len(enc), length=24, per_token=True)
    batches = list(packing.eval_batches(enc, 48, rows_per_batch=4))
    assert max(int((b["index"] >= 0).sum(1).max()) for b in batches) > 2
    packed = steps.predict_outputs(predict, trainable, frozen, batches, len(enc), length=24, per_token=True)
    assert packed.shape == unpacked.shape == (len(enc), 24, 3 if kind == "token" else 2)
    real = np.arange(24)[None] < enc.lengths[:, None]
    np.testing.assert_allclose(packed[real], unpacked[real], atol=2e-5, rtol=1e-5)
    assert not packed[~real].any()


def test_packed_span_loss_and_gradients_equal_the_padded_ones():
    """QA's loss on packed rows (each slot's softmax over its own tokens, its answer shifted by its
    offset) equals the loss of the same windows padded one per row, and so do the gradients."""
    rng = np.random.default_rng(5)
    enc = _spans(rng, _encoded(rng, n=24))
    task = qa.ExtractiveQA("qa", None, "f1")
    module = build_module(BERT, SMALL, Head("span", 2), None, EXACT)
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, method_mask(methods.create("bitfit"), params))

    def loss(tr, batch):
        outputs = steps.apply_model(module, masks.merge(tr, frozen), steps.model_inputs(batch), True)
        return task.loss(outputs, batch)

    ids = np.arange(len(enc))
    padded = batching.BucketBatches(enc, len(enc), 24, 0).batch(ids)
    rows = packing.pack_rows(enc.lengths, ids, 48)
    table = packing.rows_to_slots(rows, max(map(len, rows)))
    packed = packing.packed_batch(enc, table, 48)
    assert (packed["index"] >= 0).sum() == len(enc) and packed["start_positions"].shape == table.shape
    want, want_g = jax.value_and_grad(loss)(trainable, padded)
    got, got_g = jax.value_and_grad(loss)(trainable, packed)
    assert float(want) > 0.5
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(np.abs(w).max()) + 1e-7)


def test_an_epoch_beyond_the_plan_keeps_the_planned_slots():
    """The position after the last step (a checkpoint's resume point) lies in the epoch after the
    planned ones; its packing holds no more examples per row than the plan's slots."""
    rng = np.random.default_rng(6)
    lengths = rng.integers(1, 60, size=5000).astype(np.int32)
    enc = encoding.Encoded(np.ones((5000, 60), np.int32), np.zeros((5000, 60), np.int32), lengths, None)
    pb = packing.PackedBatches(enc, batch_size=32, max_length=128, seed=0, epochs=1)
    unplanned = [max(len(r) for r in packing.pack_rows(lengths, np.random.default_rng([0, e]).permutation(5000),
                                                         128)) for e in range(1, 9)]
    assert max(unplanned) > pb.slots          # uncapped, some later epoch would not fit
    for epoch in range(1, 9):
        order = pb.order(epoch)
        assert all(s.shape == (pb.rows_per_step, pb.slots) for s in order)
        assert sorted(np.concatenate([s[s >= 0] for s in order]).tolist()) == list(range(5000))
