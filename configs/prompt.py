"""Prompt tuning (Lester et al. 2021): 20 virtual tokens initialised from sampled vocabulary rows.

Only ~8k prompt values and the head train, so the learning rate is far above BitFit's: Lester et
al. used 0.3 with Adafactor on T5; with AdamW on a BERT encoder 1e-2..3e-2 is the useful range
(the head trains at the same rate). Prompt tuning converges slowly, hence many epochs; on a
6-layer encoder expect it to stay well below BitFit (see docs/methods.md).
"""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=3e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prompt_init="sample_vocab")
    per_task = {
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
    cfg.update(per_task.get(task, {}))
    return cfg
