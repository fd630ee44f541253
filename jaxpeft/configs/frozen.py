"""Frozen (head only): a linear classifier on the frozen encoder's pooled [CLS]. Only ~800
values train, so the rate is high: 1e-2 was the best of 1e-3 / 3e-3 / 1e-2 in an earlier CPU-sized
SST-2 study (6,000 sentences, one epoch).

STS-B reads the mean of the last layer (``pooling="mean"``): the bundled model is a sentence-embedding
model trained for mean pooling, and the head alone reaches 49.1 on the mean against 38.8 on [CLS]
and 45.8 with the pooler trained too (seed 0, each at its best rate; 49.2 +- 0.1 over 3 seeds;
docs/results.md).
"""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-2), task, stsb=dict(pooling="mean"))
