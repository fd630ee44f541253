"""Our Flax BERT against transformers' PyTorch BertModel (fp32, real sentences with padding)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BertModel as TorchBertModel

from jaxpeft.compute import EXACT
from jaxpeft.models.bert import BertModel
from jaxpeft.models.heads import TaskModel
from jaxpeft.models.layers import NO_PROMPT, Prompt
from jaxpeft.models.loading import load_classifier

SENTENCES = [
    ("it 's a charming and often affecting journey .", None),
    ("unflinchingly bleak and desperate", None),
    ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
    ("The drain is clogged with hair. It has to be cleaned, and quickly, before the guests arrive "
     "for dinner tonight at eight.", "The hair has to be cleaned."),
]


def _inputs(tokenizer):
    a = [s for s, _ in SENTENCES]
    b = [t or "" for _, t in SENTENCES]
    enc = tokenizer(a, b, padding=True, return_tensors="np")
    assert (enc["attention_mask"] == 0).any(), "the test needs padded rows"
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _encode(config, params, enc, compute=EXACT, prompt=NO_PROMPT):
    """``(hidden states, pooler output of row 0)`` of the encoder alone (``params``: its own)."""
    b = enc["input_ids"].shape[0]
    out = BertModel(config, compute).apply({"params": params}, enc["input_ids"], enc["attention_mask"],
                                           enc["token_type_ids"], prompt=prompt,
                                           pool_rows=jnp.zeros((b, 1), jnp.int32))
    assert out.pooled.shape == (b, 1, config.hidden_size)
    return out.hidden, out.pooled[:, 0]


def _compare(model_dir, **load_kw):
    loaded = load_classifier(str(model_dir), 2, **load_kw)
    enc = _inputs(loaded.tokenizer)
    seq, pooled = _encode(loaded.config, loaded.params["bert"], enc)
    ref = TorchBertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in enc.items()})
    valid = enc["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(seq) - out.last_hidden_state.numpy())
    return diff[valid].max(), np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max(), seq, pooled


def test_parity_bundled_minilm(minilm_dir):
    d_seq, d_pool, seq, _ = _compare(minilm_dir)
    assert seq.shape[-1] == 384
    assert d_seq <= 1e-4, d_seq
    assert d_pool <= 1e-4, d_pool


def test_parity_random_config_other_depth_and_width(tiny_bert_dir):
    d_seq, d_pool, seq, _ = _compare(tiny_bert_dir)
    assert seq.shape[-1] == 48
    assert d_seq <= 1e-4, d_seq
    assert d_pool <= 1e-4, d_pool


def test_bfloat16_compute_stays_close(minilm_dir):
    f32 = load_classifier(str(minilm_dir), 2)
    bf16 = load_classifier(str(minilm_dir), 2, compute=EXACT.replace(dtype="bfloat16"))
    enc = _inputs(f32.tokenizer)
    seq32, _ = _encode(f32.config, f32.params["bert"], enc)
    seq16, _ = _encode(bf16.config, f32.params["bert"], enc, bf16.compute)
    assert seq16.dtype == jnp.bfloat16
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda x: x.dtype == jnp.float32, bf16.params))
    valid = enc["attention_mask"].astype(bool)
    err = np.abs(np.asarray(seq16, np.float32) - np.asarray(seq32))[valid]
    assert err.mean() < 0.05 and err.max() < 0.5


def test_dropout_is_active_only_in_training(minilm_dir):
    m = load_classifier(str(minilm_dir), 2)
    enc = _inputs(m.tokenizer)
    ev1 = m.module.apply({"params": m.params}, **enc, deterministic=True)
    ev2 = m.module.apply({"params": m.params}, **enc, deterministic=True)
    tr1 = m.module.apply({"params": m.params}, **enc, deterministic=False,
                         rngs={"dropout": jax.random.key(1)})
    tr2 = m.module.apply({"params": m.params}, **enc, deterministic=False,
                         rngs={"dropout": jax.random.key(2)})
    assert np.array_equal(ev1, ev2)
    assert not np.allclose(tr1, tr2)


def test_prefix_extension_point_keys_longer_than_queries(minilm_dir):
    """Zero-length-effect check of the prefix hook: masked-out prefixes change nothing, and the
    output keeps the input's length."""
    m = load_classifier(str(minilm_dir), 2)
    enc = _inputs(m.tokenizer)
    cfg = m.config
    b = enc["input_ids"].shape[0]
    rng = np.random.default_rng(0)
    kv = tuple((jnp.asarray(rng.normal(size=(1, 5, cfg.num_attention_heads, cfg.head_dim)), jnp.float32),
                jnp.asarray(rng.normal(size=(1, 5, cfg.num_attention_heads, cfg.head_dim)), jnp.float32))
               for _ in range(cfg.num_hidden_layers))
    base, _ = _encode(cfg, m.params["bert"], enc)
    off, _ = _encode(cfg, m.params["bert"], enc, prompt=Prompt(prefix_kv=kv, prefix_mask=jnp.zeros((b, 5))))
    on, _ = _encode(cfg, m.params["bert"], enc, prompt=Prompt(prefix_kv=kv))
    assert off.shape == base.shape == on.shape
    np.testing.assert_allclose(np.asarray(off), np.asarray(base), atol=1e-4)
    assert np.abs(np.asarray(on) - np.asarray(base)).max() > 1e-2


def test_prompt_extension_point_keeps_real_cls(minilm_dir):
    m = load_classifier(str(minilm_dir), 2)
    enc = _inputs(m.tokenizer)
    cfg = m.config
    prompt = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, cfg.hidden_size)), jnp.float32)
    seq, pooled = _encode(cfg, m.params["bert"], enc, prompt=Prompt(embeds=prompt))
    length = enc["input_ids"].shape[1]
    assert seq.shape[1] == length + 4
    # the pooler reads position 0, the real [CLS] (the prompt sits at positions 1..4)
    dense = m.params["bert"]["pooler"]["dense"]
    np.testing.assert_allclose(np.asarray(pooled), np.tanh(np.asarray(seq[:, 0]) @ dense["kernel"]
                                                           + dense["bias"]), atol=1e-5)
    # virtual tokens that are the word embeddings of real tokens compute what those tokens typed
    # into the input right after [CLS] (type 0, attended to) do: the prompt sits at 1..4
    words = np.asarray(m.params["bert"]["embeddings"]["word_embeddings"]["embedding"])
    extra = np.array([1996, 2143, 2003, 2204])
    b = enc["input_ids"].shape[0]
    fills = {"input_ids": extra, "attention_mask": 1, "token_type_ids": 0}
    typed = {k: np.concatenate([v[:, :1], np.broadcast_to(fills[k], (b, 4)), v[:, 1:]], axis=1)
             for k, v in enc.items()}
    as_prompt, _ = _encode(cfg, m.params["bert"], enc, prompt=Prompt(embeds=jnp.asarray(words[extra][None])))
    as_text, _ = _encode(cfg, m.params["bert"], typed)
    valid = typed["attention_mask"].astype(bool)
    np.testing.assert_allclose(np.asarray(as_prompt)[valid], np.asarray(as_text)[valid], atol=1e-4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _encode(cfg, m.params["bert"], enc, prompt=Prompt(embeds=jnp.zeros((1, 600, cfg.hidden_size))))


def test_mean_pooling_reads_the_mean_of_the_token_outputs(minilm_dir):
    """``pooling="mean"``: the head reads the masked mean of the last layer's outputs, which is the
    sentence embedding the bundled model was trained to produce (sentence-transformers' mean
    pooling of transformers' ``last_hidden_state``)."""
    m = load_classifier(str(minilm_dir), 2, pooling="mean")
    enc = _inputs(m.tokenizer)
    head = {"kernel": np.eye(m.config.hidden_size, 2, dtype=np.float32), "bias": np.zeros(2, np.float32)}
    logits = m.module.apply({"params": {**m.params, "classifier": head}}, **enc)
    ref = TorchBertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    with torch.no_grad():
        out = ref(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    mask = enc["attention_mask"][..., None].astype(np.float32)
    mean = (out * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(np.asarray(logits), mean[:, :2], atol=1e-4)
    assert isinstance(m.module, TaskModel) and m.module.head.pooling == "mean"


PAIRS = [
    ("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing."),
    ("The drain is clogged with hair. It has to be cleaned, and quickly, before the guests arrive "
     "for dinner tonight at eight.", "The hair has to be cleaned."),
    ("Three dogs.", "A cat sleeps on the warm windowsill while the rain keeps falling outside."),
]


def test_split_pair_gives_each_sentence_as_the_tokenizer_encodes_it_alone(minilm_dir):
    from jaxpeft.models.layers import split_pair

    tok = load_classifier(str(minilm_dir), 2).tokenizer
    a, b = [p for p, _ in PAIRS], [h for _, h in PAIRS]
    enc = tok(a, b, padding="max_length", max_length=48, return_tensors="np")
    ids, mask = split_pair(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    ids, mask = np.asarray(ids), np.asarray(mask)
    assert ids.shape == (6, 48)
    for row, text in enumerate(a + b):
        alone = tok(text)["input_ids"]
        assert mask[row].sum() == len(alone)
        assert ids[row, :len(alone)].tolist() == alone


def test_cosine_pooling_reads_the_cosine_of_the_sentences_encoded_apart(minilm_dir):
    """``pooling="cosine"``: the head reads the cosine of the two sentences' mean embeddings, each
    sentence encoded alone -- sentence-transformers' similarity, from transformers' BertModel."""
    m = load_classifier(str(minilm_dir), 2, pooling="cosine")
    assert m.params["classifier"]["kernel"].shape == (1, 2)
    a, b = [p for p, _ in PAIRS], [h for _, h in PAIRS]
    enc = m.tokenizer(a, b, padding=True, return_tensors="np")
    enc = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    head = {"kernel": np.array([[1.0, -2.0]], np.float32), "bias": np.array([0.0, 0.5], np.float32)}
    logits = np.asarray(m.module.apply({"params": {**m.params, "classifier": head}}, **enc))
    ref = TorchBertModel.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()

    def embed(texts):
        e = m.tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = ref(**e).last_hidden_state
        w = e["attention_mask"][..., None].float()
        return (h * w).sum(1) / w.sum(1)

    cos = torch.nn.functional.cosine_similarity(embed(a), embed(b)).numpy()
    assert cos.std() > 0.05            # the pairs are not alike: the check can tell them apart
    np.testing.assert_allclose(logits[:, 0], cos, atol=1e-5)
    np.testing.assert_allclose(logits[:, 1], -2 * cos + 0.5, atol=1e-5)
    assert isinstance(m.module, TaskModel) and m.module.head.pooling == "cosine"
