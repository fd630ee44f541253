"""P-tuning v2 (Liu et al. 2022): deep prompts (20 prefix keys/values per layer), no
reparameterisation, dropout 0.1 on the prefixes.

The reference scripts' RTE recipe on BERT-large is batch 32, lr 1e-2, 20 prefix tokens, 60 epochs,
max length 128; we keep it as is for RTE on the 6-layer, 384-wide bundled model (its prefixes are
12 x smaller: 6 x 2 x 20 x 384 = 92k values instead of 24 x 2 x 20 x 1024 = 983k) and use the
same rate and length for the other tasks with epochs scaled to the dataset size.
"""

from jaxpeft.configs.prompt_common import for_task


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prefix_projection=False, prefix_dropout=0.1)
    return for_task(cfg, task)
