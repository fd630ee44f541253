"""BitFit and LoRA on a quantized frozen base: SST-2, RTE and MRPC at each method's config for the
task, the frozen kernels stored as bfloat16, int8 (per-channel scales) or nf4 (blocks of 64),
three seeds each. The targets: int8 within 0.5 points of bfloat16, nf4 within 1 point::

    G=--config=experiments/bitfit_study/config_quant.py
    python -m experiments.bitfit_study.run run   $G --out=runs/quant --data_dir=$GLUE --jobs=6
    python -m experiments.bitfit_study.run table $G --out=runs/quant --doc=docs/results.md --marker=quant-table
"""

TASKS = ("sst2", "rte", "mrpc")


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    s = {f"{m}-{d}": dict(label=f"{m}, {d} base", method=m, options=dict(base_dtype=d))
         for m in ("bitfit", "lora") for d in ("bfloat16", "int8", "nf4")}
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=s)
