"""Method configs that depend on the encoder: P-tuning v2's rate by the width.

The width is read from the model's ``config.json`` (transformers writes it here), and the same rate
reaches the training command, a multi-task run and the study's grid."""

import json
from pathlib import Path

import pytest

from experiments.bitfit_study import study
from jaxpeft import config
from jaxpeft.models import loading


def _config_folder(tmp_path: Path, name: str, **kw) -> Path:
    from transformers import BertConfig, DistilBertConfig

    d = tmp_path / name
    (DistilBertConfig if kw.pop("distil", False) else BertConfig)(**kw).save_pretrained(d)
    return d


@pytest.fixture
def widths(tmp_path):
    return {w: _config_folder(tmp_path, f"bert{w}", hidden_size=w, num_attention_heads=w // 64)
            for w in (384, 768, 1024)}


def test_hidden_size_is_read_from_config_json_alone(tmp_path, widths, minilm_dir):
    for w, d in widths.items():
        assert loading.hidden_size_of(str(d)) == w
    distil = _config_folder(tmp_path, "distil", distil=True, dim=640, n_heads=10, hidden_dim=1280)
    assert json.loads((distil / "config.json").read_text())["dim"] == 640
    assert loading.hidden_size_of(str(distil)) == 640            # DistilBERT names it ``dim``
    assert loading.hidden_size_of("random:base") == 768
    assert loading.hidden_size_of(None) == loading.hidden_size_of(str(minilm_dir)) == 384
    assert loading.hidden_size_of(str(tmp_path / "missing")) is None    # loading says why, later
    assert loading.hidden_size_of("no such/model/name") is None


def test_a_hub_id_reads_its_config_json_only(tmp_path, widths, monkeypatch):
    import huggingface_hub

    asked = []

    def download(repo_id, filename, **kw):
        asked.append((repo_id, filename))
        return str(widths[768] / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert loading.hidden_size_of("someone/some-encoder") == 768
    assert asked == [("someone/some-encoder", "config.json")]

    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert loading.hidden_size_of("someone/some-encoder") is None


@pytest.mark.parametrize("task, narrow, wide", [("mrpc", 3e-2, 1e-2), ("stsb", 3e-2, 1e-2),
                                                ("rte", 1e-2, 3e-3), ("cola", 1e-2, 3e-3), ("sst2", 1e-2, 3e-3)])
def test_ptuning_v2_rate_follows_the_width(widths, task, narrow, wide):
    def lr(**flags):
        return config.build({"method": "ptuning_v2", "task": task, **flags}).optim.learning_rate

    assert lr(model=str(widths[384])) == lr() == narrow         # the bundled MiniLM is 384 wide
    assert lr(model=str(widths[768])) == lr(model=str(widths[1024])) == lr(model="random:base") == wide
    assert lr(model=str(widths[768]), learning_rate=3e-3) == 3e-3   # a rate given wins
    # the other methods' configs read no width
    assert config.build({"method": "bitfit", "task": task, "model": str(widths[768])}).optim.learning_rate == \
        config.build({"method": "bitfit", "task": task}).optim.learning_rate


def test_multitask_and_study_take_the_same_rate(tmp_path, widths, glue):
    cfg = config.build({"method": "ptuning_v2", "tasks": "mrpc,stsb,rte", "model": str(widths[768])})
    per_task = config.task_configs(cfg, ["mrpc", "stsb", "rte"])
    assert [per_task[t]["learning_rate"] for t in ("mrpc", "stsb", "rte")] == [1e-2, 1e-2, 3e-3]
    narrow = config.task_configs(config.build({"method": "ptuning_v2", "tasks": "mrpc,rte"}), ["mrpc", "rte"])
    assert [narrow[t]["learning_rate"] for t in ("mrpc", "rte")] == [3e-2, 1e-2]

    study_file = tmp_path / "s.py"
    study_file.write_text('''
def get_config(task):
    return dict(max_steps=2, progress=False)

def get_study():
    return dict(tasks=("mrpc",), seeds=(0,), method_configs=True,
                settings={"ptuning_v2": dict(method="ptuning_v2")})
''')
    st = study.load_study(study_file)
    for w, rate in ((768, 1e-2), (384, 3e-2)):
        plan = study.Plan(st, tmp_path / f"out{w}", model=str(widths[w]), data_dir=str(glue))
        (run,) = plan.grid_runs(("mrpc", "ptuning_v2"))
        own = config.build({"method": "ptuning_v2", "task": "mrpc", "model": str(widths[w])})
        assert run.learning_rate == plan.config(run).optim.learning_rate == own.optim.learning_rate == rate
