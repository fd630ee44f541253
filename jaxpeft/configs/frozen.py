"""Frozen (head only): a linear classifier on the frozen encoder's pooled [CLS]. Only ~800
values train, so the rate is high: 1e-2 was the best of 1e-3 / 3e-3 / 1e-2 in the SST-2 study
(docs/results.md)."""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-2, batch_size=32, num_epochs=3, max_seq_length=128, warmup_ratio=0.06)
    per_task = {
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
    cfg.update(per_task.get(task, {}))
    return cfg
