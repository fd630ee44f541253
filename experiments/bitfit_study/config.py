"""The BitFit study: what every run of ``experiments/bitfit_study/run.py`` trains with, and the grid
it runs.

``get_config(task)`` holds :class:`~jaxpeft.config.TrainConfig` settings by flag name, so one run of
the study can be repeated by hand with ``jaxpeft-train --config=experiments/bitfit_study/config.py
--task=rte --method=bitfit --learning_rate=1e-3 --seed=1``. ``get_study()`` holds the grid: tasks,
settings (method + BitFit terms + learning-rate grid) and seeds.

Budget (``python -m experiments.bitfit_study.run plan`` prints it from the data): one epoch of SST-2
and a few of the small tasks, for every setting, learning rate and seed (``plan`` prints the runs,
training examples and dev forwards; docs/results.md says how the time estimate is made).
"""

#: The GLUE tasks of the offline copy that have a labelled train split.
TASKS = ("sst2", "cola", "mrpc", "stsb", "rte")

#: The per-layer BERT bias terms other than b_q and b_m2 (jaxpeft.masks.BERT_BIAS_TERMS names).
#: The embedding-LayerNorm and pooler biases are not among the paper's per-layer terms: they train
#: in "bitfit" (all biases) only, so "bitfit_qi" and "bitfit_no_qi" split the eight terms exactly.
OTHER_TERMS = "key,value,attention_output,attention_layernorm,output,output_layernorm"


def get_config(task: str) -> dict:
    cfg = dict(batch_size=32, warmup_ratio=0.06, weight_decay=0.0, max_grad_norm=1.0,
               eval_batch_size=256, eval_every=0, log_every=100, progress=False)
    # Epochs: SST-2 is large (67k examples), one epoch; the small sets get more passes.
    # Lengths from the bundled tokenizer on dev: SST-2/CoLA never exceed 64 tokens, MRPC/STS-B 128;
    # RTE's p90 is 134 and max 253, so 256 (length buckets keep short batches short).
    per_task = {
        "sst2": dict(num_epochs=1, max_seq_length=64),
        "cola": dict(num_epochs=3, max_seq_length=64),
        "mrpc": dict(num_epochs=5, max_seq_length=128),
        "stsb": dict(num_epochs=5, max_seq_length=128),
        "rte": dict(num_epochs=10, max_seq_length=256),
    }
    cfg.update(per_task.get(task, {}))
    return cfg


def get_study() -> dict:
    # BitFit: the paper's 1e-4..1e-3 plus 3e-3, since a 6-layer, 384-wide model moves its biases
    # less per step; full fine-tuning: the usual 2e-5..5e-5 plus 1e-4 (small models like more);
    # Frozen trains a linear head on fixed features: larger steps.
    bitfit_lrs = (1e-4, 3e-4, 1e-3, 3e-3)
    return dict(
        tasks=TASKS,
        seeds=(0, 1, 2),
        settings={
            "full": dict(label="Full fine-tuning", method="full", learning_rates=(2e-5, 5e-5, 1e-4)),
            "bitfit": dict(label="BitFit (all biases)", method="bitfit", learning_rates=bitfit_lrs),
            "bitfit_qi": dict(label="BitFit, b_q + b_m2 only", method="bitfit",
                              bitfit_terms="query,intermediate", learning_rates=bitfit_lrs),
            "bitfit_no_qi": dict(label="BitFit, all but b_q, b_m2", method="bitfit",
                                 bitfit_terms=OTHER_TERMS, learning_rates=bitfit_lrs),
            "frozen": dict(label="Frozen (head only)", method="frozen", learning_rates=(1e-3, 3e-3, 1e-2)),
            # the seed's comparison: BitFit against Adapters and LoRA at their own parameter counts
            "adapter": dict(label="Adapters (Houlsby, size 64)", method="adapter", learning_rates=(1e-4, 3e-4, 1e-3)),
            "lora": dict(label="LoRA (r 8, query + value)", method="lora", learning_rates=(3e-4, 1e-3, 3e-3)),
        },
    )
