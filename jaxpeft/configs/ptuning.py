"""P-tuning v1 (Liu et al. 2021): 20 virtual tokens from a 2-layer bidirectional LSTM + MLP prompt
encoder (H/2 units per direction, as in the P-tuning code).

The encoder has ~2M parameters on a 384-wide model. With Adam every weight of its last layer
moves by about the learning rate per step, so the prompt moves by roughly lr x (sum of |inputs|
of that layer), ~80 x lr here: the encoder needs a far lower rate than a bare prompt (1e-3
rather than 3e-2). The head then needs its own, higher rate (1e-2): at 3e-3 for everything the
prompt churns and nothing is learnt in 200 steps, at 3e-4 for everything the head barely moves
(both stay at the majority class; docs/methods.md). Only the computed 20 x H prompt is exported.
Same epochs as prompt tuning.

STS-B runs the encoder at 3e-4: over five seeds (docs/results.md) 81.1 +- 0.5 against 79.8 +- 2.5
at 1e-3, where one seed in the defaults table never learnt (Pearson 21).

The sentence-pair tasks read the cosine of the two sentences, each encoded apart
(``pooling="cosine"``, the comparison the bundled sentence-embedding model was trained for): STS-B
88.8 +- 0.1 against 81.2 on [CLS], MRPC 84.6 +- 0.6 against 77.9, RTE 60.4 +- 2.3 against 53.8 +-
2.3 on the mean (the majority class is 52.7%); the PyTorch peer at the same configs 88.7, 84.3 and
58.8 +- 0.5 (docs/results.md, "The cosine read-out").
"""

from jaxpeft.configs.prompt_common import for_task


def get_config(task: str) -> dict:
    cfg = dict(learning_rate=1e-3, head_learning_rate=1e-2, batch_size=32, num_epochs=10, max_seq_length=128, warmup_ratio=0.06,
               weight_decay=0.0, num_virtual_tokens=20, encoder_type="lstm", encoder_num_layers=2)
    return for_task(cfg, task, stsb=dict(learning_rate=3e-4, pooling="cosine"), mrpc=dict(pooling="cosine"),
                    rte=dict(pooling="cosine"))
