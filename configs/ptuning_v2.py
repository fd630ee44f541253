"""P-tuning v2 (Liu et al. 2022): deep prompts (20 prefix keys/values per layer), no
reparameterisation, dropout 0.1 on the prefixes.

The reference scripts' RTE recipe on BERT-large is batch 32, lr 1e-2, 20 prefix tokens, 60 epochs,
max length 128; we keep it as is for RTE on the 6-layer, 384-wide bundled model (its prefixes are
12 x smaller: 6 x 2 x 20 x 384 = 92k values instead of 24 x 2 x 20 x 1024 = 983k) and use the
same rate and length for the other tasks with epochs scaled to the dataset size.
"""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prefix_projection=False, prefix_dropout=0.1)
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
