"""The source document's BitFit claims at base size, on ``all-mpnet-base-v2`` (MPNet, 12 layers,
hidden 768, 110M; ``bash scripts/setup.sh mpnet`` makes ``models/all-mpnet-base-v2``): on the small
GLUE tasks, BitFit close to full fine-tuning and far above Frozen, with LoRA, bottleneck adapters
and P-tuning v2 beside them, each at its method's config for the task, and the PyTorch peer on the
same configuration. A CPU study (the model is too large to carry to a GPU machine)::

    G=--config=experiments/bitfit_study/config_mpnet.py
    M=--model=models/all-mpnet-base-v2
    python -m experiments.bitfit_study.run plan  $G $M --out=runs/mpnet --data_dir=$GLUE
    python -m experiments.bitfit_study.run run   $G $M --out=runs/mpnet --data_dir=$GLUE --jobs=1
    python -m experiments.bitfit_study.run peer  $G $M --out=runs/mpnet --data_dir=$GLUE --jobs=1
    python -m experiments.bitfit_study.run table $G --out=runs/mpnet --doc=docs/results.md --marker=mpnet-table
"""

TASKS = ("rte", "mrpc", "stsb", "cola")


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=50)


def get_study() -> dict:
    s = {m: dict(method=m) for m in ("full", "frozen", "bitfit", "lora", "bottleneck", "ptuning_v2")}
    # the search that set P-tuning v2's rates for encoders 768 wide (jaxpeft/configs/ptuning_v2.py):
    # MiniLM's 3e-2 (MRPC, STS-B) and 1e-2 (RTE, CoLA) collapsed on MPNet; one step lower trained
    s["ptuning_v2_1e-2"] = dict(method="ptuning_v2", learning_rates=(1e-2,), label="ptuning_v2 at 1e-2")
    s["ptuning_v2_3e-3"] = dict(method="ptuning_v2", learning_rates=(3e-3,), label="ptuning_v2 at 3e-3")
    for name, v in s.items():
        v.setdefault("label", name)
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=s)
