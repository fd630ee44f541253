"""Prompt tuning: 20 virtual tokens from sampled vocabulary rows; only ~8k values and the head train."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    # 3e-2: the useful range with AdamW on an encoder is 1e-2..3e-2 (docs/methods.md, "Learning rates")
    return for_task(task, "prompt", dict(learning_rate=3e-2, prompt_init="sample_vocab"),
                    # the cosine of the pair: 88.8 against 82.3 on [CLS] (docs/results.md, "The cosine read-out")
                    stsb=dict(pooling="cosine"),
                    # the cosine of the pair: 85.2 against 79.5 (docs/results.md, "The cosine read-out")
                    mrpc=dict(pooling="cosine"),
                    # the cosine, head at 1e-2: 57.8 +- 1.4 against 50.0 +- 2.8 (docs/results.md, "The cosine read-out")
                    rte=dict(pooling="cosine", head_learning_rate=1e-2))
