"""Shared checks of the prompt-method tests: a few real train steps on a small random BERT, then
"exactly the masked leaves changed", and the export round trip."""

from __future__ import annotations

import jax
import numpy as np

from jaxpeft import masks
from jaxpeft.training import optim
from jaxpeft.compute import EXACT
from jaxpeft.config import Optim
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import init_params
from jaxpeft.training.steps import init_state, make_train_step

from model_helpers import BERT, classifier, mask as full_mask, seq_loss

SMALL = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                   vocab_size=120, max_position_embeddings=96)


def random_batch(rng: np.random.Generator, b: int = 8, t: int = 16, vocab: int = 120,
                 labels: int = 2) -> dict[str, np.ndarray]:
    """A padded batch of random ids (row lengths 4..t) with labels."""
    lengths = rng.integers(4, t + 1, size=b)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    types = ((np.arange(t)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
    return {"input_ids": rng.integers(1, vocab, size=(b, t)).astype(np.int32) * mask,
            "attention_mask": mask, "token_type_ids": types,
            "labels": rng.integers(0, labels, size=b).astype(np.int32),
            "weights": np.ones(b, np.float32)}


def build(method, config: BertConfig = SMALL, seed: int = 0, compute=EXACT):
    """``(module, params)`` of a random classifier with ``method``'s hooks and prompt."""
    module = classifier(config, 2, method, compute)
    return module, init_params(module, jax.random.key(seed))


def train_steps(method, config: BertConfig = SMALL, steps: int = 3, seed: int = 0, compute=EXACT):
    """Runs ``steps`` jitted train steps; returns ``(module, params before, params after, mask, state)``."""
    module, params = build(method, config, seed, compute)
    mask = full_mask(method, params)
    tx = optim.make_optimizer(Optim(learning_rate=1e-2, warmup_ratio=0.0))
    schedule = optim.Schedule.create(1e-2, total_steps=10, warmup_ratio=0.0)
    trainable, frozen = masks.split(params, mask)
    state = init_state(trainable, tx, seed=seed)
    step = jax.jit(make_train_step(seq_loss(module), tx), donate_argnums=(0,))
    rng = np.random.default_rng(seed)
    for i in range(steps):
        state, metrics = step(state, frozen, random_batch(rng), np.float32(schedule(i)))
        assert np.isfinite(float(metrics["loss"]))
    return module, params, masks.merge(state.trainable, frozen), mask, state


def assert_only_masked_leaves_changed(before, after, mask) -> None:
    """Every trainable leaf moved; every frozen leaf is bit-identical."""
    flags, b, a = masks.flatten(mask), masks.flatten(before), masks.flatten(after)
    assert b.keys() == a.keys() == flags.keys()
    for path, value in b.items():
        if flags[path]:
            assert not np.array_equal(np.asarray(a[path]), np.asarray(value)), f"{path} did not train"
        else:
            assert np.array_equal(np.asarray(a[path]), np.asarray(value)), f"{path} changed"


def assert_export_round_trip(method, params, config: BertConfig = SMALL) -> dict:
    """Exports ``params``, loads them into ``method.for_inference()``'s model (same frozen encoder)
    and checks that the logits agree; returns the exported arrays."""
    exported = method.export_params(params, BERT)
    inference = method.for_inference()
    inf_module = classifier(config, 2, inference)
    like = init_params(inf_module, jax.random.key(123))
    like = {**like, "bert": params["bert"]}                    # the reloaded base model
    inf_mask = full_mask(inference, like)
    assert sorted(exported) == masks.trainable_paths(inf_mask)
    inf_params = masks.merge(masks.unflatten(exported, like), masks.split(like, inf_mask)[1])
    batch = random_batch(np.random.default_rng(7))
    args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    trained_module = classifier(config, 2, method)
    want = trained_module.apply({"params": params}, *args)
    got = inf_module.apply({"params": inf_params}, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    return exported
