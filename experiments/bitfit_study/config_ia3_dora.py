"""IA3 and DoRA (and rsLoRA) on SST-2 and RTE, each from its method's config for the task, like
``config_defaults.py``, beside the PyTorch peer (peft's ``IA3Config`` and ``LoraConfig(use_dora=True)``
on the same schedule).

IA3's rate is searched on seed 0 (1e-3, 3e-3, 1e-2: its vectors start at one and move by about the
rate per Adam step); the smallest seed selects, the others run at the chosen rate. DoRA and rsLoRA
run at LoRA's config (1e-3, rank 8, alpha 16 on query and value)::

    G=--config=experiments/bitfit_study/config_ia3_dora.py
    python -m experiments.bitfit_study.run run $G --out=runs/ia3_dora --data_dir=$GLUE --jobs=6
    python -m experiments.bitfit_study.run peer $G --out=runs/ia3_dora --data_dir=$GLUE --jobs=6
    python -m experiments.bitfit_study.run table $G --out=runs/ia3_dora --doc=docs/results.md --marker=ia3-dora-table
"""

TASKS = ("sst2", "rte")


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    s = {
        "ia3": dict(method="ia3", learning_rates=(1e-3, 3e-3, 1e-2)),
        "dora": dict(label="lora, use_dora", method="lora", options=dict(use_dora=True)),
        "rslora": dict(label="lora, use_rslora", method="lora", options=dict(use_rslora=True)),
        "lora": dict(method="lora"),
    }
    for name, v in s.items():
        v.setdefault("label", name)
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=s)
