"""The ELECTRA family (the discriminator) against transformers and peft, on tiny random models with
MiniLM's WordPiece tokenizer (float32, 1e-4):

* hidden states (sentences, and pairs with token types), every head (ELECTRA's classification head
  with gelu, token classification, QA), with ``embedding_size`` 32 under ``hidden_size`` 48 (the
  ``embeddings_project`` layer);
* LoRA with peft's default (``query,value``); IA3 with ours (peft has no ELECTRA default: given as
  target_modules); prompt tuning in front, on a model whose embeddings are hidden_size wide (the
  only kind where virtual tokens of hidden_size fit, in peft as in jaxpeft);
* prefixes by the equivalence with real tokens in front; packed rows; BitFit's terms; CLI runs.
"""

import jax
import numpy as np
import pytest
import torch

from encoder_family_helpers import (HEADS, PAIRS, PREFIX_TEXT, SINGLES, TINY, Case, build, cli_params, cli_run,
                                    compare_peft, copy_wordpiece, encode, encoder_parity, heads_parity,
                                    packing_equivalence, prefix_equivalence, quiet)
from jaxpeft import masks, methods
from jaxpeft.errors import UserError
from jaxpeft.models import electra
from jaxpeft.models.heads import Head
from jaxpeft.models.layers import Prompt

peft = pytest.importorskip("peft")
from transformers import (ElectraConfig, ElectraForQuestionAnswering, ElectraForSequenceClassification,  # noqa: E402
                          ElectraForTokenClassification)

FAM = "electra"


@pytest.fixture(autouse=True)
def _quiet():
    quiet()


def _case(d, minilm_dir, embedding_size):
    copy_wordpiece(d, minilm_dir)
    torch.manual_seed(0)
    cfg = ElectraConfig(vocab_size=30522, embedding_size=embedding_size, **TINY, max_position_embeddings=128,
                        num_labels=3)
    ElectraForSequenceClassification(cfg).save_pretrained(str(d))
    return Case(FAM, d, ElectraForSequenceClassification, ElectraForTokenClassification, ElectraForQuestionAnswering,
                "electra", torch_keys=("input_ids", "attention_mask", "token_type_ids"))


@pytest.fixture(scope="module")
def case(tmp_path_factory, minilm_dir):
    """embedding_size 32, hidden_size 48: the embeddings are projected."""
    return _case(tmp_path_factory.mktemp("tiny-electra"), minilm_dir, 32)


@pytest.fixture(scope="module")
def same_width(tmp_path_factory, minilm_dir):
    """embedding_size = hidden_size: no projection, room for virtual tokens."""
    return _case(tmp_path_factory.mktemp("tiny-electra-48"), minilm_dir, 48)


@pytest.fixture(scope="module")
def enc(case):
    tok = case.tokenizer()
    return {"singles": encode(tok, SINGLES), "pairs": encode(tok, PAIRS)}


def test_config_and_names(case, same_width):
    built = build(case.model_dir, Head())
    assert built.family is electra.FAMILY and built.config.embedding_size == 32
    paths = masks.paths(built.shapes)
    assert "electra/embeddings_project/kernel" in paths and "electra/embeddings/word_embeddings/embedding" in paths
    assert built.shapes["electra"]["embeddings"]["word_embeddings"]["embedding"].shape == (30522, 32)
    assert "electra/embeddings_project/kernel" not in masks.paths(build(same_width.model_dir, Head()).shapes)


def test_hidden_states_and_heads(case, enc):
    assert (enc["pairs"]["token_type_ids"] == 1).any()
    encoder_parity(case, enc["singles"], "sentences")
    encoder_parity(case, enc["pairs"], "pairs (token types)")
    heads_parity(case, enc["pairs"])


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_against_peft(case, same_width, enc, name):
    configs = {"lora": (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8), {"lora_r": 4, "lora_alpha": 8}),
               # peft has no IA3 default for ELECTRA: ours (BERT's) given to peft
               "ia3": (peft.IA3Config(task_type="SEQ_CLS", target_modules=list(electra.FAMILY.ia3_targets),
                                      feedforward_modules=list(electra.FAMILY.ia3_feedforward)), {}),
               "prompt": (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5),
                          {"num_virtual_tokens": 5, "prompt_position": "front"})}
    pc, options = configs[name]
    compare_peft(same_width if name == "prompt" else case, f"{name} vs peft (sequence)", pc, name, options,
                 enc["pairs"])


def test_virtual_tokens_must_fit_the_embeddings(case, enc):
    built = build(case.model_dir, Head("sequence", 3))
    prompt = Prompt(embeds=jax.numpy.zeros((1, 4, 48)))
    with pytest.raises(UserError, match="embedding_size=32"):
        jax.eval_shape(lambda p: built.family.encoder(built.config).apply({"params": p}, enc["pairs"]["input_ids"],
                                                                           prompt=prompt), built.shapes["electra"])


def test_default_targets():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA

    assert list(electra.FAMILY.lora_targets) == LORA["electra"]


def test_prefix_equals_real_tokens_in_front(case, enc):
    ids = case.tokenizer()(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    prefix_equivalence(case, enc["pairs"], np.asarray(ids, np.int32))


def test_packed_rows(case):
    packing_equivalence(case, SINGLES)


def test_bitfit_terms(case):
    built = build(case.model_dir, HEADS["sequence"])
    for term in electra.FAMILY.bitfit_terms:
        m = methods.create("bitfit", {"bitfit_terms": term})
        assert masks.count(built.shapes, m.trainable(built.shapes, built.family))[0] > 0, term


@pytest.mark.parametrize("key", cli_params())
def test_cli_trains(case, same_width, glue, tmp_path, key):
    prompt_kind = key in ("prompt", "ptuning")
    cli_run(glue, (same_width if prompt_kind else case).model_dir, tmp_path / "out", key, FAM)
