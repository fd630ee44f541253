"""The ModernBERT family against transformers and peft (CPU torch, float32, within 1e-4):

* hidden states of a tiny ModernBERT (rotary positions, alternating global and local layers whose
  window is shorter than the batch's rows, no biases; and one with every bias on) against
  transformers' eager (and sdpa) attention on padded batches;
* the sequence head on ``[CLS]`` and on the mean, the token and the QA heads (all ``head`` +
  ``classifier``);
* LoRA and IA3 with jaxpeft's default targets (peft has none for ``modernbert``: they are given to
  peft), and prompt tuning (in front), each with peft's model;
* prefixes: real text's keys/values as a prefix give that text prepended (global windows), a
  position offset changes nothing (rotary scores read distances only), and a prefix is visible to
  every query of a local layer;
* packed rows (local windows and segments together) give each example its outputs alone;
* every method trains two steps from the command line, packed rows too; BitFit is refused in one
  line (no bias terms); the BPE tokenizer gives transformers' ids.
"""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from jaxpeft import cli, masks, methods
from jaxpeft.adapters import peft_format
from jaxpeft.compute import EXACT
from jaxpeft.models import modernbert
from jaxpeft.models.family import name_table
from jaxpeft.models.heads import Head
from jaxpeft.models.layers import Prompt
from jaxpeft.models.loading import load_model

import deberta_modernbert_helpers as fh

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
import transformers  # noqa: E402

ATOL = 1e-4
TINY = dict(initializer_range=0.2, hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=40,
            local_attention=8, global_attn_every_n_layers=3, max_position_embeddings=128)
BIASES = dict(TINY, norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
              global_attn_every_n_layers=2, hidden_activation="gelu_pytorch_tanh")


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
    """``{'plain': folder, 'biases': folder}``: random transformers checkpoints with a BPE tokenizer."""
    out = {}
    for name, kw in (("plain", TINY), ("biases", BIASES)):
        d = tmp_path_factory.mktemp(f"modernbert-{name}")
        ids = fh.bpe_tokenizer(d, texts)
        torch.manual_seed(0)
        config = transformers.ModernBertConfig(
            vocab_size=ids["vocab_size"], pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"],
            bos_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"], eos_token_id=ids["[SEP]"], **kw)
        transformers.ModernBertModel(config).save_pretrained(d)
        out[name] = d
    return out


def _torch(cls, folder, **kw):
    return cls.from_pretrained(str(folder), attn_implementation="eager", **kw).eval()


def _batch(folder, texts, length=40):
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    by_length = sorted(texts, key=len)     # short and long ones: padding and truncation
    enc = tok([by_length[i] for i in (0, 40, 150, 390)], padding=True, truncation=True, max_length=length,
              return_tensors="pt")
    assert (enc["attention_mask"] == 0).any() and enc["input_ids"].shape[1] > 2 * 8   # rows longer than a window
    return enc


def _ours(enc):
    return [jnp.asarray(enc[k].numpy()) for k in ("input_ids", "attention_mask")]


def test_tokenizer_gives_transformers_ids(folders, texts):
    fh.check_tokenizer(folders["plain"], texts)


def test_config_reads_layer_types_and_rope():
    cfg = modernbert.ModernBertConfig.from_hf(dict(num_hidden_layers=4, global_attn_every_n_layers=2,
                                                  global_rope_theta=5.0, local_rope_theta=7.0))
    assert cfg.layer_types == ("full_attention", "sliding_attention") * 2
    assert (cfg.global_rope_theta, cfg.local_rope_theta) == (5.0, 7.0)
    cfg = modernbert.ModernBertConfig.from_hf(transformers.ModernBertConfig(
        num_hidden_layers=3, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 3.0},
                                              "sliding_attention": {"rope_type": "default", "rope_theta": 4.0}}))
    assert (cfg.global_rope_theta, cfg.local_rope_theta, cfg.layer_types[1]) == (3.0, 4.0, "sliding_attention")


@pytest.mark.parametrize("variant", ["plain", "biases"])
def test_hidden_states_equal_transformers(folders, texts, variant):
    folder = folders[variant]
    enc = _batch(folder, texts)
    with torch.no_grad():
        want = _torch(transformers.ModernBertModel, folder)(**enc).last_hidden_state.numpy()
    loaded = load_model(str(folder), Head("sequence", 2))
    assert loaded.family.name == "modernbert" and loaded.config.norm_bias == (variant == "biases")
    out = fh.apply(modernbert.ModernBertModel(loaded.config, EXACT), {"params": loaded.params["model"]}, *_ours(enc))
    valid = enc["attention_mask"].numpy().astype(bool)
    fh.close(np.asarray(out.hidden)[valid], want[valid], f"modernbert {variant} hidden states")
    if variant == "plain":   # transformers' sdpa path agrees; the local windows matter
        with torch.no_grad():
            sdpa = transformers.ModernBertModel.from_pretrained(str(folder), attn_implementation="sdpa").eval()
            fh.close(np.asarray(out.hidden)[valid], sdpa(**enc).last_hidden_state.numpy()[valid],
                     "modernbert plain hidden states (sdpa)")
        wide = loaded.config.replace(local_attention=1024)
        other = fh.apply(modernbert.ModernBertModel(wide, EXACT), {"params": loaded.params["model"]}, *_ours(enc))
        assert np.abs(np.asarray(other.hidden) - want)[valid].max() > 1e-2


@pytest.mark.parametrize("kind,pooling", [("sequence", "cls"), ("sequence", "mean"), ("token", "cls"),
                                          ("span", "cls")])
def test_head_logits_equal_transformers(folders, texts, kind, pooling):
    folder = folders["plain"]
    cls, n = {"sequence": (transformers.ModernBertForSequenceClassification, 3),
              "token": (transformers.ModernBertForTokenClassification, 5),
              "span": (transformers.ModernBertForQuestionAnswering, 2)}[kind]
    torch.manual_seed(1)
    model = _torch(cls, folder, num_labels=n, classifier_pooling=pooling)
    enc = _batch(folder, texts)
    with torch.no_grad():
        out = model(**enc)
    loaded = load_model(str(folder), Head(kind, n, pooling))
    params, found = fh.with_torch_weights(loaded.params, model.state_dict())
    assert {"head/dense/kernel", "head/norm/scale", "classifier/kernel", "classifier/bias"} <= found
    got = np.asarray(fh.apply(loaded.module, {"params": params}, *_ours(enc)))
    valid = enc["attention_mask"].numpy().astype(bool)
    if kind == "sequence":
        fh.close(got, out.logits.numpy(), f"modernbert {kind} {pooling} logits")
    elif kind == "token":
        fh.close(got[valid], out.logits.numpy()[valid], f"modernbert {kind} logits")
    else:
        fh.close(got[..., 0][valid], out.start_logits.numpy()[valid], f"modernbert {kind} start logits")
        fh.close(got[..., 1][valid], out.end_logits.numpy()[valid], f"modernbert {kind} end logits")


def _peft_case(name):
    """(peft config, our method, which of peft's fresh adapter weights to randomise): peft has no
    defaults for modernbert, so its configs name jaxpeft's."""
    fam = modernbert.FAMILY
    if name == "lora":
        return (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(fam.lora_targets)),
                methods.create("lora", {"lora_r": 4, "lora_alpha": 8}), "lora_B")
    if name == "ia3":
        return (peft.IA3Config(task_type="SEQ_CLS", target_modules=list(fam.ia3_targets),
                               feedforward_modules=list(fam.ia3_feedforward)), methods.create("ia3"), "ia3_l")
    return (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4),
            methods.create("prompt", {"num_virtual_tokens": 4, "prompt_position": "front"}), None)


def test_default_targets_are_the_fused_attention_and_the_feed_forward_input():
    fam = modernbert.FAMILY
    assert fam.lora_targets == ("Wqkv",)
    assert fam.ia3_targets == ("Wqkv", "mlp.Wo") and fam.ia3_feedforward == ("mlp.Wo",)
    from jaxpeft.methods.ia3 import is_feedforward
    assert is_feedforward(fam.ia3_feedforward, "model.layers.1.mlp.Wo")
    assert not is_feedforward(fam.ia3_feedforward, "model.layers.1.attn.Wo")


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_equal_peft(folders, texts, name):
    folder = folders["plain"]
    peft_config, method, randomise = _peft_case(name)
    torch.manual_seed(2)
    base = _torch(transformers.ModernBertForSequenceClassification, folder, num_labels=2)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft_config).eval()
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if randomise and randomise in pname:
                p.copy_(torch.rand_like(p) + 0.5 if name == "ia3" else 0.3 * torch.randn_like(p))
    enc = _batch(folder, texts)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        want = pm(**inputs).logits.numpy()
        if name == "prompt":
            plain = pm.get_base_model()(**inputs).logits.numpy()
        else:
            with pm.disable_adapter():
                plain = pm(**inputs).logits.numpy()
    assert np.abs(plain - want).max() > 100 * ATOL    # the adapter matters
    tensors = {k: v.numpy() for k, v in peft.get_peft_model_state_dict(pm).items()}
    loaded = load_model(str(folder), Head("sequence", 2), method)
    params, _ = fh.with_torch_weights(loaded.params, base_state)
    flat = masks.flatten(params)
    arrays = peft_format.from_tensors(tensors, method, loaded.config, name_table(list(flat)), "peft")
    adapted = ("lora_A/kernel", "ia3_l")
    assert sorted(p for p in arrays if p.endswith(adapted)) == sorted(p for p in flat if p.endswith(adapted))
    flat.update({p: jnp.asarray(a) for p, a in arrays.items()})
    got = np.asarray(fh.apply(loaded.module, {"params": masks.unflatten(flat, params)}, *_ours(enc)))
    fh.close(got, want, f"modernbert {name} vs peft logits")


def _layer_kv(state, n):
    return [state["intermediates"][f"layers_{i}"]["attn"]["key_value"][0] for i in range(n)]


def test_prefix_equals_real_text_in_front(folders, texts):
    """Unrotated keys/values of real tokens ``p`` from a run on ``[p; x]``, as a prefix of ``x``
    (rotated as positions ``-P..-1``), give ``x`` its outputs in ``[p; x]`` where every layer sees
    the whole row; a position offset changes nothing. In local layers the prefix is visible to
    every query."""
    folder = folders["plain"]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = _batch(folder, texts, length=24)
    ids, mask = (enc[k].numpy().astype(np.int32) for k in ("input_ids", "attention_mask"))
    p_ids = np.asarray(tok(texts[7], add_special_tokens=False)["input_ids"][:9], np.int32)
    b, p = ids.shape[0], len(p_ids)
    loaded = load_model(str(folder), Head("sequence", 2))
    n = loaded.config.num_hidden_layers
    variables = {"params": loaded.params["model"]}
    wide = modernbert.ModernBertModel(loaded.config.replace(local_attention=1024), EXACT)
    joined_ids = jnp.asarray(np.concatenate([np.tile(p_ids, (b, 1)), ids], 1))
    joined_mask = jnp.asarray(np.concatenate([np.ones((b, p), np.int32), mask], 1))
    joined, state = fh.apply(wide, variables, joined_ids, joined_mask, mutable=["intermediates"])
    kv = tuple((k[:, :p], v[:, :p]) for k, v in _layer_kv(state, n))
    valid = mask.astype(bool)
    want = np.asarray(joined.hidden)[:, p:][valid]
    for offset in (0, p):
        got = fh.apply(wide, variables, jnp.asarray(ids), jnp.asarray(mask), prompt=Prompt(prefix_kv=kv,
                                                                                             position_offset=offset))
        fh.close(np.asarray(got.hidden)[valid], want, f"modernbert prefix vs text in front (offset {offset})",
                 atol=2e-5)
    alone = fh.apply(wide, variables, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(alone.hidden)[valid] - want).mean() > 1e-2
    # local layers: every query sees the whole prefix, the text only within its window
    band = modernbert.local_band(ids.shape[1], p, loaded.config.window)
    assert band[:, :p].all() and not band[:, p:].all()
    local = modernbert.ModernBertModel(loaded.config, EXACT)
    with_prefix = fh.apply(local, variables, jnp.asarray(ids), jnp.asarray(mask), prompt=Prompt(prefix_kv=kv))
    without = fh.apply(local, variables, jnp.asarray(ids), jnp.asarray(mask))
    far = valid & (np.arange(ids.shape[1]) > loaded.config.window + 1)   # beyond the window of the input's start
    assert far.any() and np.abs(np.asarray(with_prefix.hidden) - np.asarray(without.hidden))[far].min() > 1e-4


def test_packed_rows_give_each_example_its_outputs(folders, texts):
    """Two examples in one row (segments, their own positions) against each alone: local windows
    and segments restrict the keys together."""
    folder = folders["plain"]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    a, b = (tok(t, truncation=True, max_length=20)["input_ids"] for t in (texts[3], texts[11]))
    loaded = load_model(str(folder), Head("sequence", 2))
    model, variables = modernbert.ModernBertModel(loaded.config, EXACT), {"params": loaded.params["model"]}
    row = np.asarray([a + b + [0, 0]], np.int32)
    seg = np.asarray([[1] * len(a) + [2] * len(b) + [0, 0]], np.int32)
    pos = np.asarray([list(range(len(a))) + list(range(len(b))) + [0, 0]], np.int32)
    packed = np.asarray(fh.apply(model, variables, jnp.asarray(row), position_ids=jnp.asarray(pos),
                                 segment_ids=jnp.asarray(seg)).hidden)[0]
    for k, ex in ((1, a), (2, b)):
        alone = np.asarray(fh.apply(model, variables, jnp.asarray([ex], jnp.int32)).hidden)[0]
        fh.close(packed[seg[0] == k], alone, f"modernbert packed example {k}", atol=2e-5)


CLI_CASES = [("lora", []), ("ia3", []),
             ("prompt", ["--num_virtual_tokens=4", "--prompt_position=front", "--pooling=cls"]),
             ("ptuning", ["--num_virtual_tokens=4", "--encoder_type=mlp"]), ("prefix", ["--num_virtual_tokens=4"]),
             ("ptuning_v2", ["--num_virtual_tokens=4"]), ("bottleneck", []), ("full", []), ("frozen", []),
             ("lora", ["--packing"]), ("prefix", ["--num_virtual_tokens=4", "--packing"])]


@pytest.mark.parametrize("method,extra", CLI_CASES)
def test_trains_from_the_command_line(folders, glue, tmp_path, method, extra):
    folder = folders["plain"]
    argv = fh.train_argv(folder, glue, tmp_path / "out", method, *extra)
    assert cli.guarded(lambda: cli.train(argv)) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["steps"] == 2
    if method in ("lora", "ia3", "prompt") and "--packing" not in extra:   # the exported adapter runs in peft
        ours, theirs = fh.peft_logits(tmp_path / "out" / "adapter", folder,
                                      transformers.ModernBertForSequenceClassification, glue,
                                      attn_implementation="eager")
        fh.close(ours, theirs, f"modernbert exported {method} adapter in peft")


def test_bitfit_is_refused_in_one_line(folders, glue, tmp_path, capsys):
    argv = fh.train_argv(folders["plain"], glue, tmp_path / "out", "bitfit")
    assert cli.guarded(lambda: cli.train(argv)) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert "Traceback" not in err and len(lines) == 1 and "has no bias terms to train" in lines[0], err
