"""The prompt methods end to end: tiny runs of the real loop on the bundled model (trainable counts
in results.json), and bad input through scripts/train.py (one line, exit 2, nothing written)."""

import json

import pytest

from jaxpeft import config, masks
from jaxpeft.training import loop, single

from masked_step import assert_only_masked_leaves_changed
from test_cli import assert_one_line_error, run_train

H, LAYERS, HEAD = 384, 6, 384 * 2 + 2          # MiniLM-L6: hidden 384, 6 layers; 2-class head


def _lstm_layer(inputs, units):                  # one direction of an OptimizedLSTMCell layer
    return 4 * (inputs * units + units * units + units)


EXPECTED_METHOD_PARAMS = {
    "prompt": 20 * H,
    "ptuning": 20 * H + 2 * (_lstm_layer(H, H // 2) + _lstm_layer(H, H // 2)) + 2 * (H * H + H),
    "prefix": 20 * H + (H * 512 + 512) + (512 * LAYERS * 2 * H + LAYERS * 2 * H),
    "ptuning_v2": 2 * LAYERS * 20 * H,
}


@pytest.mark.parametrize("method,task", [("prompt", "sst2"), ("ptuning", "sst2"), ("prefix", "sst2"),
                                         ("ptuning_v2", "rte")])
def test_tiny_run_records_trainable_counts(method, task, glue, tmp_path):
    cfg = config.build(dict(method=method, task=task, data_dir=str(glue), output_dir=str(tmp_path),
                            max_steps=3, batch_size=8, max_seq_length=16, max_train_examples=48,
                            max_eval_examples=16, log_every=1, progress=False))
    lines = []
    job = single.SingleTask(cfg, echo=lines.append)
    res = loop.run(job)
    # the real loop: prompt (or its encoder) and head moved, the encoder is bit-identical
    after = masks.merge(job.final_state.trainable, job.frozen)
    assert_only_masked_leaves_changed(job.params, after, job.mask)
    assert all(p.startswith(("prompt/", "classifier/")) for p in masks.trainable_paths(job.mask))
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["steps"] == 3 and on_disk["method"] == method
    head = HEAD if cfg.head.pooling != "cosine" else 2 * 1 + 2     # the cosine read-out: one input
    assert (cfg.head.pooling == "cosine") == (task == "rte")          # RTE's P-tuning v2 config reads it
    assert on_disk["trainable_params"] == EXPECTED_METHOD_PARAMS[method] + head
    assert on_disk["trainable_pct"] == pytest.approx(100 * on_disk["trainable_params"] / on_disk["total_params"])
    assert on_disk["method_options"]["num_virtual_tokens"] == 20
    assert f"trainable params: {on_disk['trainable_params']:,}" in lines[0]
    assert 0.0 <= res["final_dev"]["accuracy"] <= 1.0


CASES = {
    "too many virtual tokens": (["--method=prompt", "--num_virtual_tokens=400", "--max_seq_length=128"],
                                ["400 virtual tokens", "max_position_embeddings=512"]),
    "unknown prompt init": (["--method=prompt", "--prompt_init=vocab"],
                            ["--prompt_init=vocab: choose one of random, sample_vocab, text"]),
    "text init without text": (["--method=prompt", "--prompt_init=text"], ["--prompt_init_text"]),
    "unknown encoder": (["--method=ptuning", "--encoder_type=gru"], ["--encoder_type=gru: choose one of"]),
    "bad prefix dropout": (["--method=ptuning_v2", "--prefix_dropout=1.5"], ["--prefix_dropout=1.5: must be in [0, 1)"]),
    "prompt init of prompt tuning": (["--method=ptuning", "--prompt_init=text"],
                                     ["--prompt_init is not an option of --method=ptuning"]),
    "packing with input prompts": (["--method=prompt", "--packing"], ["--packing", "--method=prompt"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_prompt_options_are_one_clear_line(name, glue, tmp_path):
    args, needles = CASES[name]
    out = tmp_path / "out"
    rc, _, err = run_train("--task=rte", f"--data_dir={glue}", *args, f"--output_dir={out}")
    assert_one_line_error(rc, err, *needles)
    assert not out.exists()
