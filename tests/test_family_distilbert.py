"""The DistilBERT family against transformers and peft, on a tiny random model (sinusoidal position
table) with MiniLM's WordPiece tokenizer (float32, 1e-4):

* hidden states (sentences, and pairs: DistilBERT reads no token types), every head
  (``pre_classifier`` + ReLU + ``classifier``, token classification, QA);
* LoRA and IA3 with our targets (peft has no DistilBERT default; given to peft as target_modules:
  ``q_lin,v_lin``; ``k_lin,v_lin,ffn.lin2`` with feed-forward ``ffn.lin2``), prompt tuning in front;
* prefixes by the equivalence with real tokens in front; packed rows; BitFit's terms; CLI runs.
"""

import numpy as np
import pytest
import torch

from encoder_family_helpers import (HEADS, PAIRS, PREFIX_TEXT, SINGLES, TINY, Case, apply, build, check, cli_params,
                                    cli_run, compare_peft, copy_wordpiece, encode, encoder_parity, fill,
                                    heads_parity, packing_equivalence, prefix_equivalence, quiet)
from jaxpeft import masks, methods
from jaxpeft.compute import EXACT
from jaxpeft.models import distilbert
from jaxpeft.models.heads import Head

peft = pytest.importorskip("peft")
from transformers import (DistilBertConfig, DistilBertForQuestionAnswering,  # noqa: E402
                          DistilBertForSequenceClassification, DistilBertForTokenClassification)

FAM = "distilbert"


@pytest.fixture(autouse=True)
def _quiet():
    quiet()


def _seq_head(model, hidden):
    return model.classifier(torch.relu(model.pre_classifier(hidden[:, 0])))


@pytest.fixture(scope="module")
def case(tmp_path_factory, minilm_dir):
    d = tmp_path_factory.mktemp("tiny-distilbert")
    copy_wordpiece(d, minilm_dir)
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=30522, dim=TINY["hidden_size"], n_layers=TINY["num_hidden_layers"],
                           n_heads=TINY["num_attention_heads"], hidden_dim=TINY["intermediate_size"],
                           initializer_range=TINY["initializer_range"], max_position_embeddings=128,
                           sinusoidal_pos_embds=True, num_labels=3)
    DistilBertForSequenceClassification(cfg).save_pretrained(str(d))
    return Case(FAM, d, DistilBertForSequenceClassification, DistilBertForTokenClassification,
                DistilBertForQuestionAnswering, "distilbert", seq_head=_seq_head)


@pytest.fixture(scope="module")
def enc(case):
    tok = case.tokenizer()
    return {"singles": encode(tok, SINGLES), "pairs": encode(tok, PAIRS)}


def test_config_and_names(case):
    built = build(case.model_dir, Head("sequence", 3))
    cfg = built.config
    assert built.family is distilbert.FAMILY
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size) == \
        (48, 3, 4, 12, 80)
    paths = masks.paths(built.shapes)
    for p in ("distilbert/transformer/layer_2/attention/q_lin/kernel", "distilbert/transformer/layer_0/sa_layer_norm/scale",
              "distilbert/transformer/layer_1/ffn/lin2/bias", "distilbert/transformer/layer_1/output_layer_norm/bias",
              "pre_classifier/kernel", "classifier/kernel"):
        assert p in paths, p
    assert not any("token_type" in p for p in paths)


def test_hidden_states_and_heads(case, enc):
    encoder_parity(case, enc["singles"], "sentences")
    encoder_parity(case, enc["pairs"], "pairs")
    heads_parity(case, enc["pairs"])


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_against_peft(case, enc, name):
    fam = distilbert.FAMILY
    configs = {"lora": (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=list(fam.lora_targets)),
                        {"lora_r": 4, "lora_alpha": 8}),
               "ia3": (peft.IA3Config(task_type="SEQ_CLS", target_modules=list(fam.ia3_targets),
                                      feedforward_modules=list(fam.ia3_feedforward)), {}),
               # peft cannot read DistilBERT's shape from its config (dim, n_layers, n_heads): given
               "prompt": (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5, token_dim=48, num_layers=3,
                                                  num_attention_heads=4),
                          {"num_virtual_tokens": 5, "prompt_position": "front"})}
    pc, options = configs[name]
    compare_peft(case, f"{name} vs peft (sequence)", pc, name, options, enc["pairs"])


def test_peft_has_no_default_targets():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA)

    assert "distilbert" not in LORA and "distilbert" not in IA3
    assert distilbert.FAMILY.lora_targets == ("q_lin", "v_lin")


def test_prefix_equals_real_tokens_in_front(case, enc):
    ids = case.tokenizer()(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    prefix_equivalence(case, enc["pairs"], np.asarray(ids, np.int32))


def test_packed_rows(case):
    packing_equivalence(case, SINGLES)


def test_bitfit_terms_fast_compute_and_remat(case, enc):
    built = build(case.model_dir, HEADS["sequence"])
    for term in distilbert.FAMILY.bitfit_terms:
        m = methods.create("bitfit", {"bitfit_terms": term})
        assert masks.count(built.shapes, m.trainable(built.shapes, built.family))[0] > 0, term
    # --compute=fast's kernels are BERT's: DistilBERT runs with cuDNN/XLA attention and XLA's norms
    params = fill(built.shapes, case.torch_model("sequence").state_dict())
    want = apply(built, params, enc["pairs"])
    for comp in (EXACT.replace(attention_impl="pallas", norm_impl="pallas"), EXACT.replace(remat="layer")):
        other = build(case.model_dir, HEADS["sequence"], compute=comp)
        check(FAM, f"attention={comp.attention_impl} norm={comp.norm_impl} remat={comp.remat}",
              apply(other, params, enc["pairs"]), want, atol=2e-5)


@pytest.mark.parametrize("key", cli_params())
def test_cli_trains(case, glue, tmp_path, key):
    cli_run(glue, case.model_dir, tmp_path / "out", key, FAM)
