"""The BitFit study driver (experiments/bitfit_study) on a tiny grid on CPU: results files, adapters,
resume, refusal of runs made with other settings, tables from the files."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments.bitfit_study import bias_change, driver, records, study, tables
from jaxpeft import compute, config
from jaxpeft.adapters import folder as adapters
from jaxpeft.errors import UserError

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
    p = subprocess.run([sys.executable, "-m", "experiments.bitfit_study.run", *args], capture_output=True,
                       text=True, env=env, timeout=timeout, cwd=REPO)
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
    folders = sorted(str(p.relative_to(out)) for p in out.glob("rte/*/*") if p.is_dir())
    assert folders == sorted(["rte/bitfit/lr0.001-seed0", "rte/bitfit/lr0.01-seed0",
                              f"rte/bitfit/lr{chosen:g}-seed1"])
    for lr, r in grid.items():
        assert r["config"]["learning_rate"] == lr and r["seed"] == 0 and r["steps"] == 2
        assert r["config"]["model"] == str(tiny_bert_dir)
    # the grid's two runs share one process: the second reuses the first's compiled programs
    assert sorted(r["programs_reused"] for r in grid.values()) == [False, True]

    # the adapter: exactly the trainable leaves (every bias + the head), moved by training
    adapter = out / f"rte/bitfit/lr{chosen:g}-seed1/adapter"
    cfg, arrays = adapters.read_adapter_config(adapter), bias_change.adapter_arrays(adapter)
    assert {k: cfg[k] for k in ("method", "method_options", "task", "num_labels")} == {
        "method": "bitfit", "method_options": {"bitfit_terms": None}, "task": "rte", "num_labels": 2}
    assert cfg["base_model"] == str(tiny_bert_dir.resolve())
    assert all(k.endswith("/bias") or k == "classifier/kernel" for k in arrays)
    assert {"classifier/kernel", "classifier/bias", "bert/encoder/layer_2/intermediate/dense/bias",
            "bert/embeddings/LayerNorm/bias", "bert/pooler/dense/bias"} <= set(arrays)
    assert all(a.dtype == np.float32 for a in arrays.values())
    change = bias_change.analyze([out / f"rte/bitfit/lr{chosen:g}-seed1/adapter"])
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

    # what spec.json records: the run and its settings by flag name, which build the run's config
    sp = json.loads((redo / "spec.json").read_text())
    assert sp["run"] == {"task": "rte", "setting": "bitfit", "learning_rate": 1e-2, "seed": 0}
    assert sp["save_adapter"] is True and sp["config"]["output_dir"] == str(redo)
    assert config.from_flat(sp["config"]).to_flat() == sp["config"]
    log = [json.loads(line) for line in (out / "driver.jsonl").read_text().splitlines()]
    assert [r["wall_seconds"] > 0 for r in log if r["event"] == "done"] == [True] * 4

    # a third invocation with other training options refuses to mix them with the finished runs
    rc, _, err = run_study("run", *common, "--settings=bitfit", "--set", "max_seq_length=16", "--set", "dtype=bfloat16")
    assert rc == 2 and err.strip().startswith("error: 3 finished run(s)"), err
    assert "differs in max_seq_length, dtype)" in err

    # so does one after settings written by the version before the grouped config (compute options
    # as explicit values, remat as a bool, no dropout_bits, every method's options), read in today's terms
    for spec in out.glob("rte/bitfit/*/spec.json"):
        sp = json.loads(spec.read_text())
        sp["config"] = as_written_before_grouped_config(sp["config"])
        spec.write_text(json.dumps(sp))
    st = study.load_study(common[0].split("=", 1)[1]).select(settings=["bitfit"])
    study.Plan(st, out, model=str(tiny_bert_dir), data_dir=common[2].split("=", 1)[1]).check_not_stale()
    rc, _, err = run_study("run", *common, "--settings=bitfit", "--set", "batch_size=4")
    assert rc == 2 and err.strip().startswith("error: 3 finished run(s)") and "batch_size" in err
    for other in ("remat", "dropout_bits", "prng_impl", "activation_impl", "num_virtual_tokens"):
        assert other not in err

    # the table comes from the files: plant known numbers and read them back
    other = 1e-2 if chosen == 1e-3 else 1e-3
    for rel, value in [(f"lr{chosen:g}-seed0", 0.8), (f"lr{other:g}-seed0", 0.2), (f"lr{chosen:g}-seed1", 0.6)]:
        p = out / "rte/bitfit" / rel / "results.json"
        r = json.loads(p.read_text())
        r["final_dev"]["accuracy"], r["trainable_pct"] = value, 1.23456
        p.write_text(json.dumps(r))
    doc = tmp_path / "results.md"
    begin, end = tables.markers()
    other_begin, other_end = tables.markers("defaults-table")
    doc.write_text(f"# Results\nbefore\n{begin}\nold table\n{end}\n{other_begin}\nkept\n{other_end}\nafter\n")
    rc, stdout, err = run_study("table", *common, f"--doc={doc}", f"--figures={tmp_path / 'img/curves'}")
    assert rc == 0, err
    text = doc.read_text()
    assert text.startswith("# Results\nbefore\n" + begin)
    assert text.endswith(f"{end}\n{other_begin}\nkept\n{other_end}\nafter\n")   # only its own markers
    assert f"wrote {tmp_path / 'img/curves_rte.png'}" in stdout and (tmp_path / "img/curves_rte.png").stat().st_size
    assert "old table" not in text
    assert "| BitFit | 1.2346 | 70.0 ± 14.1 | 70.0 |" in text     # mean and sample std of 0.8 and 0.6
    assert "| Frozen | — | — | — |" in text
    assert f"| BitFit | {tables._lr(chosen)} | **80.0**† |" in text
    assert f"| BitFit | {tables._lr(other)} | 20.0 |" in text
    assert "(3 results files in" in text
    groups, _ = tables.collect(out, study.load_study(common[0].split("=", 1)[1]))
    assert tables.chosen_adapters(groups, ["rte"], "bitfit") == [
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
                         (["--set", "warmup_ratio=2"], "--warmup_ratio=2.0: must be in [0, 1]"),
                         (["--set", "prompt_init=text"], "--prompt_init is not an option of --method=bitfit"),
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
    assert sorted(terms) == sorted(bias_change.SYMBOLS)   # the two ablations split the 8 per-layer terms


def as_written_before_grouped_config(flat):
    """A run's settings as the version before the grouped config recorded them: every compute
    option as an explicit value (float32, dense attention, hashed dropout; remat still a bool,
    dropout_bits not yet there, the dropout RNG ``auto``), the options of every method, and none of
    the settings added since."""
    added = ("compute", "packing", "pooling", "modules_to_save", "plot", "steps_per_dispatch", "compilation_cache")
    old = {k: v for k, v in flat.items() if k not in added and k not in compute.fields()}
    old.update(dtype="float32", attention_impl="dense", remat=False, dropout_impl="hash", norm_impl="xla",
               activation_impl="xla", prng_impl="auto", num_virtual_tokens=20, prompt_init="random",
               encoder_type="lstm", prefix_projection=None)
    return old


def test_finished_runs_compare_by_settings_and_by_compute_as_resolved_where_they_ran():
    cfg = config.from_flat({"method": "bitfit", "bitfit_terms": None, "dtype": "float32", "learning_rate": 1e-3,
                            "output_dir": "runs/x"})
    flat = cfg.to_flat()
    like = lambda **kw: config.from_flat({**flat, **kw})  # noqa: E731
    cpu = {"devices": "1x cpu", "compute": cfg.resolve_compute(platform="cpu", num_devices=1).to_dict()}
    gpu = {"devices": "1x NVIDIA H200",
           "compute": cfg.resolve_compute(platform="gpu", num_devices=1, nvidia=True).to_dict()}
    assert records.differences(flat, cpu, cfg) == [] and records.differences(flat, gpu, cfg) == []
    assert records.differences(flat, cpu, like(output_dir="elsewhere", progress=False)) == []
    assert records.differences(flat, cpu, like(learning_rate=3e-3, max_steps=7)) == ["learning_rate", "max_steps"]
    assert records.differences(flat, cpu, like(dtype="bfloat16")) == ["dtype"]
    # auto and exact compute alike on a CPU, not on a GPU (speed-only fields are not compared)
    assert records.differences(flat, cpu, like(compute="exact")) == []
    assert records.differences(flat, gpu, like(compute="exact")) == ["attention_impl", "prng_impl"]
    assert records.differences(None, cpu, cfg) is None
    assert records.differences(flat, {}, cfg) == ["compute"]   # where it ran is not known

    # the version before the grouped config: a record without dropout_impl used random masks,
    # prng_impl=auto was threefry2x32 on a CPU and rbg on a GPU, and its GPU runs used dense attention
    old = as_written_before_grouped_config(flat)
    assert records.differences(old, {"devices": "1x cpu"}, cfg) == []
    assert records.differences({**old, "dropout_bits": 32}, {"devices": "1x cpu"}, cfg) == []
    assert records.differences({**old, "dropout_bits": 16}, {"devices": "1x cpu"}, cfg) == ["dropout_bits"]
    no_impl = {k: v for k, v in old.items() if k != "dropout_impl"}
    assert records.differences(no_impl, {"devices": "1x cpu"}, cfg) == ["dropout_impl"]
    assert records.differences(no_impl, {"devices": "1x cpu"}, like(dropout_impl="random")) == []
    assert records.differences(old, {"devices": "1x NVIDIA H200"}, cfg) == ["attention_impl"]
    assert records.differences(old, {"devices": "1x NVIDIA H200"}, like(attention_impl="dense")) == []
    assert records.legacy({**old, "remat": True}, ("gpu", 1, True))[1]["remat"] == "layer"
    assert records.platform_of("4x TPU v4") == ("tpu", 4, False) and records.platform_of("?") is None


def test_set_values_are_typed_by_their_setting():
    assert study.parse_overrides(["max_steps=3", "--dtype=bfloat16", "progress=0", "warmup_ratio=0.1",
                                  "head_learning_rate=none", "num_virtual_tokens=5", "compute=exact"]) == {
        "max_steps": 3, "dtype": "bfloat16", "progress": False, "warmup_ratio": 0.1,
        "head_learning_rate": None, "num_virtual_tokens": 5, "compute": "exact"}
    for item, needle in [("batch_sise=4", "expected KEY=VALUE"), ("max_steps", "expected KEY=VALUE"),
                         ("seed=3", "the study grid decides seed"), ("data_dir=x", "use the study's --data_dir"),
                         ("max_steps=three", "invalid literal"), ("progress=maybe", "expected a boolean")]:
        with pytest.raises(UserError, match=needle):
            study.parse_overrides([item])


def test_peer_repeats_the_chosen_runs_and_is_tabulated(tiny_study, tmp_path):
    out, common = tiny_study
    rc, stdout, err = run_study("run", *common, "--settings=frozen", "--seeds=0")
    assert rc == 0, stdout + err
    rc, stdout, err = run_study("peer", *common, "--settings=frozen", "--jobs=2")
    assert rc == 0, stdout + err
    peer = json.loads((out / "rte/frozen/peer-lr0.01-seed0.json").read_text())
    ours = json.loads((out / "rte/frozen/lr0.01-seed0/results.json").read_text())
    # the same config: rate, steps, evaluation set, seed
    assert (peer["args"]["learning_rate"], peer["steps"], peer["args"]["max_eval_examples"], peer["seed"]) == \
        (0.01, ours["steps"], 32, 0)
    assert peer["trainable_params"] == ours["trainable_params"]
    rc, stdout, err = run_study("peer", *common, "--settings=frozen")   # nothing left to repeat
    assert rc == 0 and "peer: 0 run(s) to repeat" in stdout, stdout + err
    rc, stdout, err = run_study("table", *common, "--settings=frozen", "--seeds=0")
    assert rc == 0, err
    a, b = ours["final_dev"]["accuracy"], peer["final_dev"]["accuracy"]
    assert f"| Frozen | {100 * a:.1f} / {100 * b:.1f} ({100 * (a - b):+.1f}) |" in stdout


def test_a_study_of_the_method_configs_runs_each_at_its_configs_rate(tmp_path, glue, tiny_bert_dir):
    cfg = tmp_path / "defaults.py"
    cfg.write_text('''
def get_config(task):
    return dict(max_steps=2, progress=False)

def get_study():
    return dict(tasks=("rte", "sst2"), seeds=(0, 1), method_configs=True,
                settings={"prefix": dict(method="prefix"),
                          "bitfit_qi": dict(method="bitfit", bitfit_terms="query,intermediate"),
                          "lora": dict(method="lora", learning_rates=(1e-4,))})
''')
    st = study.load_study(cfg)
    plan = study.Plan(st, tmp_path / "out", model=str(tiny_bert_dir), data_dir=str(glue))
    for task in ("rte", "sst2"):
        for setting, method, options in [("prefix", "prefix", {}),
                                         ("bitfit_qi", "bitfit", {"bitfit_terms": "query,intermediate"})]:
            (run,) = plan.grid_runs((task, setting))
            own = config.build({"method": method, "task": task, **options})   # jaxpeft-train's defaults
            got = plan.config(run)
            assert run.learning_rate == own.optim.learning_rate == got.optim.learning_rate
            assert got.optim.max_steps == 2 and got.optim.seed == 0   # get_config's, then the grid's
            assert got.optim == dataclasses.replace(own.optim, max_steps=2)
            assert got.data == dataclasses.replace(own.data, data_dir=str(Path(glue).resolve())) and got.head == own.head
            assert got.method_obj() == own.method_obj()
            assert got.optim.head_learning_rate == own.optim.head_learning_rate
    assert [r.learning_rate for r in plan.grid_runs(("rte", "lora"))] == [1e-4]   # its own grid
    assert plan.config(plan.grid_runs(("rte", "lora"))[0]).optim.num_epochs == \
        config.build({"method": "lora", "task": "rte"}).optim.num_epochs
    # one rate per group: nothing to choose, so the seeds join the grid run and the peer need not wait
    assert plan.known_lr(("rte", "lora")) == 1e-4
    peers = driver.peer_runs(plan)
    assert {(r.task, r.setting, r.seed) for r in peers} == \
        {(t, s, 0) for t in ("rte", "sst2") for s in ("prefix", "bitfit_qi", "lora")}
    assert [plan.cost(r) for r in peers] == sorted((plan.cost(r) for r in peers), reverse=True)
    grid = study.Plan(study.load_study(study.DEFAULT_STUDY), tmp_path / "grid", model=str(tiny_bert_dir),
                      data_dir=str(glue))
    assert grid.known_lr(("rte", "bitfit")) is None and driver.peer_runs(grid) == []


def test_settings_may_fix_other_options_and_are_told_apart_by_their_folder(tmp_path, glue, tiny_bert_dir):
    cfg = tmp_path / "search.py"
    cfg.write_text('''
def get_config(task):
    return dict(max_steps=2, progress=False, pooling="cls")

def get_study():
    return dict(tasks=("rte",), seeds=(0,), method_configs=True,
                settings={"frozen": dict(method="frozen"),
                          "frozen_mean": dict(method="frozen", options=dict(pooling="mean", num_epochs=3),
                                              learning_rates=(1e-3, 1e-2))})
''')
    st = study.load_study(cfg)
    plan = study.Plan(st, tmp_path / "out", model=str(tiny_bert_dir), data_dir=str(glue))
    (plain,) = plan.grid_runs(("rte", "frozen"))
    mean = plan.grid_runs(("rte", "frozen_mean"))
    assert [r.learning_rate for r in mean] == [1e-3, 1e-2]
    assert plan.config(plain).head.pooling == "cls"
    assert plan.config(plain).optim.num_epochs == config.build({"method": "frozen", "task": "rte"}).optim.num_epochs
    got = plan.config(mean[0])
    assert got.head.pooling == "mean" and got.optim.num_epochs == 3   # over get_config(task)
    # both settings train "frozen": a results file is read as the setting of the folder it is in
    assert st.setting_at("frozen_mean", "frozen", None) == "frozen_mean"
    assert st.setting_at("frozen", "frozen", None) == "frozen"
    assert st.setting_at("elsewhere", "frozen", None) == "frozen"
    assert st.setting_at("frozen_mean", "bitfit", None) is None
    bad = tmp_path / "bad.py"
    bad.write_text(cfg.read_text().replace('pooling="mean"', 'learning_rate=1.0'))
    with pytest.raises(UserError, match="'learning_rate' is not an option a setting may fix"):
        study.load_study(bad)
    bad.write_text(cfg.read_text().replace('pooling="mean"', 'no_such_option=1'))
    with pytest.raises(UserError, match="'no_such_option'"):
        study.load_study(bad)


#: every GLUE study config (config_tasks reads other data folders: test_peer covers its tasks)
GLUE_CONFIGS = sorted(p.stem for p in Path(study.__file__).parent.glob("config*.py") if p.stem != "config_tasks")


@pytest.mark.parametrize("name", GLUE_CONFIGS)
def test_every_shipped_study_config_builds_every_run(name, glue, tmp_path):
    """Each setting's options are flags with valid values (a typo fails the plan, before any run)."""
    st = study.load_study(Path(study.__file__).parent / f"{name}.py")
    plan = study.Plan(st, tmp_path / "out", data_dir=str(glue))
    runs = [r for g in plan.groups() for r in plan.grid_runs(g)]
    assert runs and all(plan.config(r).task == r.task for r in runs)


def test_the_configs_the_follow_up_changed_resolve_as_documented():
    cfg = config.build({"method": "adapter", "task": "cola"})
    assert cfg.head.pooling == "mean" and cfg.optim.learning_rate == 1e-3 and cfg.compute == "auto"
    assert config.build({"method": "adapter", "task": "sst2"}).head.pooling == "cls"
    assert config.build({"method": "lora", "task": "mrpc"}).compute == "exact"
    assert config.build({"method": "lora", "task": "sst2"}).compute == "auto"
    for method, lr in (("prompt", 3e-2), ("ptuning", 1e-3)):
        rte = config.build({"method": method, "task": "rte"})
        assert (rte.head.pooling, rte.optim.learning_rate, rte.optim.head_learning_rate) == ("cosine", lr, 1e-2)


def test_the_pair_tasks_read_the_cosine_where_the_measurements_chose_it():
    """docs/results.md, "The cosine read-out": each (method, pair task) below reads the cosine of the
    two sentences encoded apart; the others keep their read-out."""
    cosine = {"frozen": ("stsb", "rte"), "prompt": ("stsb", "mrpc", "rte"), "ptuning": ("stsb", "mrpc", "rte"),
              "bitfit": ("rte",), "ptuning_v2": ("rte",)}
    for method in ("full", "frozen", "bitfit", "lora", "adapter", "prompt", "ptuning", "prefix", "ptuning_v2"):
        for task in ("sst2", "cola", "mrpc", "stsb", "rte"):
            cfg = config.build({"method": method, "task": task})
            assert (cfg.head.pooling == "cosine") == (task in cosine.get(method, ())), (method, task)
            assert not (cfg.head.pooling == "cosine" and cfg.data.packing), (method, task)
    assert config.build({"method": "ptuning", "task": "stsb"}).optim.learning_rate == 3e-4
    assert config.build({"method": "prefix", "task": "rte"}).head.pooling == "mean"
    assert config.build({"method": "prompt", "task": "rte", "pooling": "cls"}).head.pooling == "cls"
    # the command line still wins over the method's config
    assert config.build({"method": "lora", "task": "mrpc", "compute": "auto"}).compute == "auto"


def test_multi_task_runs_take_neither_packing_nor_the_cosine_from_the_first_tasks_config():
    cfg = config.build({"method": "prompt", "tasks": "rte,mrpc"})
    assert cfg.head.pooling == "cls" and cfg.method_options == {"prompt_init": "sample_vocab"}   # the rest stays
    own = config.task_configs(cfg, ["rte", "mrpc"])      # each task's head rate is its own config's
    assert own["rte"]["head_learning_rate"] == 1e-2 and own["mrpc"]["head_learning_rate"] is None
    assert config.build({"method": "bitfit", "tasks": "sst2,rte"}).data.packing is False
    assert config.build({"method": "prompt", "task": "rte"}).head.pooling == "cosine"
