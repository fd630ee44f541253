"""Bad input to scripts/train.py: one line naming the problem, exit status 2, nothing lost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_train(*args, cwd=None, env=None):
    e = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    e.pop("GLUE_DIR", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], capture_output=True,
                       text=True, cwd=cwd, env=e, timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def out_with_previous_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"previous": True}))
    return out


CASES = {
    "unknown method": (["--method=loraa"], ["unknown method 'loraa'", "bitfit"]),
    "option of another method": (["--method=bitfit", "--prompt_init=text"],
                                 ["--prompt_init is not an option of --method=bitfit", "--bitfit_terms"]),
    "value out of range": (["--learning_rate=-1"], ["--learning_rate=-1.0: must be > 0"]),
    "warmup out of range": (["--warmup_ratio=1.5"], ["--warmup_ratio=1.5: must be in [0, 1]"]),
    "unknown compute preset": (["--compute=fastest"], ["--compute=fastest: choose one of auto, exact, fast"]),
    "pallas off gpu": (["--attention_impl=pallas"], ["--attention_impl=pallas is a Triton kernel", "cpu"]),
    "fast preset off gpu": (["--compute=fast"], ["Triton kernel for NVIDIA GPUs"]),
    "unknown task": (["--task=sst3"], ["unknown task 'sst3'"]),
    "length bucket not a length": (["--length_buckets=64,long"], ["--length_buckets=64,long: must be auto, all"]),
    "length bucket too long": (["--length_buckets=64,256"],
                               ["--length_buckets=64,256: 256 is longer than --max_seq_length="]),
    "unknown term": (["--bitfit_terms=query,biass"], ["unknown BitFit term 'biass'"]),
    "missing data folder": (["--data_dir={tmp}/nope"], ["does not exist"]),
    "missing split": (["--task=qnli"], ["QNLI/train.tsv not found"]),
    "config file missing": (["--config={tmp}/none.py"], ["config file", "not found"]),
    "cosine on one sentence": (["--task=sst2", "--pooling=cosine"],
                               ["--pooling=cosine compares the two sentences of a pair; sst2 has one"]),
    "cosine packed": (["--task=rte", "--pooling=cosine", "--packing"], ["--packing", "--pooling=cosine",
                                                                         "--no-packing"]),
    "length buckets multi-task": (["--tasks=rte,mrpc", "--method=lora", "--length_buckets=64"],
                                  ["--tasks: --length_buckets=64 is not supported in multi-task runs"]),
    "cosine multi-task": (["--tasks=rte,mrpc", "--method=lora", "--pooling=cosine"],
                          ["--pooling=cosine is not supported in multi-task runs"]),
    "lora target naming no layer": (["--method=lora", "--target_modules=query,quer"],
                                    ["--target_modules=query,quer: 'quer' names none of the model's dense layers"]),
    "ia3 feed-forward not a target": (["--method=ia3", "--target_modules=key,value",
                                       "--feedforward_modules=output.dense"],
                                      ["--feedforward_modules=output.dense: must be some of",
                                       "--target_modules=key,value"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line(name, glue, tmp_path, out_with_previous_run):
    args, needles = CASES[name]
    args = [a.format(tmp=tmp_path) for a in args]
    rc, _, err = run_train(f"--data_dir={glue}", *args, f"--output_dir={out_with_previous_run}")
    assert_one_line_error(rc, err, *needles)
    assert json.loads((out_with_previous_run / "results.json").read_text()) == {"previous": True}
    assert sorted(p.name for p in out_with_previous_run.iterdir()) == ["results.json"]


def test_malformed_row(tmp_path):
    d = tmp_path / "glue" / "RTE"
    d.mkdir(parents=True)
    (d / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\n")
    (d / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    rc, _, err = run_train("--task=rte", f"--data_dir={tmp_path / 'glue'}", f"--output_dir={tmp_path}/o")
    assert_one_line_error(rc, err, "train.tsv:3: malformed row")
    assert not (tmp_path / "o").exists()


def test_model_without_weights_and_output_dir_that_is_a_file(glue, tmp_path, tiny_bert_dir):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    rc, _, err = run_train("--task=rte", f"--data_dir={glue}", f"--model={m}", f"--output_dir={tmp_path}/o")
    assert_one_line_error(rc, err, "holds no weights")
    f = tmp_path / "file"
    f.write_text("keep me")
    rc, _, err = run_train("--task=rte", f"--data_dir={glue}", f"--output_dir={f}")
    assert_one_line_error(rc, err, "is a file")
    assert f.read_text() == "keep me"


def test_unknown_flag_is_rejected_by_argparse():
    rc, _, err = run_train("--learning_rte=3")
    assert rc == 2 and "unrecognized arguments: --learning_rte=3" in err


def test_every_method_has_a_shipped_config_and_a_flag_per_option():
    from jaxpeft import config, methods

    for name, cls in methods.REGISTRY.items():
        assert config.method_config_file(name).is_file(), name
        for task in ("sst2", "cola", "mrpc", "stsb", "rte"):
            cfg = config.build({"method": name, "task": task})
            assert cfg.method == name and cfg.optim.learning_rate > 0
    flags = {a.dest for a in config.make_parser()._actions}
    assert methods.all_options() <= flags
    assert {"learning_rate", "packing", "compute", "dtype", "attention_impl", "pooling"} <= flags
