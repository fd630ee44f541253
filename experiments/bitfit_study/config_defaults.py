"""Every method's defaults on the five GLUE tasks, three seeds each, and the PyTorch peer beside them.

Each run starts from its method's own config for the task (``jaxpeft/configs/<method>.py``: what
``jaxpeft-train --method=M --task=T`` does with no other flag) at that config's learning rate; the
BitFit study (``config.py``) is where the learning rates are searched. ``run.py peer`` then repeats
each method and task with the PyTorch peer (``benchmarks/peft_job.py``: transformers + peft, the
same config) and ``run.py table`` sets the two side by side::

    python -m experiments.bitfit_study.run run   --config=experiments/bitfit_study/config_defaults.py --data_dir=$GLUE --jobs=8
    python -m experiments.bitfit_study.run peer  --config=experiments/bitfit_study/config_defaults.py --data_dir=$GLUE --jobs=12
    python -m experiments.bitfit_study.run table --config=experiments/bitfit_study/config_defaults.py
"""

TASKS = ("sst2", "cola", "mrpc", "stsb", "rte")


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    methods = ("full", "frozen", "bitfit", "lora", "adapter", "prompt", "ptuning", "prefix", "ptuning_v2")
    settings = {m: dict(label=m, method=m) for m in methods}
    settings["bitfit_qi"] = dict(label="bitfit (b_q + b_m2)", method="bitfit", bitfit_terms="query,intermediate")
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=settings)
