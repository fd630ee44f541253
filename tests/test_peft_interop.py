"""Adapters move between jaxpeft and Hugging Face peft, checked against the real library (CPU torch,
float32, real GLUE sentences, logits within 1e-4):

* a LoRA adapter trained by jaxpeft, loaded with ``peft.PeftModel.from_pretrained`` onto
  transformers' ``BertForSequenceClassification``, gives jaxpeft's class probabilities;
* a LoRA adapter made by peft (non-zero ``lora_B``) and saved with ``save_pretrained`` gives peft's
  probabilities in jaxpeft (library and ``jaxpeft-predict``);
* the same both ways for prompt tuning and P-tuning with ``prompt_position=front``;
* prefix tuning: peft refuses to run it on BERT with current transformers, so the check is the
  layout -- the per-layer keys and values peft's ``get_prompt`` builds from the file equal ours;
* bad input: one ``error:`` line, exit status 2, nothing written.

IA3, DoRA and rsLoRA: ``tests/test_ia3_dora.py``.
"""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from jaxpeft import cli, config, masks, methods
from jaxpeft.adapters import folder as adapters
from jaxpeft.adapters import predict as prediction
from jaxpeft.errors import UserError
from jaxpeft.models.bert import BertConfig as OurBertConfig
from jaxpeft.models.family import hf_name
from jaxpeft.models.loading import param_shapes
from jaxpeft.tasks import glue as glue_tasks
from jaxpeft.training import loop, single
from jaxpeft.compute import EXACT
from jaxpeft.methods import lora as lora_lib

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
from transformers import AutoTokenizer, BertForSequenceClassification  # noqa: E402

from model_helpers import classifier  # noqa: E402

SEQ = 32
ATOL = 1e-4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # peft: "Unexpected keyword arguments ['jaxpeft']", init notes
        yield


@pytest.fixture(scope="module")
def trained(glue, tiny_bert_dir, tmp_path_factory):
    """Short real runs on the tiny BERT: ``trained(method, task, **options) -> adapter folder``."""
    runs = {}

    def get(method, task="sst2", **options):
        key = (method, task, tuple(sorted(options.items())))
        if key not in runs:
            out = tmp_path_factory.mktemp(method) / "out"
            cfg = config.build(dict(method=method, task=task, model=str(tiny_bert_dir), data_dir=str(glue),
                                    output_dir=str(out), max_steps=10, batch_size=8, max_train_examples=80,
                                    max_eval_examples=16, max_seq_length=SEQ, eval_every=0, keep=0,
                                    learning_rate=1e-2, head_learning_rate=1e-2, progress=False, plot=False,
                                    seed=3, compute="exact", **options))
            loop.run(single.SingleTask(cfg, echo=lambda s: None))
            runs[key] = out / "adapter"
        return runs[key]

    return get


def examples(glue, task="sst2", n=24):
    return glue_tasks.load_split(glue_tasks.get_task(task), "dev", glue).take(n)


def torch_logits(model, tokenizer, ex) -> np.ndarray:
    enc = tokenizer(*ex.texts, padding=True, truncation=True, max_length=SEQ, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits.numpy()


def jax_logits(folder, glue_examples, **kw) -> np.ndarray:
    loaded, params, method, task = adapters.load_adapter(folder, compute=EXACT, **kw)
    return prediction.outputs(loaded, params, method, task, glue_examples, max_seq_length=SEQ, batch_size=8)[0]


def adapter_arrays(folder, **kw):
    """The adapter's arrays by our param paths."""
    loaded, _, _, _ = adapters.load_adapter(folder, compute=EXACT, **kw)
    return adapters.adapter_arrays(adapters.read_adapter(folder), loaded.params, loaded.config)


def probabilities(column):
    """The ``label:p,...`` column of a prediction row -> ``{label: p}``."""
    return {k: float(v) for k, v in (x.split(":") for x in column.split(","))}


def probs(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def assert_same(ours, theirs):
    np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)
    np.testing.assert_allclose(probs(ours), probs(theirs), atol=ATOL, rtol=0)


def peft_model(base_dir, folder, num_labels=2):
    model = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    return peft.PeftModel.from_pretrained(model, str(folder)).eval()


# ----------------------------------------------------------------------------- jaxpeft -> peft


def test_jaxpeft_lora_adapter_loads_in_peft(trained, tiny_bert_dir, glue):
    folder = trained("lora", target_modules="query,key,value,dense")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", "SEQ_CLS", 8, 16)
    assert cfg["target_modules"] == ["query", "key", "value", "dense"] and cfg["inference_mode"] is True
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    b = tensors["base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"]
    assert b.shape == (48, 8) and np.abs(b).max() > 1e-3            # trained: not zero
    assert tensors["base_model.model.bert.pooler.dense.lora_A.weight"].shape == (8, 48)   # `dense`, as peft
    assert tensors["base_model.model.classifier.weight"].shape == (2, 48)

    ex = examples(glue)
    pm = peft_model(tiny_bert_dir, folder)
    assert sum("lora_A" in n for n, _ in pm.named_modules() if n.endswith("lora_A")) == 3 * 6 + 1
    ours, theirs = jax_logits(folder, ex), torch_logits(pm, AutoTokenizer.from_pretrained(tiny_bert_dir), ex)
    assert_same(ours, theirs)
    # the LoRA update is a large part of those logits, far above the tolerance
    loaded, params, method, task = adapters.load_adapter(folder, compute=EXACT)
    zero_b = masks.unflatten({p: (0 * v if p.endswith("lora_B/kernel") else v)
                              for p, v in masks.flatten(params).items()}, params)
    without = prediction.outputs(loaded, zero_b, method, task, ex, max_seq_length=SEQ)[0]
    assert np.abs(without - ours).max() > 100 * ATOL


@pytest.mark.parametrize("method,options", [("prompt", {}), ("ptuning", {"encoder_type": "mlp"}), ("ptuning", {})],
                         ids=["prompt", "ptuning-mlp", "ptuning-lstm"])
def test_jaxpeft_prompt_adapter_in_front_loads_in_peft(method, options, trained, tiny_bert_dir, glue):
    # [CLS] read-out: transformers' BertForSequenceClassification pools [CLS] (RTE's configs read the cosine)
    folder = trained(method, "rte", prompt_position="front", num_virtual_tokens=6, pooling="cls", **options)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"prompt": "PROMPT_TUNING", "ptuning": "P_TUNING"}[method]
    assert (cfg["num_virtual_tokens"], cfg["token_dim"], cfg["num_layers"], cfg["num_attention_heads"]) == (6, 48, 3, 4)
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    assert sorted(tensors) == ["base_model.classifier.bias", "base_model.classifier.weight", "prompt_embeddings"]
    assert tensors["prompt_embeddings"].shape == (6, 48)
    ex = examples(glue, "rte", 16)   # sentence pairs: token types after the prompt too
    pm = peft_model(tiny_bert_dir, folder)
    assert_same(jax_logits(folder, ex), torch_logits(pm, AutoTokenizer.from_pretrained(tiny_bert_dir), ex))


# ----------------------------------------------------------------------------- peft -> jaxpeft


def make_peft_adapter(base_dir, peft_config, folder, num_labels=2, seed=0):
    """A peft model with non-zero adapter weights (and a head of unit scale, so logits are O(1)),
    saved with ``save_pretrained``; returns the model in eval mode."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(str(base_dir), num_labels=num_labels)
    pm = peft.get_peft_model(model, peft_config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            if "classifier" in name and name.endswith("weight"):
                p.normal_(0.0, 1.0)
    pm.eval()
    pm.save_pretrained(str(folder))
    return pm


def test_peft_lora_adapter_loads_in_jaxpeft(tiny_bert_dir, glue, tmp_path, capsys):
    folder = tmp_path / "peft-lora"
    pm = make_peft_adapter(tiny_bert_dir, peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                          target_modules=["query", "value", "dense"]), folder)
    ex = examples(glue)
    theirs = torch_logits(pm, AutoTokenizer.from_pretrained(tiny_bert_dir), ex)
    folder_info = adapters.read_adapter(folder)
    assert folder_info.kind == "peft" and folder_info.method.name == "lora"
    o = folder_info.method.options()
    assert (o["lora_r"], o["lora_alpha"], o["lora_dropout"]) == (4, 8.0, 0.0)
    assert sorted(o["target_modules"].split(",")) == ["dense", "query", "value"]   # peft keeps a set
    with pytest.raises(UserError, match="does not record its task .* give --task"):
        adapters.load_adapter(folder)
    ours = jax_logits(folder, ex, task="sst2")      # the base: the folder's base_model_name_or_path
    assert_same(ours, theirs)
    # peft's other weights file (safe_serialization=False): adapter_model.bin
    as_bin = tmp_path / "peft-lora-bin"
    pm.save_pretrained(str(as_bin), safe_serialization=False)
    assert (as_bin / "adapter_model.bin").is_file() and not (as_bin / "adapter_model.safetensors").exists()
    np.testing.assert_array_equal(jax_logits(as_bin, ex, task="sst2"), ours)
    # the same through jaxpeft-predict, with the base model given as a flag
    from jaxpeft.cli import predict

    texts = [f"--text={t}" for t in ex.texts[0][:5]]
    rc = cli.guarded(lambda: predict.main([f"--adapter={folder}", "--task=sst2", f"--model={tiny_bert_dir}",
                                               "--compute=exact", f"--max_seq_length={SEQ}", *texts]))
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [r.split("\t") for r in out.splitlines()[1:]]
    scores = [probabilities(r[3]) for r in rows]
    assert [r[2] for r in rows] == [max(s, key=s.get) for s in scores]
    np.testing.assert_allclose(np.array([[s["negative"], s["positive"]] for s in scores]), probs(theirs)[:5],
                               atol=ATOL)


@pytest.mark.parametrize("kind", ["prompt", "ptuning"])
def test_peft_prompt_adapter_loads_in_jaxpeft_in_front(kind, tiny_bert_dir, glue, tmp_path):
    folder = tmp_path / kind
    pc = (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5) if kind == "prompt" else
          peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=5, encoder_hidden_size=16))
    pm = make_peft_adapter(tiny_bert_dir, pc, folder)
    ex = examples(glue, "rte", 16)                   # sentence pairs
    reloaded = peft_model(tiny_bert_dir, folder)     # P-tuning: the saved prompt, not the encoder
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    theirs = torch_logits(reloaded, tok, ex)
    np.testing.assert_allclose(torch_logits(pm, tok, ex), theirs, atol=1e-5)
    m = adapters.read_adapter(folder).method
    assert (m.name, m.prompt_position, m.num_virtual_tokens) == ("prompt", "front", 5)
    assert_same(jax_logits(folder, ex, task="rte", model=str(tiny_bert_dir)), theirs)


# ----------------------------------------------------------------------------- prefix tuning


def peft_prefix_logits(pm, tok, ex):
    """peft's logits of its prefix-tuned BERT, or ``None`` where peft cannot run it: peft up to 0.21
    feeds ``past_key_values`` to the encoder, which transformers 5's ``BertModel`` does not take, and
    raises; peft 0.22 runs it."""
    try:
        return torch_logits(pm, tok, ex)
    except ValueError as e:
        assert "does not support past key values" in str(e)
        return None


def test_prefix_adapters_match_peft_both_ways(trained, tiny_bert_dir, glue, tmp_path):
    """Both directions of the file layout are checked against peft's get_prompt, and, where peft
    runs prefix tuning on BERT, the logits of each direction against peft's."""
    def peft_kv(pm):
        cache = pm.get_prompt(batch_size=1)     # per layer [1, heads, P, head_dim]
        return [(lay.keys[0].detach().numpy(), lay.values[0].detach().numpy()) for lay in cache.layers]

    def ours_kv(arrays, heads=4):
        k, v = arrays["prompt/prefix_keys"], arrays["prompt/prefix_values"]
        n, p, h = k.shape
        return [(k[i].reshape(p, heads, h // heads).transpose(1, 0, 2),
                 v[i].reshape(p, heads, h // heads).transpose(1, 0, 2)) for i in range(n)]

    # peft -> jaxpeft
    folder = tmp_path / "peft-prefix"
    pm = make_peft_adapter(tiny_bert_dir, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4), folder)
    ex, tok = examples(glue), AutoTokenizer.from_pretrained(tiny_bert_dir)
    theirs = peft_prefix_logits(pm, tok, ex)
    if theirs is not None:
        assert_same(jax_logits(folder, ex, task="sst2", model=str(tiny_bert_dir)), theirs)
    info = adapters.read_adapter(folder)
    assert (info.method.name, info.method.num_virtual_tokens, info.method.prefix_projection,
            info.method.shift_positions) == ("prefix", 4, False, True)
    arrays = adapter_arrays(folder, task="sst2")
    for (pk, pv), (ok, ov) in zip(peft_kv(pm), ours_kv(arrays), strict=True):
        np.testing.assert_array_equal(pk, ok)
        np.testing.assert_array_equal(pv, ov)
    loaded, params, method, _ = adapters.load_adapter(folder, task="sst2")
    assert masks.flatten(params)["prompt/prefix_keys"].shape == (3, 4, 48)

    # jaxpeft -> peft
    ours = trained("ptuning_v2", num_virtual_tokens=4, shift_positions=True)     # peft always shifts
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_layers"], cfg["token_dim"], cfg["prefix_projection"]) == \
        ("PREFIX_TUNING", 3, 48, False)
    assert safetensors.numpy.load_file(str(ours / "adapter_model.safetensors"))["prompt_embeddings"].shape == \
        (4, 2 * 3 * 48)
    reloaded = peft_model(tiny_bert_dir, ours)
    for (pk, pv), (ok, ov) in zip(peft_kv(reloaded), ours_kv(adapter_arrays(ours)), strict=True):
        np.testing.assert_array_equal(pk, ok)
        np.testing.assert_array_equal(pv, ov)
    theirs = peft_prefix_logits(reloaded, tok, ex)
    if theirs is not None:
        assert_same(jax_logits(ours, ex), theirs)


# ----------------------------------------------------------------------------- peft's target rule


@pytest.mark.parametrize("targets", ["query,value", "dense", "output.dense", "key,intermediate.dense",
                                     r".*\.attention\.self\.(query|key)", r".*layer\.\d+\.output\.dense",
                                     r".*layer\.0\..*query", "layer.1.attention.self.key,pooler.dense"])
def test_target_modules_select_what_peft_selects(targets):
    """The layers our model adapts (its ``*_lora`` params) are those peft adapts, a subset of the
    layers included."""
    from transformers import BertConfig

    shape = dict(vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(BertConfig(**shape))
    spec = lora_lib.parse_targets(targets)
    pm = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                    target_modules=spec if isinstance(spec, str) else list(spec)))
    adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in pm.named_modules()
               if n.endswith(".lora_A")}
    method = methods.create("lora", {"target_modules": targets, "lora_r": 2})
    shapes = param_shapes(classifier(OurBertConfig(**shape), 2, method))
    ours = {hf_name(p)[0].removesuffix("_lora.lora_A.weight") for p in masks.paths(shapes)
            if p.endswith("_lora/lora_A/kernel")}
    assert adapted and adapted == ours


# ----------------------------------------------------------------------------- bad input


def run_predict(args, capsys):
    from jaxpeft.cli import predict

    rc = cli.guarded(lambda: predict.main(args))
    _, err = capsys.readouterr()
    return rc, [ln for ln in err.splitlines() if ln.strip()]


def edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_bad_peft_folders_are_one_line(trained, tiny_bert_dir, other_tiny_bert_dir, minilm_dir, tmp_path, capsys):
    good = tmp_path / "good"
    make_peft_adapter(tiny_bert_dir, peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]), good)
    ours = trained("lora", target_modules="query,key,value,dense")

    def copy(name, src=good):
        return Path(shutil.copytree(src, tmp_path / name))

    loha = tmp_path / "loha"
    make_peft_adapter(tiny_bert_dir, peft.LoHaConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]), loha)
    wrong_shape = copy("wrong_shape")
    t = safetensors.numpy.load_file(str(good / "adapter_model.safetensors"))
    t["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"] = np.zeros((3, 48), np.float32)
    safetensors.numpy.save_file(t, str(wrong_shape / "adapter_model.safetensors"))
    no_weights = copy("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    prompt = tmp_path / "prompt"
    make_peft_adapter(tiny_bert_dir, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), prompt)
    three = tmp_path / "three_labels"
    make_peft_adapter(tiny_bert_dir, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3), three, 3)
    cases = {
        "unsupported type": (loha, ["--task=sst2"], "peft_type 'LOHA' is not supported; jaxpeft reads IA3, LORA"),
        "other task type": (edit_config(copy("causal"), task_type="CAUSAL_LM"), ["--task=sst2"],
                            "task_type 'CAUSAL_LM'; jaxpeft reads SEQ_CLS, TOKEN_CLS, QUESTION_ANS adapters"),
        "rank pattern": (edit_config(copy("rank_pattern"), rank_pattern={"query": 4}), ["--task=sst2"],
                         "rank_pattern={'query': 4} is not supported by jaxpeft's LoRA"),
        "base-rewriting init": (edit_config(copy("pissa"), init_lora_weights="pissa"), ["--task=sst2"],
                                "init_lora_weights='pissa' rewrites the base model's weights"),
        "no task": (good, [], "does not record its task (a folder written by peft): give --task"),
        "task disagrees": (ours, ["--task=rte"], "--task=rte, but adapter"),
        "recorded base differs": (good, ["--task=sst2", f"--model={other_tiny_bert_dir}"],
                                  "was made for base model"),
        "our fingerprint differs": (ours, [f"--model={other_tiny_bert_dir}"], "(other weights); use --model="),
        "other architecture": (prompt, ["--task=sst2", f"--model={minilm_dir}"],
                               "is another model (another architecture or size)"),
        "shape fields": (edit_config(copy("no_base", prompt), base_model_name_or_path=None),
                         ["--task=sst2", f"--model={minilm_dir}"],
                         "the adapter is for a model with token_dim=48, but the base model"),
        "no base": (edit_config(copy("no_base2"), base_model_name_or_path=None), ["--task=sst2"],
                    "does not name its base model: give --model"),
        "wrong shape": (wrong_shape, ["--task=sst2"], "has shape (48, 3), the model's is (48, 2)"),
        "labels": (three, ["--task=sst2"], "the classifier has 3 outputs, but task sst2 has 2 labels"),
        "no weights": (no_weights, ["--task=sst2"], "has no adapter_model.safetensors"),
        "no config": (tmp_path, ["--task=sst2"], "is not an adapter folder: it has no adapter_config.json"),
    }
    out = tmp_path / "preds.tsv"
    out.write_text("previous\n")
    capsys.readouterr()   # what building the folders printed
    for name, (folder, extra, needle) in cases.items():
        rc, lines = run_predict([f"--adapter={folder}", *extra, "--text=a fine film", f"--output={out}"], capsys)
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (name, lines)
        assert out.read_text() == "previous\n", name


def test_cosine_adapter_is_refused_by_peft_and_predicts_in_jaxpeft(trained, tiny_bert_dir, glue):
    """``pooling="cosine"``: a classifier of one input, which transformers' BERT classifier (what peft
    wraps) cannot hold -- peft refuses the folder; jaxpeft loads it and predicts as the run did."""
    folder = trained("lora", "rte", pooling="cosine")
    tensors = safetensors.numpy.load_file(str(folder / "adapter_model.safetensors"))
    assert tensors["base_model.model.classifier.weight"].shape == (2, 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        peft_model(tiny_bert_dir, folder)
    ex = examples(glue, "rte", 16)
    loaded, params, method, task = adapters.load_adapter(folder, compute=EXACT)
    assert loaded.module.head.pooling == "cosine"
    logits = prediction.outputs(loaded, params, method, task, ex, max_seq_length=SEQ, batch_size=8)[0]
    # the head reads cos(u, v) only: the two logits are w_c * cos + b_c, so one straight line holds them
    w, b = np.asarray(params["classifier"]["kernel"])[0], np.asarray(params["classifier"]["bias"])
    cos = (logits[:, 0] - b[0]) / w[0]
    np.testing.assert_allclose(logits[:, 1], w[1] * cos + b[1], atol=1e-4)
    assert np.all(np.abs(cos) <= 1 + 1e-4) and np.ptp(cos) > 0
