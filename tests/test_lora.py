"""LoRA and bottleneck adapters: the untrained model is the base model, the masks hold what the
papers train, only those leaves move in real train steps, LoRA merges into the weights with the
same logits, peft's target_modules rule, packed rows, and the adapter folder round trip."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import predict as prediction
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.models import fingerprint
from jaxpeft.compute import EXACT
from jaxpeft.errors import UserError
from jaxpeft.methods import lora as lora_lib
from jaxpeft.models import hf_weights
from jaxpeft.models.family import hf_name
from jaxpeft.models.loading import load_classifier, param_shapes
from masked_step import SMALL, assert_export_round_trip, assert_only_masked_leaves_changed, build, train_steps
from model_helpers import BERT, classifier, mask as full_mask

CASES = [("lora", {}), ("lora", {"target_modules": "query,key,value,dense", "lora_r": 4}),
         ("bottleneck", {}), ("bottleneck", {"adapter_type": "pfeiffer", "adapter_size": 16})]
IDS = ["lora", "lora-all", "houlsby", "pfeiffer"]


def sentences(glue, n=12):
    return glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", glue).take(n)


def logits_of(loaded, params, method, examples):
    return prediction.outputs(loaded, params, method, tasks.get("sst2"), examples, max_seq_length=32,
                              batch_size=8)[0]


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_untrained_model_is_the_base_model(name, options, tiny_bert_dir, glue):
    method = methods.create(name, options)
    plain = load_classifier(str(tiny_bert_dir), 2, compute=EXACT)
    ours = load_classifier(str(tiny_bert_dir), 2, method, compute=EXACT)
    added = [p for p in masks.paths(ours.params) if re.search(method.added, p)]
    assert added and set(masks.paths(ours.params)) - set(added) == set(masks.paths(plain.params))
    # the same pretrained encoder and head (same seed), and the same fingerprint: added params are not the base
    flat, base = masks.flatten(ours.params), masks.flatten(plain.params)
    assert all(np.array_equal(flat[p], v) for p, v in base.items())
    assert fingerprint.fingerprint(ours.params, "m", exclude=method.added) == fingerprint.fingerprint(plain.params, "m")
    ex = sentences(glue)
    np.testing.assert_array_equal(logits_of(ours, ours.params, method, ex),
                                  logits_of(plain, plain.params, methods.create("frozen"), ex))


def test_trainable_counts_on_the_bundled_model(minilm_dir):
    """The trainable share of each method on all-MiniLM-L6-v2 (H=384, 6 layers, FFN 1536)."""
    _, config = hf_weights.load_config(minilm_dir)
    h, n, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    head = h * 2 + 2
    expect = {
        ("lora", ()): n * 2 * (h * 8 + 8 * h) + head,
        ("lora", (("target_modules", "query,key,value,dense"),)):
            n * (4 * 2 * 8 * h + 8 * (h + f) + 8 * (f + h)) + 2 * 8 * h + head,
        # a subset of the layers (peft's rule on the whole module name)
        ("lora", (("target_modules", r".*layer\.[01]\.attention\.self\.(query|value)"),)):
            2 * 2 * (h * 8 + 8 * h) + head,
        ("bottleneck", ()): 2 * n * (h * 64 + 64 + 64 * h + h) + (2 * n + 1) * 2 * h + head,
        ("bottleneck", (("adapter_type", "pfeiffer"),)): n * (h * 64 + 64 + 64 * h + h) + head,
    }
    for (name, opts), want in expect.items():
        method = methods.create(name, dict(opts))
        shapes = param_shapes(classifier(config, 2, method))
        got, total = masks.count(shapes, full_mask(method, shapes))
        assert got == want, (name, opts, got, want)
        print(f"{name} {dict(opts)}: {got:,} of {total:,} ({100 * got / total:.3f}%)")


@pytest.mark.parametrize("name,options", CASES[1:], ids=IDS[1:])
def test_train_steps_change_exactly_the_masked_leaves_and_export_round_trips(name, options):
    method = methods.create(name, options)
    _, before, after, mask, _ = train_steps(method)
    assert_only_masked_leaves_changed(before, after, mask)
    exported = assert_export_round_trip(method, after)
    assert all(re.search(method.added + "|^classifier/|LayerNorm", p) for p in exported)


def test_merged_lora_equals_unmerged():
    method = methods.create("lora", {"target_modules": "query,key,value,dense", "lora_r": 4, "lora_alpha": 12})
    module, params = build(method)
    flat = masks.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(flat))
    # non-zero B (an untrained B is zero and would merge trivially)
    flat = {p: (0.2 * jax.random.normal(k, v.shape) if p.endswith("lora_B/kernel") else v)
            for (p, v), k in zip(flat.items(), keys)}
    params = masks.unflatten(flat, params)
    merged = lora_lib.merge(params, method.scale)
    assert not any(re.search(method.added, p) for p in masks.paths(merged))
    plain = classifier(SMALL, 2)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 120, (4, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, 8:].set(0)
    want = jax.jit(module.apply)({"params": params}, ids, mask)
    got = jax.jit(plain.apply)({"params": merged}, ids, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    base = jax.jit(plain.apply)({"params": masks.unflatten(
        {p: v for p, v in masks.flatten(params).items() if not re.search(method.added, p)},
        merged)}, ids, mask)
    assert np.abs(np.asarray(base) - np.asarray(want)).max() > 1e-2   # the update matters


def test_lora_init_as_peft():
    """A: uniform in +-1/sqrt(in) (torch's kaiming_uniform_ with a=sqrt(5)); B: zero."""
    method = methods.create("lora", {"lora_r": 16})
    _, params = build(method)
    flat = masks.flatten(params)
    a = np.asarray(flat["bert/encoder/layer_0/attention/self/query_lora/lora_A/kernel"])
    b = np.asarray(flat["bert/encoder/layer_0/attention/self/value_lora/lora_B/kernel"])
    bound = 1 / np.sqrt(SMALL.hidden_size)
    assert a.shape == (32, 16) and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
    assert b.shape == (16, 32) and not b.any()
    assert method.scale == 1.0   # alpha 16, r 16


def test_lora_dropout_acts_in_training_only():
    method = methods.create("lora", {"lora_dropout": 0.5})
    module, params = build(method)
    flat = {p: (jnp.ones_like(v) if p.endswith("lora_B/kernel") else v) for p, v in masks.flatten(params).items()}
    params = masks.unflatten(flat, params)
    ids = jnp.asarray(np.random.default_rng(1).integers(1, 120, (2, 10)), jnp.int32)
    quiet = SMALL.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    module = classifier(quiet, 2, method)
    train = jax.jit(lambda p, k: module.apply({"params": p}, ids, deterministic=False, rngs={"dropout": k}))
    a, b = (train(params, jax.random.key(k)) for k in (1, 2))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    infer = jax.jit(lambda p: module.apply({"params": p}, ids))
    np.testing.assert_array_equal(np.asarray(infer(params)), np.asarray(infer(params)))
    no_lora = masks.unflatten({p: (0 * v if p.endswith("lora_B/kernel") else v)
                               for p, v in masks.flatten(params).items()}, params)
    np.testing.assert_array_equal(np.asarray(train(no_lora, jax.random.key(1))),
                                  np.asarray(train(no_lora, jax.random.key(2))))


@pytest.mark.parametrize("name", ["lora", "bottleneck"])
def test_packed_rows_give_the_logits_of_separate_rows(name):
    """LoRA and adapters act per token, so they support --packing."""
    method = methods.create(name, {"target_modules": "query,value,dense"} if name == "lora" else {})
    assert method.supports_packing
    module, params = build(method)
    flat = {p: (0.1 * jnp.ones_like(v) if p.endswith(("lora_B/kernel", "up/kernel")) else v)
            for p, v in masks.flatten(params).items()}
    params = masks.unflatten(flat, params)
    rng = np.random.default_rng(2)
    a, b = rng.integers(1, 120, 5), rng.integers(1, 120, 7)
    sep = np.zeros((2, 7), np.int32)
    sep[0, :5], sep[1] = a, b
    want = jax.jit(module.apply)({"params": params}, jnp.asarray(sep), jnp.asarray(sep > 0, jnp.int32))
    packed = np.concatenate([a, b, [0, 0]])[None].astype(np.int32)
    seg = np.array([[1] * 5 + [2] * 7 + [0, 0]], np.int32)
    pos = np.array([list(range(5)) + list(range(7)) + [0, 0]], np.int32)
    got = jax.jit(lambda p, *x: module.apply({"params": p}, x[0], None, None, position_ids=x[1], segment_ids=x[2],
                                             read_positions=x[3]))(
        params, jnp.asarray(packed), jnp.asarray(pos), jnp.asarray(seg), jnp.asarray([[0, 5]], jnp.int32))
    np.testing.assert_allclose(np.asarray(got)[0], np.asarray(want), atol=1e-5, rtol=1e-5)


# peft's own matching (tuners_utils.check_target_module_exists) decides these, per module; the
# sites by their place in a layer (or the pooler), with the layers that have them (3 layers)
ALL = (0, 1, 2)
SITE_NAMES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
              "attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
              "output": "output.dense"}
TARGETS = {
    "query,value": {"query": ALL, "value": ALL},
    "query,key,value,dense": {"query": ALL, "key": ALL, "value": ALL, "attention_output": ALL,
                              "intermediate": ALL, "output": ALL, "pooler": ()},
    "dense": {"attention_output": ALL, "intermediate": ALL, "output": ALL, "pooler": ()},
    "output.dense": {"attention_output": ALL, "output": ALL},
    "attention.output.dense,intermediate.dense": {"attention_output": ALL, "intermediate": ALL},
    "pooler.dense": {"pooler": ()},
    r".*\.attention\.self\.(query|key)": {"query": ALL, "key": ALL},
    r".*layer\.\d+\.output\.dense": {"output": ALL},
    # a subset of the layers: a regex on the whole name, or peft's full dotted names
    r".*layer\.0\..*query": {"query": (0,)},
    r".*layer\.[12]\.(attention\.self\.value|intermediate\.dense)": {"value": (1, 2), "intermediate": (1, 2)},
    "bert.encoder.layer.2.attention.self.key,layer.1.output.dense": {"key": (2,), "output": (1,)},
}


def _expected_modules(sites):
    out = set()
    for site, layers in sites.items():
        if site == "pooler":
            out.add("bert.pooler.dense")
        out |= {f"bert.encoder.layer.{i}.{SITE_NAMES[site]}" for i in layers if site != "pooler"}
    return out


@pytest.mark.parametrize("targets", sorted(TARGETS))
def test_target_modules_follow_peft_rule(targets):
    """The adapted layers of the built model (3 layers) are the modules peft's rule selects."""
    method = methods.create("lora", {"target_modules": targets, "lora_r": 2})
    shapes = param_shapes(classifier(SMALL.replace(num_hidden_layers=3), 2, method))
    method.check_model(shapes, BERT)
    adapted = {hf_name(p)[0][:-len("_lora.lora_A.weight")]
               for p in masks.paths(shapes) if p.endswith("_lora/lora_A/kernel")}
    assert adapted == _expected_modules(TARGETS[targets])


@pytest.mark.parametrize("options,needle", [
    ({"target_modules": ","}, "--target_modules is empty"),
    ({"target_modules": "(query"}, "not a valid regular expression"),
    ({"lora_r": 0}, "--lora_r=0: must be > 0"),
    ({"lora_dropout": 1.0}, "--lora_dropout=1.0: must be in [0, 1)"),
])
def test_bad_lora_options(options, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        methods.create("lora", options)


@pytest.mark.parametrize("targets,needle", [
    ("quer", "'quer' names none of the model's dense layers"),
    ("query,attention.dense", "'attention.dense' names none of the model's dense layers"),
    (r".*layer\.7\..*query", "selects no dense layer of the model"),
])
def test_targets_naming_no_layer_are_an_error_of_the_model(targets, needle):
    """Whether a target names a layer is known once the model is built (``check_model``)."""
    method = methods.create("lora", {"target_modules": targets})
    shapes = param_shapes(classifier(SMALL, 2, method))
    with pytest.raises(UserError, match=re.escape(needle)):
        method.check_model(shapes, BERT)


def test_bad_adapter_options():
    with pytest.raises(UserError, match="--adapter_type=bert: choose one of houlsby, pfeiffer"):
        methods.create("bottleneck", {"adapter_type": "bert"})
    with pytest.raises(UserError, match="--adapter_size=0: must be > 0"):
        methods.create("bottleneck", {"adapter_size": 0})
    assert methods.create("bottleneck", {"adapter_type": "pfeiffer", "train_layer_norms": True}).train_layer_norms
    assert not methods.create("bottleneck", {"adapter_type": "pfeiffer"}).train_layer_norms
    # the earlier name still reads
    assert isinstance(methods.create("adapter"), methods.REGISTRY["bottleneck"])


@pytest.mark.parametrize("name,options", [CASES[1], CASES[2]], ids=["lora-all", "houlsby"])
def test_adapter_folder_round_trip(name, options, tiny_bert_dir, glue, tmp_path):
    """Trained-like params written as an adapter folder and loaded again predict the same; the
    folder holds transformers-style names (peft's for LoRA)."""
    import safetensors.numpy

    method = methods.create(name, options)
    task = tasks.get("sst2")
    loaded = load_classifier(str(tiny_bert_dir), 2, method, compute=EXACT)
    flat = masks.flatten(loaded.params)
    keys = jax.random.split(jax.random.key(3), len(flat))
    mask = masks.flatten(full_mask(method, loaded.params))
    flat = {p: (v + 0.05 * jax.random.normal(k, v.shape) if mask[p] else v) for (p, v), k in zip(flat.items(), keys)}
    params = masks.unflatten(flat, loaded.params)
    fp = fingerprint.fingerprint(loaded.params, str(tiny_bert_dir), exclude=method.added)   # before training
    d = adapters.save_adapter(tmp_path / "a", params, method, task, family=BERT, model_config=loaded.config,
                              base_model=str(tiny_bert_dir), fingerprint=fp, max_seq_length=32)
    names = safetensors.numpy.load_file(str(d / "adapter_model.safetensors"))
    n_trainable = masks.count(params, full_mask(method, params))[0]
    assert sum(v.size for v in names.values()) == n_trainable
    if name == "lora":
        assert "base_model.model.bert.pooler.dense.lora_B.weight" in names
        assert names["base_model.model.bert.encoder.layer.2.intermediate.dense.lora_B.weight"].shape == (96, 4)
    else:
        assert names["bert.encoder.layer.0.attention.output.bottleneck.down.weight"].shape == (64, 48)
        assert "bert.embeddings.LayerNorm.weight" in names and "classifier.weight" in names
    cfg = adapters.read_adapter_config(d)
    assert cfg["method"] == name and cfg["method_options"] == method.options()
    loaded2, params2, m2, _ = adapters.load_adapter(d, compute=EXACT)
    ex = sentences(glue)
    np.testing.assert_array_equal(logits_of(loaded2, params2, m2, ex), logits_of(loaded, params, method, ex))
    assert np.abs(logits_of(loaded2, params2, m2, ex) - logits_of(loaded, loaded.params, method, ex)).max() > 1e-3
