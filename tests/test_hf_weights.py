"""Loading HF checkpoints: safetensors, PyTorch .bin, float16 copies, the hub cache, bad folders."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jaxpeft import masks
from jaxpeft.errors import UserError
from jaxpeft.models import hf_weights
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.family import hf_name, name_table
from jaxpeft.models.loading import load_classifier, param_shapes

from model_helpers import classifier


def _flat(params):
    return {k: np.asarray(v) for k, v in masks.flatten(params["bert"]).items()}


@pytest.fixture(scope="module")
def reference(tiny_bert_dir):
    return _flat(load_classifier(str(tiny_bert_dir), 2).params)


def test_names_map_both_ways():
    cfg = BertConfig(hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16,
                     vocab_size=30, max_position_embeddings=16)
    shapes = masks.flatten(param_shapes(classifier(cfg, 2)))
    table = name_table(list(shapes))
    assert len(table) == len(shapes)                        # one name per param
    for name, transposed in [("encoder.layer.3.attention.self.query.weight", True),
                             ("encoder.layer.0.output.LayerNorm.bias", False),
                             ("embeddings.LayerNorm.weight", False),
                             ("embeddings.word_embeddings.weight", False), ("pooler.dense.bias", False)]:
        path, transpose = table["bert." + name]
        assert transpose == transposed, name
        assert hf_name(path) == ("bert." + name, transposed)
    assert table["bert.encoder.layer.3.attention.self.query.weight"][0] == \
        "bert/encoder/layer_3/attention/self/query/kernel"
    # a checkpoint's tensors, with or without the encoder's prefix, in old and new spellings; names
    # of no param (an MLM head, buffers) are skipped
    rng = np.random.default_rng(0)
    sd = {"bert.embeddings.LayerNorm.gamma": rng.normal(size=8), "embeddings.LayerNorm.beta": rng.normal(size=8),
          "encoder.layer.3.attention.self.query.weight": rng.normal(size=(8, 8)),
          "cls.predictions.bias": np.zeros(30), "embeddings.position_ids": np.arange(16)[None]}
    got = hf_weights.convert_state_dict(sd, shapes, "bert")
    assert set(got) == {"bert/embeddings/LayerNorm/scale", "bert/embeddings/LayerNorm/bias",
                        "bert/encoder/layer_3/attention/self/query/kernel"}
    np.testing.assert_array_equal(got["bert/embeddings/LayerNorm/scale"], sd["bert.embeddings.LayerNorm.gamma"])
    np.testing.assert_array_equal(got["bert/embeddings/LayerNorm/bias"], sd["embeddings.LayerNorm.beta"])
    np.testing.assert_array_equal(got["bert/encoder/layer_3/attention/self/query/kernel"],
                                  sd["encoder.layer.3.attention.self.query.weight"].T)


def test_pytorch_bin_and_old_gamma_beta_names(tiny_bert_dir, tmp_path, reference):
    """A bert-base-uncased-style checkpoint: pytorch_model.bin, `bert.` prefix, LayerNorm gamma/beta,
    plus pretraining heads we ignore."""
    from safetensors.torch import load_file

    sd = load_file(str(tiny_bert_dir / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old["bert." + k] = v
    old["cls.predictions.bias"] = torch.zeros(10)
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(old, d / "pytorch_model.bin")
    for f in tiny_bert_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    got = _flat(load_classifier(str(d), 2).params)
    assert got.keys() == reference.keys()
    for k in got:
        np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def test_float16_copy_is_upcast(tiny_bert_dir, tmp_path, reference):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(tiny_bert_dir / "model.safetensors"))
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in sd.items()}
    d = tmp_path / "fp16"
    shutil.copytree(tiny_bert_dir, d)
    save_file(half, str(d / "model.safetensors"))
    got = load_classifier(str(d), 2).params
    flat = _flat(got)
    assert all(v.dtype == np.float32 for v in flat.values())
    for k in flat:
        np.testing.assert_allclose(flat[k], reference[k], atol=2e-3, rtol=2e-3, err_msg=k)


def test_hub_id_resolves_through_the_offline_cache(tiny_bert_dir, tmp_path, monkeypatch, reference):
    """The hub code path (snapshot_download) on a local cache, as after a first online download."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-bert" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_bert_dir, snap)
    (cache / "models--someone--tiny-bert" / "refs").mkdir()
    (cache / "models--someone--tiny-bert" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    d = hf_weights.resolve_model_dir("someone/tiny-bert")
    assert Path(d).resolve() == snap.resolve()
    flat = _flat(load_classifier("someone/tiny-bert", 2).params)
    for k in flat:
        np.testing.assert_array_equal(flat[k], reference[k])


def test_unreachable_hub_id_is_one_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="could not be fetched from the Hugging Face hub"):
        hf_weights.resolve_model_dir("bert-base-uncased")


def test_bundled_aliases(minilm_dir):
    for alias in ("sentence-transformers/all-MiniLM-L6-v2", "minilm"):
        assert hf_weights.resolve_model_dir(alias) == minilm_dir


def test_folder_without_weights(tiny_bert_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", d / "config.json")
    with pytest.raises(UserError, match="holds no weights"):
        load_classifier(str(d), 2)


def test_not_a_bert_and_not_a_folder(tiny_bert_dir, tmp_path):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_bert_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="is a 'gpt2' model; jaxpeft supports these model types: .*bert"):
        load_classifier(str(d), 2)
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        hf_weights.resolve_model_dir(str(f))


def test_checkpoint_of_another_shape_is_rejected(tiny_bert_dir, minilm_dir, tmp_path):
    d = tmp_path / "mixed"
    shutil.copytree(tiny_bert_dir, d)
    shutil.copy(minilm_dir / "model.safetensors", d / "model.safetensors")
    with pytest.raises(UserError, match="has shape"):
        load_classifier(str(d), 2)
