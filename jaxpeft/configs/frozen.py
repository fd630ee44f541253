"""Frozen (head only): a linear classifier on the frozen encoder, so the rate is high."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    # 1e-2: best of 1e-3 / 3e-3 / 1e-2 on SST-2 (docs/methods.md, "Learning rates")
    return for_task(task, "module", dict(learning_rate=1e-2),
                    # the cosine of the pair: 87.0 against 49.2 Pearson (docs/results.md, "The cosine read-out")
                    stsb=dict(pooling="cosine"),
                    # the cosine of the pair: 62.7 against 49.6 on [CLS] (docs/results.md, "The cosine read-out")
                    rte=dict(pooling="cosine"))
