"""The frozen base stored as ``--base_dtype`` (bfloat16, int8, nf4): the model computes close to the
float32 base, a method that trains the matrices refuses a quantized base, nf4 names what it cannot
take, and an adapter trained on one base dtype loads on another."""

import json

import jax
import numpy as np
import pytest

from jaxpeft import cli, masks, methods
from jaxpeft.models import quant
from jaxpeft.models.bert import FAMILY as BERT
from jaxpeft.models.bert import BertConfig
from jaxpeft.models.loading import frozen_in_dtype, init_params
from jaxpeft.training import steps

from model_helpers import classifier


def _inputs():
    ids = np.random.default_rng(0).integers(5, 500, (3, 12)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


@pytest.mark.parametrize("dtype,tol", [("bfloat16", 0.03), ("int8", 0.03), ("nf4", 0.25)])
def test_quantized_base_computes_close_to_the_float_base(dtype, tol):
    cfg = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                     vocab_size=600, max_position_embeddings=64)
    m = methods.create("lora")
    module = classifier(cfg, 3, m)
    params = init_params(module, jax.random.key(0))
    trainable, frozen = masks.split(params, m.mask(params, BERT))
    stored = frozen_in_dtype(frozen, dtype, "bert")
    leaves = jax.tree_util.tree_flatten_with_path(stored, is_leaf=lambda x: isinstance(x, quant.QuantizedKernel))[0]
    kernels = [v for kp, v in leaves if masks.path_str(kp).endswith("kernel") and masks.path_str(kp).startswith("bert/")]
    assert kernels and all((isinstance(k, quant.QuantizedKernel) if dtype in ("int8", "nf4") else
                            k.dtype == np.dtype(dtype)) for k in kernels)
    fn = jax.jit(steps.make_predict_step(module))
    ref = np.asarray(fn(trainable, frozen, _inputs()))
    got = np.asarray(fn(trainable, stored, _inputs()))
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    assert quant.nbytes(stored) < quant.nbytes(frozen)
    # gradients reach the trainable part through the quantized matmuls
    loss = lambda t, f: steps.apply_model(module, masks.merge(t, f), _inputs(), True).sum()   # noqa: E731
    g = jax.grad(loss)(trainable, stored)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))


def test_full_fine_tuning_refuses_a_quantized_base(glue, tiny_bert_dir, tmp_path, capsys):
    code = cli.guarded(lambda: cli.train(["--method=full", "--task=rte", f"--model={tiny_bert_dir}",
                                          f"--data_dir={glue}", f"--output_dir={tmp_path / 'o'}", "--base_dtype=int8"]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --base_dtype=int8: --method=full trains the weight matrices")
    assert not (tmp_path / "o").exists()


def test_adapter_of_an_int8_base_loads_on_a_bfloat16_base(glue, tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.train(["--method=bitfit", "--task=sst2", f"--model={tiny_bert_dir}", f"--data_dir={glue}",
                      f"--output_dir={out}", "--base_dtype=int8", "--max_steps=3", "--batch_size=8",
                      "--max_train_examples=32", "--max_eval_examples=16", "--max_seq_length=32", "--no-progress",
                      "--compilation_cache=off", "--compute=exact"]) == 0
    rec = json.loads((out / "adapter" / "adapter_config.json").read_text())["jaxpeft"]
    assert rec["base_dtype"] == "int8"
    from jaxpeft.cli import predict

    capsys.readouterr()
    rows = {}
    for dtype in ("int8", "bfloat16", "float32"):
        assert predict.main([f"--adapter={out / 'adapter'}", "--text=a fine film", "--text=dull",
                             "--compute=exact", f"--base_dtype={dtype}"]) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        rows[dtype] = [dict(kv.split(":") for kv in line.split("\t")[3].split(",")) for line in lines]
    for dtype in ("int8", "bfloat16"):
        for a, b in zip(rows[dtype], rows["float32"]):
            assert all(abs(float(a[k]) - float(b[k])) < 0.02 for k in a)


def test_nf4_names_a_kernel_it_cannot_take(glue, tiny_bert_dir, tmp_path, capsys):
    code = cli.guarded(lambda: cli.train(["--method=lora", "--task=rte", f"--model={tiny_bert_dir}",
                                          f"--data_dir={glue}", f"--output_dir={tmp_path / 'o'}", "--base_dtype=nf4",
                                          "--max_steps=1", "--compute=exact", "--no-progress"]))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --base_dtype=nf4:") and "64" in err
