"""The MPNet family against transformers and peft, on a tiny random model with a WordPiece tokenizer
of MPNet's kind (``<s>``, ``</s>``, ``<pad>`` = 1; float32, 1e-4):

* the relative position buckets (transformers' ``relative_position_bucket``, bit for bit);
* hidden states (sentences and pairs: no token types), every head (MPNet's classification head,
  token classification, QA);
* LoRA and IA3 with our targets (peft has no MPNet default: ``q,v``; ``k,v,output.dense``), prompt
  tuning in front (the relative bias over the sequence with the virtual tokens, as transformers
  computes it for peft's ``inputs_embeds``);
* prefixes (transformers' MPNet takes no past keys/values): prefix keys read as tokens right in
  front of the sequence, so real tokens' keys/values as a prefix give the joined text's outputs;
* packed rows; BitFit's terms; CLI runs.
"""

import numpy as np
import pytest
import torch

from encoder_family_helpers import (HEADS, PAIRS, PREFIX_TEXT, SINGLES, TINY, Case, build, cli_params, cli_run,
                                    compare_peft, encode, encoder_parity, heads_parity, mpnet_tokenizer,
                                    packing_equivalence, prefix_equivalence, quiet, tokenizer_matches_transformers)
from jaxpeft import masks, methods
from jaxpeft.compute import EXACT
from jaxpeft.errors import UserError
from jaxpeft.models import mpnet
from jaxpeft.models.heads import Head

peft = pytest.importorskip("peft")
from transformers import (MPNetConfig, MPNetForQuestionAnswering, MPNetForSequenceClassification,  # noqa: E402
                          MPNetForTokenClassification)
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder  # noqa: E402

FAM = "mpnet"


@pytest.fixture(autouse=True)
def _quiet():
    quiet()


@pytest.fixture(scope="module")
def case(tmp_path_factory, minilm_dir):
    d = tmp_path_factory.mktemp("tiny-mpnet")
    vocab = mpnet_tokenizer(d, minilm_dir)
    torch.manual_seed(0)
    cfg = MPNetConfig(vocab_size=vocab, **TINY, max_position_embeddings=130, pad_token_id=1, bos_token_id=0,
                      eos_token_id=2, num_labels=3)
    MPNetForSequenceClassification(cfg).save_pretrained(str(d))
    return Case(FAM, d, MPNetForSequenceClassification, MPNetForTokenClassification, MPNetForQuestionAnswering,
                "mpnet")


@pytest.fixture(scope="module")
def enc(case):
    tok = case.tokenizer()
    return {"singles": encode(tok, SINGLES), "pairs": encode(tok, PAIRS)}


def test_relative_position_buckets_are_transformers():
    rel = np.arange(-700, 701)
    theirs = MPNetEncoder.relative_position_bucket(torch.tensor(rel)).numpy()
    np.testing.assert_array_equal(mpnet.relative_position_bucket(rel), theirs)
    # prefix keys sit right in front: query 0 sees prefix key P-1 one step back
    b = mpnet.position_buckets(5, prefix=3)
    assert b.shape == (5, 8)
    np.testing.assert_array_equal(b[0, :3], mpnet.relative_position_bucket(np.array([-3, -2, -1])))
    np.testing.assert_array_equal(b[:, 3:], mpnet.position_buckets(5))


def test_tokenizer(case, glue):
    ours, theirs = tokenizer_matches_transformers(case.model_dir, glue, pad_id=1)
    row = theirs("a man", "the hat")["input_ids"]
    assert row[0] == 0 and row.count(2) == 3


def test_config_and_names(case):
    built = build(case.model_dir, Head("sequence", 3))
    assert built.family is mpnet.FAMILY and built.config.max_position_embeddings == 128
    paths = masks.paths(built.shapes)
    for p in ("mpnet/encoder/relative_attention_bias/embedding", "mpnet/encoder/layer_2/attention/attn/q/kernel",
              "mpnet/encoder/layer_0/attention/LayerNorm/scale", "mpnet/encoder/layer_1/intermediate/dense/bias",
              "mpnet/encoder/layer_1/output/LayerNorm/bias", "classifier/dense/kernel", "classifier/out_proj/bias"):
        assert p in paths, p
    assert not any("token_type" in p or "pooler" in p for p in paths)
    with pytest.raises(UserError, match="cosine pooling"):        # pairs carry no token types to split by
        build(case.model_dir, Head("sequence", 2, "cosine"))


def test_hidden_states_and_heads(case, enc):
    encoder_parity(case, enc["singles"], "sentences")
    encoder_parity(case, enc["pairs"], "pairs")
    heads_parity(case, enc["pairs"])


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_against_peft(case, enc, name):
    fam = mpnet.FAMILY
    configs = {"lora": (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(fam.lora_targets)),
                        {"lora_r": 4, "lora_alpha": 8}),
               "ia3": (peft.IA3Config(task_type="SEQ_CLS", target_modules=list(fam.ia3_targets),
                                      feedforward_modules=list(fam.ia3_feedforward)), {}),
               "prompt": (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
                          {"num_virtual_tokens": 5, "prompt_position": "front"})}
    pc, options = configs[name]
    compare_peft(case, f"{name} vs peft (sequence)", pc, name, options, enc["pairs"])


def test_prefix_equals_real_tokens_in_front(case, enc):
    ids = case.tokenizer()(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    prefix_equivalence(case, enc["pairs"], np.asarray(ids, np.int32))


def test_packed_rows(case):
    packing_equivalence(case, SINGLES)


def test_bitfit_terms_and_fast_compute(case, enc):
    built = build(case.model_dir, HEADS["sequence"])
    for term in mpnet.FAMILY.bitfit_terms:
        m = methods.create("bitfit", {"bitfit_terms": term})
        assert masks.count(built.shapes, m.trainable(built.shapes, built.family))[0] > 0, term
    from encoder_family_helpers import apply, check, fill

    # under the Pallas settings the bias goes through jax.nn.dot_product_attention (XLA's on a CPU)
    fast = build(case.model_dir, HEADS["sequence"], compute=EXACT.replace(attention_impl="pallas",
                                                                          norm_impl="pallas"))
    params = fill(built.shapes, case.torch_model("sequence").state_dict())
    check(FAM, "attention_impl=pallas (XLA fallback)", apply(fast, params, enc["pairs"]),
          apply(built, params, enc["pairs"]), atol=2e-5)
    remat = build(case.model_dir, HEADS["sequence"], compute=EXACT.replace(remat="layer"))
    check(FAM, "remat=layer", apply(remat, params, enc["pairs"]), apply(built, params, enc["pairs"]), atol=1e-6)


@pytest.mark.parametrize("key", cli_params())
def test_cli_trains(case, glue, tmp_path, key):
    cli_run(glue, case.model_dir, tmp_path / "out", key, FAM)


def test_peer_follows_our_pooling_fallback(case, glue, tmp_path):
    """BitFit's RTE config reads the cosine of the pair's two sentences, which MPNet's pairs (no
    token types) cannot be split by: ours falls back to ``[CLS]`` and says so, and the peer's flags
    (``peer_args``, as the study builds them) follow, so both train the same head."""
    import shutil

    from transformers import MPNetModel

    from benchmarks.peft_job import build as peer_build
    from benchmarks.peft_job import parser, peer_args
    from jaxpeft import config
    from jaxpeft.training import single

    folder = tmp_path / "encoder"     # the encoder alone, as all-mpnet-base-v2 ships: each side adds its head
    shutil.copytree(case.model_dir, folder)
    for f in folder.glob("model*.safetensors"):
        f.unlink()
    MPNetModel.from_pretrained(str(case.model_dir)).save_pretrained(str(folder))
    values = {**config.config_values("bitfit", "rte"), "method": "bitfit", "task": "rte",
              "model": str(folder), "data_dir": str(glue), "output_dir": str(tmp_path / "run")}
    cfg = config.from_flat(values)
    assert cfg.head.pooling == "cosine"
    flags = peer_args(cfg)
    assert "--pooling=cls" in flags and "--pooling=cosine" not in flags
    assert cfg.head.pooling == "cosine"                 # the caller's config is left as it was
    said = []
    ours = single.SingleTask(cfg, echo=said.append)
    assert cfg.head.pooling == "cls" and any("pooling: cls" in s for s in said)
    a = parser().parse_args([*flags, "--data_dir=unused"])
    model = peer_build(str(folder), a, num_labels=2)
    theirs = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert theirs == ours.param_report()["trainable_params"]
    # a cosine the caller asks for is refused on both sides
    given = config.build({**values, "pooling": "cosine"})
    assert "--pooling=cosine" in peer_args(given)
    with pytest.raises(UserError, match="cosine pooling splits a pair by its token types"):
        single.SingleTask(given, echo=said.append)
