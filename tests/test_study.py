"""The study driver on a tiny grid on CPU: results files, adapters, resume, tables from the files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxpeft import adapters, analysis, study, study_table

REPO = Path(__file__).resolve().parent.parent

TINY_STUDY = '''
def get_config(task):
    return dict(max_steps=2, batch_size=8, max_seq_length=32, max_train_examples=32,
                max_eval_examples=32, log_every=1, progress=False)

def get_study():
    return dict(tasks=("rte",), seeds=(0, 1),
                settings={"bitfit": dict(label="BitFit", method="bitfit", learning_rates=(1e-3, 1e-2)),
                          "frozen": dict(label="Frozen", method="frozen", learning_rates=(1e-2,))})
'''


def run_study(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, str(REPO / "scripts" / "study.py"), *args], capture_output=True,
                       text=True, env=env, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def tiny_study(tmp_path, glue, tiny_bert_dir):
    cfg = tmp_path / "tiny_study.py"
    cfg.write_text(TINY_STUDY)
    common = [f"--config={cfg}", f"--out={tmp_path / 'out'}", f"--data_dir={glue}", f"--model={tiny_bert_dir}"]
    return tmp_path / "out", common


def test_tiny_study_runs_resumes_and_tabulates(tiny_study, tiny_bert_dir, tmp_path):
    out, common = tiny_study
    rc, stdout, err = run_study("run", *common, "--settings=bitfit", "--jobs=2")
    assert rc == 0, stdout + err
    grid = {lr: json.loads((out / f"rte/bitfit/lr{lr:g}-seed0/results.json").read_text())
            for lr in (1e-3, 1e-2)}
    metric = {lr: r["final_dev"]["accuracy"] for lr, r in grid.items()}
    chosen = 1e-3 if metric[1e-3] >= metric[1e-2] else 1e-2   # ties go to the smaller rate
    assert f"learning rate {chosen:g} chosen on dev" in stdout
    folders = sorted(str(p.relative_to(out)) for p in out.glob("rte/*/*"))
    assert folders == sorted(["rte/bitfit/lr0.001-seed0", "rte/bitfit/lr0.01-seed0",
                              f"rte/bitfit/lr{chosen:g}-seed1"])
    for lr, r in grid.items():
        assert r["config"]["learning_rate"] == lr and r["seed"] == 0 and r["steps"] == 2
        assert r["config"]["model"] == str(tiny_bert_dir)

    # the adapter: exactly the trainable leaves (every bias + the head), moved by training
    adapter = out / f"rte/bitfit/lr{chosen:g}-seed1/adapter"
    cfg, arrays = adapters.read_adapter_config(adapter), adapters.read_adapter_weights(adapter)
    assert {k: cfg[k] for k in ("method", "method_options", "task", "num_labels")} == {
        "method": "bitfit", "method_options": {"bitfit_terms": None}, "task": "rte", "num_labels": 2}
    assert cfg["base_model"] == str(tiny_bert_dir.resolve())
    assert all(k.endswith("/bias") or k == "classifier/kernel" for k in arrays)
    assert {"classifier/kernel", "classifier/bias", "bert/encoder/layer_2/intermediate/dense/bias",
            "bert/embeddings/LayerNorm/bias", "bert/pooler/dense/bias"} <= set(arrays)
    assert all(a.dtype == np.float32 for a in arrays.values())
    change = analysis.analyze([out / f"rte/bitfit/lr{chosen:g}-seed1/adapter"])
    assert change.layers == [0, 1, 2] and np.all(change.values > 0)

    # second invocation: one unfinished run is redone, the finished ones are left alone
    redo = out / "rte/bitfit/lr0.01-seed0"
    (redo / "results.json").unlink()
    keep = {p: p.stat().st_mtime_ns for p in out.glob("rte/bitfit/*/results.json")}
    rc, stdout, err = run_study("run", *common, "--settings=bitfit", "--jobs=2")
    assert rc == 0, stdout + err
    assert "(1 to run)" in stdout and "1 run(s) done, 2 already there, 0 failed" in stdout
    assert (redo / "results.json").exists()
    assert {p: p.stat().st_mtime_ns for p in keep} == keep
    assert json.loads((redo / "results.json").read_text())["final_dev"] == grid[1e-2]["final_dev"]

    # a third invocation with other training options refuses to mix them with the finished runs;
    # options an earlier version wrote differently (remat as a bool, no dropout_bits) are not a difference
    for spec in out.glob("rte/bitfit/*/spec.json"):
        sp = json.loads(spec.read_text())
        sp["config"]["remat"] = False
        sp["config"].pop("dropout_bits")
        spec.write_text(json.dumps(sp))
    rc, _, err = run_study("run", *common, "--settings=bitfit", "--set", "batch_size=4")
    assert rc == 2 and err.strip().startswith("error: 3 finished run(s)") and "batch_size" in err
    assert "remat" not in err and "dropout_bits" not in err

    # the table comes from the files: plant known numbers and read them back
    other = 1e-2 if chosen == 1e-3 else 1e-3
    for rel, value in [(f"lr{chosen:g}-seed0", 0.8), (f"lr{other:g}-seed0", 0.2), (f"lr{chosen:g}-seed1", 0.6)]:
        p = out / "rte/bitfit" / rel / "results.json"
        r = json.loads(p.read_text())
        r["final_dev"]["accuracy"], r["trainable_pct"] = value, 1.23456
        p.write_text(json.dumps(r))
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\nbefore\n{study_table.BEGIN}\nold table\n{study_table.END}\nafter\n")
    rc, stdout, err = run_study("table", *common, f"--doc={doc}")
    assert rc == 0, err
    text = doc.read_text()
    assert text.startswith("# Results\nbefore\n" + study_table.BEGIN)
    assert text.endswith(study_table.END + "\nafter\n")
    assert "old table" not in text
    assert "| BitFit | 1.2346 | 70.0 ± 14.1 | 70.0 |" in text     # mean and sample std of 0.8 and 0.6
    assert "| Frozen | — | — | — |" in text
    assert f"| BitFit | {study_table._lr(chosen)} | **80.0**† |" in text
    assert f"| BitFit | {study_table._lr(other)} | 20.0 |" in text
    assert "(3 results files in" in text
    groups, _ = study_table.collect(out, study.load_study(common[0].split("=", 1)[1]))
    assert study_table.chosen_adapters(groups, ["rte"], "bitfit") == [
        out / f"rte/bitfit/lr{chosen:g}-seed{s}/adapter" for s in (0, 1)]


def test_plan_counts_and_bad_input(tiny_study, glue):
    out, common = tiny_study
    rc, stdout, err = run_study("plan", *common)
    assert rc == 0, err
    # 2 + 1 BitFit runs and 1 + 1 Frozen runs of 2 steps of 8; one eval of 32 dev examples each
    assert "| rte | 2,490 | 3 | 32 | 8 | 2 | 5 | 80 | 160 |" in stdout
    for args, needle in [(["--settings=bitfit,lora"], "unknown setting 'lora'"),
                         (["--tasks=sst3"], "unknown task 'sst3'"),
                         (["--set", "learning_rate=1"], "the study grid decides learning_rate"),
                         (["--set", "batch_sise=4"], "expected KEY=VALUE"),
                         ([f"--data_dir={out}/nope"], "does not exist"),
                         ([f"--model={out}/nomodel"], "neither a local folder nor a hub id")]:
        rc, _, err = run_study("run", *common, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    rc, _, err = run_study("table", *common)
    assert rc == 2 and "does not exist" in err
    assert not out.exists()


def test_lr_choice_and_settings():
    assert study.choose_lr({1e-3: 0.5, 1e-2: 0.7, 1e-4: 0.7}) == 1e-4   # tie: the smaller rate
    assert study.choose_lr({1e-3: float("nan"), 1e-2: 0.1}) == 1e-2
    st = study.load_study()
    assert st.tasks == ("sst2", "cola", "mrpc", "stsb", "rte") and len(st.seeds) >= 3
    assert st.setting_of("bitfit", None) == "bitfit"
    assert st.setting_of("bitfit", "b_m2, query") == "bitfit_qi"
    assert st.setting_of("bitfit", "key,value,attention_output,b_ln1,output,output_layernorm") == "bitfit_no_qi"
    assert st.setting_of("bitfit", "query") is None and st.setting_of("full", None) == "full"
    terms = [t for s in ("bitfit_qi", "bitfit_no_qi") for t in st.settings[s].bitfit_terms.split(",")]
    assert sorted(terms) == sorted(analysis.SYMBOLS)   # the two ablations split the 8 per-layer terms


def test_configs_from_before_hashed_dropout_count_as_random_masks():
    from jaxpeft.config import TrainConfig

    now = TrainConfig().to_dict()
    assert now["dropout_impl"] == "hash"
    old = {k: v for k, v in now.items() if k not in ("dropout_impl", "dropout_bits")}
    assert study._as_current(old)["dropout_impl"] == "random"       # what that version did
    assert study._as_current(old)["dropout_bits"] == 32
    assert study._as_current(now) == now
