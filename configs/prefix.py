"""Prefix tuning (Li & Liang 2021): 20 prefix keys/values per layer, reparameterised during
training by an MLP (512 hidden units, tanh) from a 20 x H embedding; the MLP is dropped at export.

Learning rate 1e-4 (Li & Liang used 5e-5..8e-5): with Adam each weight of the MLP's output layer
moves by about the learning rate per step, so every prefix entry moves by roughly lr x (sum of
the 512 |tanh| inputs), ~300 x lr -- at 1e-4 that is P-tuning v2's per-step change at 1e-2. At
5e-3 nothing is learnt in 200 steps. The head trains at its own 1e-2 (at 1e-4 it is slow to
follow). Epochs as P-tuning v2.
"""


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-4, head_learning_rate=1e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=512,
               prefix_dropout=0.0)
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
