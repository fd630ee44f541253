"""BitFit: bias terms + head. BitFit needs a larger learning rate than full fine-tuning
(the paper searched 1e-4..1e-3); small GLUE sets get more epochs. The short-text tasks (SST-2,
CoLA) pack several examples into each row (``packing``: one compiled shape, no padding computed;
docs/benchmarks.md has the accuracy check)."""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-3, batch_size=32, num_epochs=3, max_seq_length=128, warmup_ratio=0.06)
    per_task = {
        "sst2": dict(packing=True, num_epochs=2, max_seq_length=64, learning_rate=3e-3),
        "cola": dict(packing=True, num_epochs=10, max_seq_length=64),
        "mrpc": dict(num_epochs=10),
        "stsb": dict(num_epochs=10),
        "rte": dict(num_epochs=10),
        "wnli": dict(num_epochs=5),
        "qnli": dict(num_epochs=2),
        "qqp": dict(num_epochs=2, eval_every=5000),
        "mnli": dict(num_epochs=2, eval_every=5000),
    }
    cfg.update(per_task.get(task, {}))
    return cfg
