"""Frozen (head only): a linear classifier on the frozen encoder's pooled [CLS]. Only ~800
values train, so the rate is high: 1e-2 was the best of 1e-3 / 3e-3 / 1e-2 in an earlier CPU-sized
SST-2 study (6,000 sentences, one epoch)."""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-2), task)
