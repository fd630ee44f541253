"""IA3, DoRA and rsLoRA against the real Hugging Face peft (CPU torch, float32, a tiny random BERT,
real GLUE sentences, logits within 1e-4):

* our model with given adapter weights computes what peft's ``IA3Config`` / ``LoraConfig(use_dora=True)``
  / ``LoraConfig(use_rslora=True)`` computes on transformers' ``BertForSequenceClassification`` with
  the same weights (peft's defaults for BERT: IA3 on key, value and output.dense);
* an adapter jaxpeft exports loads with ``peft.PeftModel.from_pretrained`` with the same logits, and
  an adapter peft saves loads in jaxpeft with the same logits;
* DoRA's magnitudes start at the weights' norms (peft's init): the untrained model is the base model;
* IA3 and DoRA adapters mix in one batch with others of their family, each row as its adapter alone;
* ``--method=ia3`` and ``--method=lora --use_dora`` train from the command line and export folders
  that peft loads with the same logits.
"""

import json
import re
import warnings

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxpeft import cli, masks, methods, tasks
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import mixed
from jaxpeft.adapters import predict as prediction
from jaxpeft.compute import EXACT
from jaxpeft.data.encoding import Examples
from jaxpeft.errors import UserError
from jaxpeft.models import fingerprint
from jaxpeft.models.loading import load_classifier
from jaxpeft.tasks import glue as glue_tasks

import multi_helpers as mh
from model_helpers import BERT, mask as full_mask

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

SEQ = 32
ATOL = 1e-4
#: the largest logit difference of each check, printed at the end of the module (``-s``)
MEASURED: dict[str, float] = {}

#: (our method and options, peft's config) of each check
CASES = {
    "ia3": (("ia3", {}), lambda: peft.IA3Config(task_type="SEQ_CLS")),
    # targets without the feed-forward default: none of them scales its input (peft's subset rule)
    "ia3-kv": (("ia3", {"target_modules": "key,value"}),
               lambda: peft.IA3Config(task_type="SEQ_CLS", target_modules=["key", "value"], feedforward_modules=[])),
    "dora": (("lora", {"use_dora": True, "lora_r": 4, "lora_alpha": 8, "target_modules": "query,value,dense"}),
             lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_dora=True,
                                     target_modules=["query", "value", "dense"])),
    "rslora": (("lora", {"use_rslora": True, "lora_r": 4, "lora_alpha": 8, "target_modules": "query,key,value"}),
               lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, use_rslora=True,
                                       target_modules=["query", "key", "value"])),
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # peft: "Unexpected keyword arguments ['jaxpeft']", init notes
        yield


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for what, d in sorted(MEASURED.items()):
        print(f"\nPARITY {what:40s} max |logit diff| {d:.2e}")


def sentences(glue, n=24):
    return glue_tasks.load_split(glue_tasks.get_task("sst2"), "dev", glue).take(n)


def torch_logits(model, tokenizer, ex) -> np.ndarray:
    enc = tokenizer(*ex.texts, padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def jax_logits(loaded, params, method, ex) -> np.ndarray:
    return prediction.outputs(loaded, params, method, tasks.get("sst2"), ex, max_seq_length=SEQ, batch_size=8)[0]


def folder_logits(folder, ex, **kw) -> np.ndarray:
    loaded, params, method, task = adapters.load_adapter(folder, compute=EXACT, **kw)
    return prediction.outputs(loaded, params, method, task, ex, max_seq_length=SEQ, batch_size=8)[0]


def assert_same(what, ours, theirs, atol=ATOL):
    d = float(np.abs(np.asarray(ours) - np.asarray(theirs)).max())
    MEASURED[what] = max(d, MEASURED.get(what, 0.0))
    np.testing.assert_allclose(ours, theirs, atol=atol, rtol=0)


def our_path(peft_name: str) -> tuple[str, str] | None:
    """peft's parameter name of an adapter tensor -> (our param path, kind), written out here
    independently of the library: ``base_model.model.bert.encoder.layer.1.attention.self.key.ia3_l.default``
    -> ``bert/encoder/layer_1/attention/self/key_ia3/ia3_l``."""
    m = re.fullmatch(r"base_model\.model\.(.+)\.(ia3_l|lora_A|lora_B|lora_magnitude_vector)\.default(\.weight)?",
                     peft_name)
    if m is None:
        return None
    module, kind = m.group(1), m.group(2)
    path = re.sub(r"layer\.(\d+)", r"layer_\1", module).replace(".", "/")
    leaf = {"ia3_l": "_ia3/ia3_l", "lora_A": "_lora/lora_A/kernel", "lora_B": "_lora/lora_B/kernel",
            "lora_magnitude_vector": "_lora/lora_magnitude_vector"}[kind]
    return path + leaf, kind


def to_torch(kind: str, ours: np.ndarray, like: "torch.Tensor") -> "torch.Tensor":
    """Our array in peft's layout: ``[in, r]``/``[r, out]`` kernels transposed, vectors reshaped."""
    a = np.asarray(ours, np.float32)
    if kind in ("lora_A", "lora_B"):
        a = a.T
    return torch.from_numpy(np.ascontiguousarray(a.reshape(tuple(like.shape))))


def random_adapter(name, tiny_bert_dir, seed=0):
    """Our classifier with ``name``'s method, its own leaves random (IA3 vectors around one, LoRA
    matrices, DoRA magnitudes around the weights' norms) and a head of unit scale."""
    (method_name, options), _ = CASES[name]
    method = methods.create(method_name, options)
    loaded = load_classifier(str(tiny_bert_dir), 2, method, compute=EXACT)
    params = method.init_params(loaded.params, BERT, tokenizer=loaded.tokenizer, rng=jax.random.key(seed))
    rng = np.random.default_rng(seed)
    flat = masks.flatten(params)
    for p in masks.trainable_paths(full_mask(method, params)):
        x = np.asarray(flat[p])
        if p.endswith(("ia3_l", "lora_magnitude_vector")):
            x = x * (1.0 + 0.3 * rng.standard_normal(x.shape))
        elif p.startswith("classifier/"):
            x = rng.standard_normal(x.shape)
        else:
            x = 0.3 * rng.standard_normal(x.shape)
        flat[p] = np.asarray(x, np.float32)
    return method, loaded, masks.unflatten(flat, params)


def peft_with(name, tiny_bert_dir, params):
    """peft's model of ``name`` on transformers' BERT with our adapter and head weights copied in;
    also returns the set of our param paths it holds."""
    model = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    flat = masks.flatten(params)
    with torch.no_grad():
        model.classifier.weight.copy_(torch.from_numpy(np.asarray(flat["classifier/kernel"]).T.copy()))
        model.classifier.bias.copy_(torch.from_numpy(np.asarray(flat["classifier/bias"])))
    pm = peft.get_peft_model(model, CASES[name][1]())
    held = set()
    with torch.no_grad():
        for n, p in pm.named_parameters():
            hit = our_path(n)
            if hit is not None:
                p.copy_(to_torch(hit[1], flat[hit[0]], p))
                held.add(hit[0])
    return pm.eval(), held


def save_ours(directory, loaded, params, method):
    fp = fingerprint.fingerprint(loaded.params, str(loaded.model_dir), exclude=method.added)
    return adapters.save_adapter(directory, params, method, tasks.get("sst2"), family=BERT,
                                 model_config=loaded.config, base_model=str(loaded.model_dir), fingerprint=fp,
                                 max_seq_length=SEQ)


# ----------------------------------------------------------------------------- the three checks


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_logits_as_peft_and_adapters_move_both_ways(name, tiny_bert_dir, glue, tmp_path):
    method, loaded, params = random_adapter(name, tiny_bert_dir)
    ex = sentences(glue)
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    ours = jax_logits(loaded, params, method, ex)

    # 1. the same weights in peft's model: the same logits, the same adapted layers
    pm, held = peft_with(name, tiny_bert_dir, params)
    own = {p for p in masks.trainable_paths(full_mask(method, params)) if not p.startswith("classifier/")}
    assert held == own and own
    theirs = torch_logits(pm, tok, ex)
    assert_same(f"{name}: same weights", ours, theirs)
    # the adapter moves those logits far more than the tolerance (keys and values alone the least)
    base = load_classifier(str(tiny_bert_dir), 2, compute=EXACT)
    plain = {**base.params, "classifier": params["classifier"]}
    assert np.abs(jax_logits(base, plain, methods.create("frozen"), ex) - ours).max() > 20 * ATOL

    # 2. exported by jaxpeft, loaded by peft
    folder = save_ours(tmp_path / "ours", loaded, params, method)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    want = CASES[name][1]()
    assert cfg["peft_type"] == want.peft_type.value and cfg["task_type"] == "SEQ_CLS"
    assert set(cfg["target_modules"]) == set(want.target_modules or peft.utils.constants.
                                             TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["bert"])
    if name.startswith("ia3"):
        assert set(cfg["feedforward_modules"]) == ({"output.dense"} if name == "ia3" else set())
    else:
        assert (cfg["use_dora"], cfg["use_rslora"], cfg["r"], cfg["lora_alpha"]) == (
            name == "dora", name == "rslora", 4, 8)
    reloaded = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=2), str(folder)).eval()
    assert_same(f"{name}: jaxpeft -> peft", torch_logits(reloaded, tok, ex), ours)
    np.testing.assert_allclose(folder_logits(folder, ex), ours, atol=1e-6)

    # 3. saved by peft, loaded by jaxpeft (peft's own names and layout)
    theirs_dir = tmp_path / "peft"
    pm.save_pretrained(str(theirs_dir))
    info = adapters.read_adapter(theirs_dir)
    assert info.kind == "peft" and info.method.name == method.name
    for option in method.mix_same:
        got, expected = getattr(info.method, option), getattr(method, option)
        if option in ("target_modules", "feedforward_modules"):   # peft keeps a set; ours may be the default
            got = sorted(e for e in got.split(",") if e)
            expected = sorted(getattr(method, "targets" if option == "target_modules" else "feedforward")(BERT))
        assert got == expected, option
    assert_same(f"{name}: peft -> jaxpeft", folder_logits(theirs_dir, ex, task="sst2"), theirs)


# ----------------------------------------------------------------------------- DoRA's init


def test_untrained_dora_is_the_base_model_with_peft_magnitudes(tiny_bert_dir, glue):
    """DoRA's magnitudes start at the norms of the weights' output features, as peft's do; the
    untrained DoRA model then computes the base model (it would not with magnitudes of one)."""
    method = methods.create("lora", {"use_dora": True, "target_modules": "query,value,dense"})
    loaded = load_classifier(str(tiny_bert_dir), 2, method, compute=EXACT)
    params = method.init_params(loaded.params, BERT, tokenizer=loaded.tokenizer, rng=jax.random.key(0))
    flat = masks.flatten(params)
    model = BertForSequenceClassification.from_pretrained(str(tiny_bert_dir), num_labels=2)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", use_dora=True,
                                                    target_modules=["query", "value", "dense"]))
    seen = 0
    for n, p in pm.named_parameters():
        hit = our_path(n)
        if hit is not None and hit[1] == "lora_magnitude_vector":
            np.testing.assert_allclose(np.asarray(flat[hit[0]]), p.detach().numpy(), rtol=1e-6)
            seen += 1
    assert seen == 3 * 5 + 1          # per layer query, value, attention.output.dense, intermediate, output; pooler

    ex = sentences(glue, 16)
    base = load_classifier(str(tiny_bert_dir), 2, compute=EXACT)
    want = jax_logits(base, base.params, methods.create("frozen"), ex)
    np.testing.assert_allclose(jax_logits(loaded, params, method, ex), want, atol=1e-5)
    # magnitudes of one (before init_params) rescale every adapted layer: far from the base
    assert np.abs(jax_logits(loaded, loaded.params, method, ex) - want).max() > 1e-2


# ----------------------------------------------------------------------------- mixed batches


MIXED = {
    "ia3": [("ia3", {}), ("ia3", {}), ("ia3", {})],
    "dora": [("lora", {"use_dora": True, "lora_r": 4})] * 3,
}
#: the adapters' tasks (2, 3 and 1 labels), lengths, names; no local MNLI copy: RTE's pairs
TASKS, LENGTHS, NAMES = ("sst2", "mnli", "stsb"), (32, 48, 24), ("pos", "nli", "sim")
TEXTS_FROM = {"sst2": "sst2", "mnli": "rte", "stsb": "stsb"}


@pytest.mark.parametrize("family", sorted(MIXED))
def test_ia3_and_dora_adapters_mix_in_one_batch(family, tiny_bert_dir, glue, tmp_path):
    dirs = [mh.make_adapter(tmp_path / n, tiny_bert_dir, m, t, seed=i, max_seq_length=length, **opts)
            for i, ((m, opts), t, length, n) in enumerate(zip(MIXED[family], TASKS, LENGTHS, NAMES))]
    counts = (7, 6, 5)
    texts = {k: mh.texts_of(glue, TEXTS_FROM[t], n) for k, (t, n) in enumerate(zip(TASKS, counts))}
    path = mh.write_mixed(tmp_path / "in.tsv", [(NAMES[k], texts[k][j]) for j in range(max(counts))
                                                for k in range(3) if j < counts[k]])
    multi = mixed.load(list(zip(NAMES, map(str, dirs))), compute=EXACT)
    assert multi.mix == ("ia3" if family == "ia3" else "lora")
    rows = mixed.read_mixed_tsv(path, multi)
    out, _ = mixed.row_outputs(multi, rows, batch_size=8)
    for k in range(3):
        loaded, params, m, task = adapters.load_adapter(dirs[k], compute=EXACT)
        alone, _ = prediction.outputs(loaded, params, m, task, Examples(tuple(map(list, zip(*texts[k]))), None, "t"),
                                      max_seq_length=LENGTHS[k], batch_size=4)
        got = out[rows.adapter == k][:, :task.num_labels]
        assert_same(f"{family}: mixed batch row vs alone", got, alone, atol=1e-5)
    # the adapters differ: rows of one text under two adapters differ
    assert np.abs(out[rows.adapter == 0][:, :2].mean(0) - out[rows.adapter == 1][:, :2].mean(0)).max() > 1e-3


def test_which_adapters_mix(tiny_bert_dir, tmp_path):
    """Options that must agree compare as they act: the family's default equals the same targets
    written out, in any order (peft keeps them as a set); other targets or DoRA against plain LoRA
    do not mix."""
    kinds = {"dora": ("lora", {"use_dora": True}), "lora": ("lora", {}),
             "lora_vq": ("lora", {"target_modules": "value,query"}),
             "ia3": ("ia3", {}), "ia3_q": ("ia3", {"target_modules": "query,output.dense"}),
             "ia3_all": ("ia3", {"target_modules": "value,output.dense,key", "feedforward_modules": "output.dense"})}
    made = {n: mh.make_adapter(tmp_path / n, tiny_bert_dir, m, "sst2", **o) for n, (m, o) in kinds.items()}
    assert mixed.check_configs([("a", str(made["lora"])), ("b", str(made["lora_vq"]))])[0] == "lora"
    assert mixed.check_configs([("a", str(made["ia3"])), ("b", str(made["ia3_all"]))])[0] == "ia3"
    with pytest.raises(UserError, match="have use_dora=True and False"):
        mixed.check_configs([("a", str(made["dora"])), ("b", str(made["lora"]))])
    with pytest.raises(UserError, match="have target_modules=None and query,output.dense"):
        mixed.check_configs([("a", str(made["ia3"])), ("b", str(made["ia3_q"]))])
    with pytest.raises(UserError, match="different method families"):
        mixed.check_configs([("a", str(made["ia3"])), ("b", str(made["dora"]))])


# ----------------------------------------------------------------------------- from the command line


@pytest.mark.parametrize("flags", [["--method=ia3"], ["--method=lora", "--use_dora", "--lora_r=4"]],
                         ids=["ia3", "dora"])
def test_cli_runs_export_what_peft_loads(flags, tiny_bert_dir, glue, tmp_path):
    out = tmp_path / "run"
    rc = cli.guarded(lambda: cli.train([*flags, "--task=sst2", f"--model={tiny_bert_dir}", f"--data_dir={glue}",
                                        f"--output_dir={out}", "--max_steps=4", "--batch_size=8",
                                        "--max_train_examples=32", "--max_eval_examples=16",
                                        f"--max_seq_length={SEQ}", "--eval_every=0", "--keep=0", "--no-progress",
                                        "--no-plot", "--learning_rate=3e-2", "--compute=exact"]))
    assert rc == 0
    folder = out / "adapter"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    if flags[0] == "--method=ia3":
        assert cfg["peft_type"] == "IA3"
        v = tensors["base_model.model.bert.encoder.layer.0.attention.self.key.ia3_l"]
        assert v.shape == (48, 1) and np.abs(v - 1).max() > 1e-3                     # trained: moved from 1
        assert tensors["base_model.model.bert.encoder.layer.0.output.dense.ia3_l"].shape == (1, 96)
    else:
        assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
        b = tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
        assert b.shape == (48, 4) and np.abs(b).max() > 1e-3
        m = tensors["base_model.model.bert.encoder.layer.0.attention.self.value.lora_magnitude_vector"]
        assert m.shape == (48,)
    ex = sentences(glue)
    ours = folder_logits(folder, ex)
    pm = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(
        str(tiny_bert_dir), num_labels=2), str(folder)).eval()
    assert_same(f"cli {flags[0][9:]}{' dora' if len(flags) > 1 else ''}: jaxpeft -> peft",
                torch_logits(pm, AutoTokenizer.from_pretrained(tiny_bert_dir), ex), ours)


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("options,needle", [
    ({"target_modules": "key,value", "feedforward_modules": "output.dense"},
     "--feedforward_modules=output.dense: must be some of --target_modules=key,value (peft's rule)"),
    ({"target_modules": ","}, "--target_modules is empty"),
    ({"target_modules": "(key"}, "not a valid regular expression"),
])
def test_bad_ia3_options(options, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        methods.create("ia3", options)


def test_ia3_targets_naming_no_layer_are_an_error_of_the_model():
    from jaxpeft.models.loading import param_shapes
    from masked_step import SMALL
    from model_helpers import classifier

    method = methods.create("ia3", {"target_modules": "key,vlaue"})
    with pytest.raises(UserError, match=re.escape("'vlaue' names none of the model's dense layers")):
        method.check_model(param_shapes(classifier(SMALL, 2, method)), BERT)
