"""Prompt tuning (Lester et al. 2021): 20 virtual tokens initialised from sampled vocabulary rows.

Only ~8k prompt values and the head train, so the learning rate is far above BitFit's: Lester et
al. used 0.3 with Adafactor on T5; with AdamW on a BERT encoder 1e-2..3e-2 is the useful range
(the head trains at the same rate). Prompt tuning converges slowly, hence many epochs; on a
6-layer encoder expect it to stay well below BitFit (see docs/methods.md).

RTE reads the mean of the last layer and trains the head at 1e-3: 50.0 +- 2.8 over five seeds
against 47.8 +- 1.7 (3 seeds) on [CLS] with the head at 3e-2; the PyTorch peer 49.3 +- 1.0 at the
same config. Both still at chance (the majority class is 52.7%; docs/results.md).
"""

from jaxpeft.configs.prompt_common import for_task


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=3e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prompt_init="sample_vocab")
    return for_task(cfg, task, rte=dict(pooling="mean", head_learning_rate=1e-3))
