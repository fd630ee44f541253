"""Bottleneck adapters (Houlsby et al. 2019): 64-wide adapters after the attention and the
feed-forward sublayers of every layer; the adapters, the LayerNorms and the head train.

Houlsby et al. searched 3e-5..3e-3 and adapter sizes 8..256 on BERT-large; the adapters start as
the identity (their up-projection at zero), so they need a rate well above full fine-tuning's:
1e-3 on the bundled 6-layer MiniLM. Epochs as BitFit's.
"""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-3, batch_size=32, num_epochs=3, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, adapter_size=64, adapter_type="houlsby")
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
