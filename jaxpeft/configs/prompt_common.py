"""Per-task schedule shared by the prompt-method configs (prompt, ptuning, prefix, ptuning_v2).

Prompt methods converge slowly: 10 epochs on SST-2 and the large tasks' few epochs, 40-60 on the
small sets, as in the P-tuning v2 reference scripts.
"""

PER_TASK = {
    "sst2": dict(max_seq_length=64, eval_every=2000),
    "cola": dict(num_epochs=40, max_seq_length=64),
    "mrpc": dict(num_epochs=40),
    "stsb": dict(num_epochs=40),
    "rte": dict(num_epochs=60),
    "wnli": dict(num_epochs=20),
    "qnli": dict(num_epochs=5, eval_every=5000),
    "qqp": dict(num_epochs=5, eval_every=10000),
    "mnli": dict(num_epochs=5, eval_every=10000),
}


def for_task(cfg: dict, task: str, **per_task: dict) -> dict:
    """``cfg`` (the method's defaults, 10 epochs) with the task's schedule applied, then the method's
    own values for that task (``per_task[task]``)."""
    return {"num_epochs": 10, "max_seq_length": 128, **cfg, **PER_TASK.get(task, {}), **per_task.get(task, {})}
