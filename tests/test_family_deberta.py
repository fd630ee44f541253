"""The DeBERTa-v2/v3 family against transformers and peft (CPU torch, float32, within 1e-4):

* relative-position buckets equal transformers' ``make_log_bucket_position``;
* hidden states of a tiny DeBERTa-v3 (log buckets, shared attention keys, LayerNorm'ed relative
  table, no absolute positions) and a tiny DeBERTa-v2 (own ``pos_*_proj``, absolute positions,
  token types, clipped distances, the ``ConvLayer``) on padded sentence pairs;
* the sequence (``pooler`` + ``classifier``), token and QA heads' logits;
* LoRA and IA3 with peft's default targets for ``deberta-v2``, and prompt tuning (in front), each
  with peft's model;
* prefixes: the keys/values of real text, as a prefix, give that text prepended (peft's prefix
  tuning does not reach transformers' DeBERTa, which takes no past key values);
* packed rows give each example its outputs alone (relative distances, the convolution);
* every method trains two steps from the command line, packed rows too; the Unigram tokenizer
  gives transformers' ids.
"""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, masks, methods
from jaxpeft.adapters import peft_format
from jaxpeft.compute import EXACT
from jaxpeft.errors import UserError
from jaxpeft.models import deberta, family_for
from jaxpeft.models.family import name_table
from jaxpeft.models.heads import Head
from jaxpeft.models.layers import Prompt
from jaxpeft.models.loading import load_model

import deberta_modernbert_helpers as fh

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402

ATOL = 1e-4
V3 = dict(initializer_range=0.2, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
          relative_attention=True, position_buckets=8, max_position_embeddings=64, max_relative_positions=-1,
          pos_att_type="p2c|c2p",
          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False, type_vocab_size=0)
V2 = dict(V3, share_att_key=False, position_biased_input=True, type_vocab_size=2, conv_kernel_size=3,
          position_buckets=-1, max_relative_positions=6, norm_rel_ebd="none", pos_att_type=["c2p", "p2c"])


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def texts(glue):
    return fh.sentences(glue, 200)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, texts):
    """``{'v3': folder, 'v2': folder}``: random transformers checkpoints with a Unigram tokenizer."""
    out = {}
    for name, kw in (("v3", V3), ("v2", V2)):
        d = tmp_path_factory.mktemp(f"deberta-{name}")
        vocab = fh.unigram_tokenizer(d, texts)
        torch.manual_seed(0)
        transformers.DebertaV2Model(transformers.DebertaV2Config(vocab_size=vocab, **kw)).save_pretrained(d)
        out[name] = d
    return out


def _batch(folder, texts, pairs=True, length=40):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    by_length = sorted(texts, key=len)     # short and long ones: padding and truncation
    first, second = ([by_length[i] for i in idx] for idx in ((0, 40, 150, 390), (300, 8, 60, 200)))
    enc = tok(first, second if pairs else None, padding=True, truncation=True, max_length=length,
              return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return enc


def _ours(enc, keys=("input_ids", "attention_mask", "token_type_ids")):
    return [jnp.asarray(enc[k].numpy()) for k in keys if k in enc]


def test_tokenizer_gives_transformers_ids(folders, texts):
    fh.check_tokenizer(folders["v3"], texts)


def test_log_buckets_equal_transformers():
    from transformers.models.deberta_v2.modeling_deberta_v2 import make_log_bucket_position

    rel = np.arange(-3000, 3001)
    for buckets, max_pos in ((256, 512), (8, 64), (64, 128)):
        want = make_log_bucket_position(torch.as_tensor(rel), buckets, max_pos).numpy()
        np.testing.assert_array_equal(deberta.log_bucket(rel, buckets, max_pos), want)


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_hidden_states_equal_transformers(folders, texts, version):
    folder = folders[version]
    enc = _batch(folder, texts)
    with torch.no_grad():
        want = transformers.DebertaV2Model.from_pretrained(str(folder)).eval()(**enc).last_hidden_state.numpy()
    loaded = load_model(str(folder), Head("sequence", 2))
    assert loaded.family.name == "deberta-v2" and loaded.config.conv_kernel_size == (3 if version == "v2" else 0)
    out = fh.apply(deberta.DebertaV2Model(loaded.config, EXACT), {"params": loaded.params["deberta"]}, *_ours(enc))
    valid = enc["attention_mask"].numpy().astype(bool)
    fh.close(np.asarray(out.hidden)[valid], want[valid], f"deberta {version} hidden states")
    if version == "v2":   # token types are read: swapping them changes the output
        other = fh.apply(deberta.DebertaV2Model(loaded.config, EXACT), {"params": loaded.params["deberta"]},
                         *_ours(enc)[:2], 1 - _ours(enc)[2])
        assert np.abs(np.asarray(other.hidden) - want)[valid].max() > 1e-2


@pytest.mark.parametrize("kind", ["sequence", "token", "span"])
def test_head_logits_equal_transformers(folders, texts, kind):
    folder = folders["v3"]
    cls, n = {"sequence": (transformers.DebertaV2ForSequenceClassification, 3),
              "token": (transformers.DebertaV2ForTokenClassification, 5),
              "span": (transformers.DebertaV2ForQuestionAnswering, 2)}[kind]
    torch.manual_seed(1)
    model = cls.from_pretrained(str(folder), num_labels=n).eval()
    enc = _batch(folder, texts)
    with torch.no_grad():
        out = model(**enc)
    loaded = load_model(str(folder), Head(kind, n))
    params, found = fh.with_torch_weights(loaded.params, model.state_dict())
    heads = {"sequence": ("pooler/dense/kernel", "classifier/kernel"), "token": ("classifier/kernel",),
             "span": ("qa_outputs/kernel",)}[kind]
    assert set(heads) <= found
    got = np.asarray(fh.apply(loaded.module, {"params": params}, *_ours(enc)))
    valid = enc["attention_mask"].numpy().astype(bool)
    if kind == "sequence":
        fh.close(got, out.logits.numpy(), f"deberta {kind} logits")
    elif kind == "token":
        fh.close(got[valid], out.logits.numpy()[valid], f"deberta {kind} logits")
    else:
        fh.close(got[..., 0][valid], out.start_logits.numpy()[valid], f"deberta {kind} start logits")
        fh.close(got[..., 1][valid], out.end_logits.numpy()[valid], f"deberta {kind} end logits")


def _peft_case(name):
    """(peft config, our method, how to randomise peft's fresh adapter weights)."""
    if name == "lora":
        return (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8),
                methods.create("lora", {"lora_r": 4, "lora_alpha": 8}), "lora_B")
    if name == "ia3":
        return peft.IA3Config(task_type="SEQ_CLS"), methods.create("ia3"), "ia3_l"
    return (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
            methods.create("prompt", {"num_virtual_tokens": 4, "prompt_position": "front"}), None)


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_equal_peft(folders, texts, name):
    """peft's defaults for deberta-v2 are ours (the adapted layers are the same), and the logits
    of peft's model with random adapter weights are ours with those weights."""
    folder = folders["v3"]
    peft_config, method, randomise = _peft_case(name)
    torch.manual_seed(2)
    base = transformers.DebertaV2ForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft_config).eval()
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if randomise and randomise in pname:
                p.copy_(torch.rand_like(p) + 0.5 if name == "ia3" else 0.3 * torch.randn_like(p))
    enc = _batch(folder, texts, pairs=False)
    with torch.no_grad():
        want = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.numpy()
    tensors = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    loaded = load_model(str(folder), Head("sequence", 2), method)
    params, _ = fh.with_torch_weights(loaded.params, base_state)
    flat = masks.flatten(params)
    arrays = peft_format.from_tensors(tensors, method, loaded.config, name_table(list(flat)), "peft")
    if name != "prompt":
        adapted = ("lora_A/kernel", "ia3_l")
        assert sorted(p for p in arrays if p.endswith(adapted)) == sorted(p for p in flat if p.endswith(adapted))
    flat.update({p: jnp.asarray(a) for p, a in arrays.items()})
    got = np.asarray(fh.apply(loaded.module, {"params": masks.unflatten(flat, params)},
                              *_ours(enc, ("input_ids", "attention_mask"))))
    fh.close(got, want, f"deberta {name} vs peft logits")
    with torch.no_grad():   # the adapter matters: far above the tolerance
        if name == "prompt":
            plain = pm.get_base_model()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        else:
            with pm.disable_adapter():
                plain = pm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    plain = plain.logits.numpy()
    assert np.abs(plain - want).max() > 100 * ATOL


def test_prefix_equals_real_text_in_front(folders, texts):
    """Keys/values of real tokens ``p`` from a run on ``[p; x]``, as a prefix of ``x``, give ``x``
    the outputs it has in ``[p; x]``: the prefix sits at positions ``-P..-1``, and bucketed
    distances to it are those of text."""
    folder = folders["v3"]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = _batch(folder, texts, pairs=False, length=24)
    ids, mask = (enc[k].numpy().astype(np.int32) for k in ("input_ids", "attention_mask"))
    p_ids = np.asarray(tok(texts[7], add_special_tokens=False)["input_ids"][:11], np.int32)
    b, p = ids.shape[0], len(p_ids)
    loaded = load_model(str(folder), Head("sequence", 2))
    model, variables = deberta.DebertaV2Model(loaded.config, EXACT), {"params": loaded.params["deberta"]}
    joined, state = fh.apply(model, variables, jnp.asarray(np.concatenate([np.tile(p_ids, (b, 1)), ids], 1)),
                             jnp.asarray(np.concatenate([np.ones((b, p), np.int32), mask], 1)),
                             mutable=["intermediates"])
    inter = state["intermediates"]["encoder"]
    layers = range(loaded.config.num_hidden_layers)
    kv = tuple((k[:, :p], v[:, :p]) for k, v in (inter[f"layer_{i}"]["attention"]["self"]["key_value"][0]
                                                 for i in layers))
    got = fh.apply(model, variables, jnp.asarray(ids), jnp.asarray(mask), prompt=Prompt(prefix_kv=kv))
    valid = mask.astype(bool)
    want = np.asarray(joined.hidden)[:, p:][valid]
    fh.close(np.asarray(got.hidden)[valid], want, "deberta prefix vs text in front", atol=2e-5)
    alone = fh.apply(model, variables, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(alone.hidden)[valid] - want).mean() > 1e-2


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_packed_rows_give_each_example_its_outputs(folders, texts, version):
    """Two examples in one row (segments, their own positions) against each alone: distances
    within an example are its own, and v2's convolution does not read across the boundary."""
    folder = folders[version]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    a, b = (tok(t, truncation=True, max_length=20)["input_ids"] for t in (texts[3], texts[11]))
    loaded = load_model(str(folder), Head("sequence", 2))
    model, variables = deberta.DebertaV2Model(loaded.config, EXACT), {"params": loaded.params["deberta"]}
    row = np.asarray([a + b + [0, 0]], np.int32)
    seg = np.asarray([[1] * len(a) + [2] * len(b) + [0, 0]], np.int32)
    pos = np.asarray([list(range(len(a))) + list(range(len(b))) + [0, 0]], np.int32)
    packed = np.asarray(fh.apply(model, variables, jnp.asarray(row), position_ids=jnp.asarray(pos),
                                 segment_ids=jnp.asarray(seg)).hidden)[0]
    for k, ex in ((1, a), (2, b)):
        alone = np.asarray(fh.apply(model, variables, jnp.asarray([ex], jnp.int32)).hidden)[0]
        fh.close(packed[seg[0] == k], alone, f"deberta packed example {k} ({version})", atol=2e-5)


@pytest.mark.parametrize("method,extra", [
    ("lora", []), ("ia3", []), ("bitfit", []),
    ("prompt", ["--num_virtual_tokens=4", "--prompt_position=front", "--pooling=cls"]),
    ("ptuning", ["--num_virtual_tokens=4", "--encoder_type=mlp"]), ("prefix", ["--num_virtual_tokens=4"]),
    ("ptuning_v2", ["--num_virtual_tokens=4"]), ("bottleneck", []), ("full", []), ("frozen", []),
    ("lora", ["--packing"]), ("prefix", ["--num_virtual_tokens=4", "--packing"]),
])
def test_trains_from_the_command_line(folders, glue, tmp_path, method, extra):
    folder = folders["v3"]
    assert cli.guarded(lambda: cli.train(fh.train_argv(folder, glue, tmp_path / "out", method, *extra))) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 2
    if method in ("lora", "ia3", "prompt") and "--packing" not in extra:   # the exported adapter runs in peft
        ours, theirs = fh.peft_logits(tmp_path / "out" / "adapter", folder,
                                      transformers.DebertaV2ForSequenceClassification, glue)
        fh.close(ours, theirs, f"deberta exported {method} adapter in peft")


def test_unsupported_model_type_is_one_line():
    with pytest.raises(UserError, match=r"'deberta'.*deberta-v2.*modernbert"):
        family_for("deberta")
