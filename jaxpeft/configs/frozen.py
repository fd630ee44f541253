"""Frozen (head only): a linear classifier on the frozen encoder's pooled [CLS]. Only ~800
values train, so the rate is high: 1e-2 was the best of 1e-3 / 3e-3 / 1e-2 in an earlier CPU-sized
SST-2 study (6,000 sentences, one epoch).

STS-B and RTE read the cosine of the two sentences, each encoded apart (``pooling="cosine"``): the
bundled model is a sentence-embedding model trained so that this cosine says how close two
sentences are, and the head then only has to place a threshold or a scale on it. STS-B 87.0 +- 0.0
against 49.2 +- 0.1 on the mean of the joint pair; RTE 62.7 +- 0.2 against 49.6 +- 1.3 on [CLS]
(the majority class is 52.7%); the PyTorch peer at the same config 87.0 and 62.7 (docs/results.md,
"The cosine read-out"). MRPC stays on [CLS] (81.7 against 81.1 on the cosine).
"""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-2), task, stsb=dict(pooling="cosine"), rte=dict(pooling="cosine"))
