"""The search behind the method configs where the defaults fell short (docs/results.md): a grid of
learning rates around each config's rate, on the selection seed, for the (task, method) cells below
the PyTorch peer or not above RTE's majority class, and the read-out and regularisation variants
that could explain them. Every run starts from its method's config for the task, like
``config_defaults.py``; a setting's ``options`` change that config where the setting says so.

Each task runs only the settings named for it in :data:`CELLS`::

    for t in cola mrpc stsb rte; do
      python -m experiments.bitfit_study.run run --config=experiments/bitfit_study/config_search.py \\
          --tasks=$t --settings=$(python -c "from experiments.bitfit_study.config_search import CELLS; print(','.join(CELLS['$t']))") \\
          --seeds=0 --out=runs/search --data_dir=$GLUE --jobs=8
    done
    python -m experiments.bitfit_study.run table --config=experiments/bitfit_study/config_search.py --out=runs/search
"""

TASKS = ("cola", "mrpc", "stsb", "rte")

#: Which settings each task searches.
CELLS = {
    "cola": ("adapter", "adapter_unpacked", "full", "full_unpacked", "ptuning_v2", "ptuning_v2_nodrop"),
    "mrpc": ("adapter", "prefix", "lora", "ptuning_v2"),
    "stsb": ("adapter", "prefix", "ptuning_v2", "ptuning_v2_nodrop", "frozen", "frozen_mean", "frozen_pooler",
             "prefix_high", "prefix_mean", "prefix_mean_high", "ptuning_lstm", "ptuning_slow", "ptuning_mlp", "prefix_shift", "prefix_shift_mean"),
    "rte": ("bitfit", "prefix", "prefix_mean", "ptuning_v2", "ptuning_v2_nodrop", "ptuning_v2_mean", "prompt",
            "prompt_mean", "ptuning", "ptuning_mean", "frozen", "frozen_mean", "frozen_pooler",
            "prompt_100", "prompt_100_mean", "ptuning_mean_slow"),
}


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    s = {
        # module methods: the rate, and packing (CoLA's configs pack; the peer does not)
        "adapter": dict(method="adapter", learning_rates=(3e-4, 1e-3, 3e-3)),
        "adapter_unpacked": dict(method="adapter", options=dict(packing=False)),
        "lora": dict(method="lora", learning_rates=(3e-4, 1e-3, 3e-3)),
        "full": dict(method="full", learning_rates=(2e-5, 5e-5, 1e-4)),
        "full_unpacked": dict(method="full", options=dict(packing=False)),
        "bitfit": dict(method="bitfit", learning_rates=(3e-4, 1e-3, 3e-3)),
        # the head alone: its rate, and the read-out (mean pooling; the pooler trained with the head)
        "frozen": dict(method="frozen", learning_rates=(1e-3, 1e-2, 3e-2)),
        "frozen_mean": dict(method="frozen", options=dict(pooling="mean"), learning_rates=(1e-3, 1e-2, 3e-2)),
        "frozen_pooler": dict(method="frozen", options=dict(modules_to_save="pooler"),
                              learning_rates=(1e-4, 1e-3)),
        # the prompt methods: the rate, no prefix dropout, mean pooling
        "prompt": dict(method="prompt", learning_rates=(1e-2, 3e-2, 1e-1)),
        "prompt_mean": dict(method="prompt", options=dict(pooling="mean")),
        "ptuning": dict(method="ptuning", learning_rates=(3e-4, 1e-3, 3e-3)),
        "ptuning_mean": dict(method="ptuning", options=dict(pooling="mean")),
        # P-tuning's collapsed STS-B seed, over 5 seeds: the config (the LSTM encoder at 1e-3), a lower
        # rate for the encoder, peft's MLP encoder
        "ptuning_lstm": dict(method="ptuning", learning_rates=(1e-3,)),
        "ptuning_slow": dict(method="ptuning", learning_rates=(3e-4,)),
        "ptuning_mlp": dict(method="ptuning", options=dict(encoder_type="mlp")),
        "ptuning_mean_slow": dict(method="ptuning", options=dict(pooling="mean"), learning_rates=(3e-4,)),
        # the shallow prompt on RTE: five times the virtual tokens, rates up to Lester et al.'s 0.3
        "prompt_100": dict(method="prompt", options=dict(num_virtual_tokens=100), learning_rates=(3e-2, 1e-1, 3e-1)),
        "prompt_100_mean": dict(method="prompt", options=dict(num_virtual_tokens=100, pooling="mean"),
                                learning_rates=(3e-2, 1e-1, 3e-1)),
        "prefix": dict(method="prefix", learning_rates=(3e-5, 1e-4, 3e-4)),
        "prefix_mean": dict(method="prefix", options=dict(pooling="mean")),
        # prefix tuning on STS-B: rates above the grid's top (3e-4, chosen at the edge), [CLS] and mean
        "prefix_high": dict(method="prefix", learning_rates=(1e-3, 3e-3)),
        "prefix_mean_high": dict(method="prefix", options=dict(pooling="mean"), learning_rates=(1e-3,)),
        # ... and the input numbered after the prefix, as transformers' BERT does under peft
        "prefix_shift": dict(method="prefix", options=dict(shift_positions=True), learning_rates=(1e-4, 3e-4)),
        "prefix_shift_mean": dict(method="prefix", options=dict(shift_positions=True, pooling="mean")),
        "ptuning_v2": dict(method="ptuning_v2", learning_rates=(3e-3, 1e-2, 3e-2)),
        "ptuning_v2_nodrop": dict(method="ptuning_v2", options=dict(prefix_dropout=0.0)),
        "ptuning_v2_mean": dict(method="ptuning_v2", options=dict(pooling="mean")),
    }
    for name, v in s.items():
        v.setdefault("label", name)
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=s)
