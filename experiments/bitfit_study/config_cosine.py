"""The cosine read-out (``pooling="cosine"``) on the sentence-pair tasks, each setting from its
method's config for the task, like ``config_defaults.py``.

The bundled model is a sentence-embedding model: it was trained so that the cosine of two
sentences' mean embeddings, each sentence encoded alone, says how close they are. On RTE a
logistic regression on that one number (the frozen model's, ``linear_probe.py``'s ``cosine``
rows) reaches 61.4-62.8% on dev, where every read-out of the joint pair stays at 48-53% (the majority
is 52.7%). This runs every method on RTE with the cosine read-out, five seeds, and the settings
without a layer-deep prompt on STS-B and MRPC, three seeds. On RTE the prompt methods run with the
head at 1e-2 (``*_head``, what their RTE configs now use) and at 1e-3 (``*_slow_head``, a few seeds:
the rate their RTE configs used on the mean of the joint pair).

Each task runs only the settings named for it in :data:`CELLS`, with the seeds in :data:`SEEDS`::

    G=--config=experiments/bitfit_study/config_cosine.py
    for t in rte stsb mrpc; do
      python -m experiments.bitfit_study.run run $G --tasks=$t --out=runs/cosine --data_dir=$GLUE --jobs=6 \\
          --settings=$(python -c "from experiments.bitfit_study.config_cosine import CELLS; print(','.join(CELLS['$t']))") \\
          --seeds=$(python -c "from experiments.bitfit_study.config_cosine import SEEDS; print(SEEDS['$t'])")
    done
    python -m experiments.bitfit_study.run peer $G --tasks=rte --out=runs/cosine --data_dir=$GLUE --jobs=6 \\
        --settings=frozen,bitfit,bitfit_qi,prompt_head,ptuning_head,prefix,ptuning_v2 --seeds=0,1,2,3,4
    python -m experiments.bitfit_study.run peer $G --tasks=stsb,mrpc --out=runs/cosine --data_dir=$GLUE --jobs=9 \\
        --settings=frozen,prompt,ptuning --seeds=0,1,2
    python -m experiments.bitfit_study.run table $G --out=runs/cosine --doc=docs/results.md --marker=cosine-table
"""

TASKS = ("stsb", "mrpc", "rte")

METHODS = ("full", "frozen", "bitfit", "lora", "adapter", "prompt", "ptuning", "prefix", "ptuning_v2")

#: Which settings each task runs.
CELLS = {
    "rte": ("full", "frozen", "bitfit", "lora", "adapter", "prefix", "ptuning_v2", "bitfit_qi", "prompt_head",
            "ptuning_head", "prompt_slow_head", "ptuning_slow_head", "frozen_fast"),
    "stsb": ("frozen", "prompt", "ptuning", "prompt_head", "ptuning_head"),
    "mrpc": ("frozen", "prompt", "ptuning", "prompt_head", "ptuning_head"),
}

#: The seeds each task runs (``prompt_slow_head`` ran seeds 0-2, ``ptuning_slow_head`` seed 0 only).
SEEDS = {"rte": "0,1,2,3,4", "stsb": "0,1,2", "mrpc": "0,1,2"}


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    cosine = dict(pooling="cosine")
    s = {m: dict(label=f"{m}, cosine", method=m, options=cosine) for m in METHODS}
    s["bitfit_qi"] = dict(label="bitfit (b_q + b_m2), cosine", method="bitfit", bitfit_terms="query,intermediate",
                          options=cosine)
    for m in ("prompt", "ptuning"):
        for name, rate, shown in (("head", 1e-2, "1e-2"), ("slow_head", 1e-3, "1e-3")):
            s[f"{m}_{name}"] = dict(label=f"{m}, cosine, head {shown}", method=m,
                                    options=dict(cosine, head_learning_rate=rate))
    s["frozen_fast"] = dict(label="frozen, cosine, 3e-2", method="frozen", learning_rates=(3e-2,), options=cosine)
    return dict(tasks=TASKS, seeds=(0, 1, 2, 3, 4), method_configs=True, settings=s)
