"""The BitFit study sized for a 2-core CPU, for machines without a GPU.

Same five settings and the same protocol as ``config.py`` (learning rate chosen on dev with
seed 0, then seeds 1 and 2 at that rate) on a budget a 2-core CPU can afford: one epoch over the
first 6,000 SST-2 training sentences (the full 872-sentence dev set; about 45 minutes for the 20
runs at ``--jobs=2``), then CoLA; two learning rates per setting around the best of the full-data
SST-2 sweep on a GPU (docs/results.md). CoLA trains 3 epochs: after one epoch every seed-0 run we
made (full fine-tuning and BitFit, both rates) still predicted the majority class (Matthews 0.0).
``python -m experiments.bitfit_study.run plan --config=experiments/bitfit_study/config_cpu.py
--data_dir=$GLUE`` prints the budget.
"""

TASKS = ("sst2", "cola")
OTHER_TERMS = "key,value,attention_output,attention_layernorm,output,output_layernorm"


def get_config(task: str) -> dict:
    cfg = dict(batch_size=32, warmup_ratio=0.06, weight_decay=0.0, max_grad_norm=1.0,
               eval_batch_size=256, eval_every=0, log_every=100, progress=False)
    per_task = {
        "sst2": dict(num_epochs=1, max_seq_length=64, max_train_examples=6000),
        "cola": dict(num_epochs=3, max_seq_length=64),
    }
    cfg.update(per_task.get(task, {}))
    return cfg


def get_study() -> dict:
    bitfit_lrs = (1e-3, 3e-3)
    return dict(
        tasks=TASKS,
        seeds=(0, 1, 2),
        settings={
            "full": dict(label="Full fine-tuning", method="full", learning_rates=(5e-5, 1e-4)),
            "bitfit": dict(label="BitFit (all biases)", method="bitfit", learning_rates=bitfit_lrs),
            "bitfit_qi": dict(label="BitFit, b_q + b_m2 only", method="bitfit",
                              bitfit_terms="query,intermediate", learning_rates=bitfit_lrs),
            "bitfit_no_qi": dict(label="BitFit, all but b_q, b_m2", method="bitfit",
                                 bitfit_terms=OTHER_TERMS, learning_rates=bitfit_lrs),
            "frozen": dict(label="Frozen (head only)", method="frozen", learning_rates=(3e-3, 1e-2)),
        },
    )
