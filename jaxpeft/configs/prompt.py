"""Prompt tuning (Lester et al. 2021): 20 virtual tokens initialised from sampled vocabulary rows.

Only ~8k prompt values and the head train, so the learning rate is far above BitFit's: Lester et
al. used 0.3 with Adafactor on T5; with AdamW on a BERT encoder 1e-2..3e-2 is the useful range
(the head trains at the same rate). Prompt tuning converges slowly, hence many epochs; on a
6-layer encoder expect it to stay well below BitFit (see docs/methods.md).

The sentence-pair tasks read the cosine of the two sentences, each encoded apart
(``pooling="cosine"``, the comparison the bundled sentence-embedding model was trained for), RTE
with the head at 1e-2: STS-B 88.8 +- 0.1 against 82.3 on [CLS], MRPC 85.2 +- 0.7 against 79.5, RTE
57.8 +- 1.4 against 50.0 +- 2.8 on the mean (the majority class is 52.7%); the PyTorch peer at the
same configs 88.9, 84.8 and 58.2 +- 5.0 (docs/results.md, "The cosine read-out").
"""

from jaxpeft.configs.prompt_common import for_task


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=3e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, prompt_init="sample_vocab")
    return for_task(cfg, task, stsb=dict(pooling="cosine"), mrpc=dict(pooling="cosine"),
                    rte=dict(pooling="cosine", head_learning_rate=1e-2))
