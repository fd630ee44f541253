"""The RoBERTa family (RoBERTa and XLM-R) against transformers and peft, on a tiny random model
with a byte-level BPE tokenizer of RoBERTa's kind (float32, 1e-4):

* the tokenizer: ``<s>``/``</s>`` and pairs ``<s> a </s></s> b </s>``, padding with ``<pad>`` = 1;
* hidden states (sentences and pairs, padded), every head (RoBERTa's classification head,
  token classification, QA) and XLM-R's sequence head;
* LoRA and IA3 with peft's defaults for RoBERTa, prompt tuning in front (peft's placement);
* prefixes: peft cannot run prefix tuning on RoBERTa's classifiers (peft #1865: sequence
  classification; transformers #26578: token classification takes no past keys/values), so the
  check is the equivalence with real tokens in front, against transformers' model and heads;
* positions past the padding id in packed rows; BitFit's terms; short CLI runs of every method.
"""

import jax
import numpy as np
import pytest
import torch

from encoder_family_helpers import (HEADS, PAIRS, PREFIX_TEXT, SINGLES, TINY, Case, apply, bpe_tokenizer, build,
                                    check, cli_params, cli_run, compare_peft, corpus, encode, encoder_parity, fill,
                                    heads_parity, packing_equivalence, prefix_equivalence, quiet,
                                    tokenizer_matches_transformers)
from jaxpeft import masks, methods
from jaxpeft.compute import EXACT
from jaxpeft.errors import UserError
from jaxpeft.models import roberta
from jaxpeft.models.heads import Head

peft = pytest.importorskip("peft")
from transformers import (RobertaConfig, RobertaForQuestionAnswering, RobertaForSequenceClassification,  # noqa: E402
                          RobertaForTokenClassification, XLMRobertaConfig, XLMRobertaForSequenceClassification)

FAM = "roberta"


@pytest.fixture(autouse=True)
def _quiet():
    quiet()


def _save(cls, config_cls, d, glue):
    bpe_tokenizer(d, corpus(glue))
    torch.manual_seed(0)
    cfg = config_cls(vocab_size=600, **TINY, max_position_embeddings=130, type_vocab_size=1, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, num_labels=3, layer_norm_eps=1e-5)
    cls(cfg).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def case(tmp_path_factory, glue):
    d = _save(RobertaForSequenceClassification, RobertaConfig, tmp_path_factory.mktemp("tiny-roberta"), glue)
    return Case(FAM, d, RobertaForSequenceClassification, RobertaForTokenClassification, RobertaForQuestionAnswering,
                "roberta")


@pytest.fixture(scope="module")
def enc(case):
    tok = case.tokenizer()
    return {"singles": encode(tok, SINGLES), "pairs": encode(tok, PAIRS)}


def test_tokenizer_and_pairs(case, glue):
    ours, theirs = tokenizer_matches_transformers(case.model_dir, glue, pad_id=1)
    ids, types, lengths = ours.encode_arrays([["a man"], ["the hat"]], 16)
    assert ids[0, 0] == 0 and list(ids[0, lengths[0] - 1:lengths[0]]) == [2]
    row = ids[0, :lengths[0]].tolist()
    assert row == theirs("a man", "the hat")["input_ids"] and row.count(2) == 3 and row[row.index(2) + 1] == 2
    assert (types == 0).all()


def test_config_positions_past_padding(case):
    built = build(case.model_dir, Head())
    assert built.family is roberta.FAMILY and built.config.position_table_size == 130
    assert built.config.max_position_embeddings == 128          # 130 rows less <pad>'s and the one before
    assert "roberta/embeddings/token_type_embeddings/embedding" in masks.paths(built.shapes)
    ids = jax.numpy.zeros((1, 129), np.int32)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        jax.eval_shape(lambda p: built.module.apply({"params": p}, ids), built.shapes)
    # positions: real tokens from padding_idx + 1 (counting the mask), padding at padding_idx
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(roberta.positions_past_padding(valid, None, 1), [[2, 3, 4, 1, 1], [2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(roberta.positions_past_padding(valid, None, 1, offset=3), [[5, 6, 7, 1, 1],
                                                                                           [5, 6, 7, 8, 9]])


def test_hidden_states_and_heads(case, enc):
    encoder_parity(case, enc["singles"], "sentences")
    encoder_parity(case, enc["pairs"], "pairs")
    heads_parity(case, enc["pairs"])


def test_xlm_roberta_sequence_head(tmp_path, glue, enc):
    d = _save(XLMRobertaForSequenceClassification, XLMRobertaConfig, tmp_path, glue)
    xlmr = Case("xlm-roberta", d, XLMRobertaForSequenceClassification, None, None, "roberta")
    model = xlmr.torch_model("sequence")
    built = build(d, HEADS["sequence"])
    assert built.family is roberta.FAMILY
    with torch.no_grad():
        theirs = model(**{k: torch.tensor(v, dtype=torch.long) for k, v in enc["pairs"].items()
                          if k != "token_type_ids"}).logits.numpy()
    check("xlm-roberta", "sequence head", apply(built, fill(built.shapes, model.state_dict()), enc["pairs"]), theirs)


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt"])
def test_methods_against_peft(case, enc, name):
    """peft's defaults for RoBERTa: LoRA query,value; IA3 key,value,output.dense (feed-forward
    output.dense); prompt tuning in front of <s>, numbered from padding_idx + 1 as transformers
    numbers peft's inputs_embeds."""
    configs = {"lora": (peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8), "lora", {"lora_r": 4, "lora_alpha": 8}),
               "ia3": (peft.IA3Config(task_type="SEQ_CLS"), "ia3", {}),
               "prompt": (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=5), "prompt",
                          {"num_virtual_tokens": 5, "prompt_position": "front"})}
    pc, method, options = configs[name]
    if name != "prompt":
        assert pc.target_modules is None       # peft fills in its own default for the model type
    compare_peft(case, f"{name} vs peft (sequence)", pc, method, options, enc["pairs"])


def test_default_targets_are_pefts():
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as IA3_FF,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3,
                                      TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA)

    fam = roberta.FAMILY
    for t in fam.model_types:
        assert list(fam.lora_targets) == LORA[t]
    assert (list(fam.ia3_targets), list(fam.ia3_feedforward)) == (IA3["roberta"], IA3_FF["roberta"])


def test_prefix_equals_real_tokens_in_front(case, enc):
    """peft's prefix tuning errors on RoBERTa's sequence and token classifiers, so: keys/values of
    real tokens in front, read as a prefix, against transformers on the joined text."""
    tok = case.tokenizer()
    ids = tok(PREFIX_TEXT, add_special_tokens=False)["input_ids"]
    prefix_equivalence(case, enc["pairs"], np.asarray(ids, np.int32))


def test_packed_rows_are_numbered_per_example(case):
    packing_equivalence(case, SINGLES)


def test_bitfit_terms_and_pallas_fallback(case, enc):
    built = build(case.model_dir, Head("sequence", 3))
    for term in roberta.FAMILY.bitfit_terms:
        m = methods.create("bitfit", {"bitfit_terms": term})
        assert masks.count(built.shapes, m.trainable(built.shapes, built.family))[0] > 0, term
    # the fused Pallas kernel cannot take head_dim 12: the encoder falls back instead of refusing
    comp = EXACT.replace(attention_impl="pallas")
    assert roberta.fallback_compute(built.config, comp).attention_impl == "dense"
    fast = build(case.model_dir, Head("sequence", 3), compute=comp)
    params = fill(built.shapes, case.torch_model("sequence").state_dict())
    check(FAM, "attention_impl=pallas (fallback)", apply(fast, params, enc["pairs"]), apply(built, params, enc["pairs"]),
          atol=1e-6)


def test_unsupported_model_type_names_the_families(tmp_path):
    from jaxpeft.models import hf_weights

    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="roberta, xlm-roberta") as e:
        hf_weights.load_config(tmp_path)
    assert "\n" not in str(e.value)


def test_cosine_pooling_is_refused(case, glue, tmp_path, capsys):
    """RoBERTa's pairs carry no token types to split them by: one error line, nothing trained."""
    from jaxpeft import cli

    argv = [f"--model={case.model_dir}", f"--data_dir={glue}", f"--output_dir={tmp_path / 'o'}", "--task=rte",
            "--method=bitfit", "--pooling=cosine", "--compute=exact", "--max_steps=1", "--no-progress"]
    rc = cli.guarded(lambda: cli.train(argv))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "cosine pooling" in lines[0] and "--pooling=cls" in lines[0], lines


def test_config_cosine_pooling_falls_back_to_cls(case, glue, tmp_path, capsys):
    """BitFit's RTE config pools by the cosine of the pair (tuned on BERT-type pairs); on RoBERTa,
    whose pairs carry no token types, the default run trains with ``cls`` instead, says so, and the
    adapter records ``cls``."""
    import json

    from jaxpeft import cli

    out = tmp_path / "o"
    argv = [f"--model={case.model_dir}", f"--data_dir={glue}", f"--output_dir={out}", "--task=rte",
            "--method=bitfit", "--compute=exact", "--max_steps=2", "--max_eval_examples=8", "--no-progress"]
    assert cli.guarded(lambda: cli.train(argv)) == 0
    assert "pooling: cls (the bitfit config's cosine pooling" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["config"]["pooling"] == "cls"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["jaxpeft"]["pooling"] == "cls"


@pytest.mark.parametrize("key", cli_params())
def test_cli_trains(case, glue, tmp_path, key):
    cli_run(glue, case.model_dir, tmp_path / "out", key, FAM)
