"""Prefix tuning: 20 prefixes per layer through Li & Liang's MLP (512 units); the head at its own rate."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    # 1e-4 (Li & Liang 5e-5..8e-5); the head at 1e-2 follows faster (docs/methods.md, "Learning rates")
    return for_task(task, "prompt", dict(learning_rate=1e-4, head_learning_rate=1e-2),
                    # 86.5 / 83.2 / 85.5 at 3e-5 / 1e-4 / 3e-4, seed 0 (docs/results.md, "The search")
                    mrpc=dict(learning_rate=3e-5),
                    # 3e-4, the mean, shifted positions: 86.1 +- 0.3 against 84.9 +- 0.3 (docs/results.md)
                    stsb=dict(learning_rate=3e-4, pooling="mean", shift_positions=True),
                    # the mean: 57.2 +- 0.8 against 50.9 on [CLS] (docs/results.md, "The search")
                    rte=dict(pooling="mean"))
