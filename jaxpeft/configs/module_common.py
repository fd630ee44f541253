"""Per-task schedule shared by the configs of the methods that train small modules in or on the
encoder: BitFit, Frozen, LoRA and Adapters (full fine-tuning has its own, with fewer epochs).

The short-text tasks (SST-2, CoLA) pack several examples into each row (``packing``: one compiled
shape, no padding computed; docs/benchmarks.md has the 3-seed accuracy check); the small sets get
more epochs, the large ones two.
"""

PER_TASK = {
    "sst2": dict(packing=True, num_epochs=2, max_seq_length=64),
    "cola": dict(packing=True, num_epochs=10, max_seq_length=64),
    "mrpc": dict(num_epochs=10),
    "stsb": dict(num_epochs=10),
    "rte": dict(num_epochs=10),
    "wnli": dict(num_epochs=5),
    "qnli": dict(num_epochs=2),
    "qqp": dict(num_epochs=2, eval_every=5000),
    "mnli": dict(num_epochs=2, eval_every=5000),
}


def for_task(cfg: dict, task: str, **per_task: dict) -> dict:
    """``cfg`` (the method's defaults) with the task's schedule applied, then the method's own
    values for that task (``per_task[task]``)."""
    return {"batch_size": 32, "num_epochs": 3, "max_seq_length": 128, "warmup_ratio": 0.06, **cfg,
            **PER_TASK.get(task, {}), **per_task.get(task, {})}
