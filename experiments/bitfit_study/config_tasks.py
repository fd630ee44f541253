"""Every method's defaults on the token and span tasks -- POS (UD English EWT), NER (CoNLL-2003),
SQuAD v1.1 -- three seeds each, and the PyTorch peer beside them: the accuracy table of
``config_defaults.py`` for tagging and extractive QA.

Each run starts from its method's own config for the task (``jaxpeft/configs/<method>.py``, with the
per-task epochs and lengths of ``jaxpeft/configs/__init__.py``: pos 3/10 epochs, ner 5/20, squad
3/10 at 384 tokens, for weight-training / prompt methods) at that config's learning rate. The peer
(``benchmarks/peft_job.py``) runs the same config with ``AutoModelForTokenClassification`` /
``AutoModelForQuestionAnswering`` and peft's ``TOKEN_CLS`` / ``QUESTION_ANS``, on our task code's
windows and labels, scored by our metric code (seqeval entity F1, token accuracy, the official
EM/F1).

Each task reads its own data folder, and the study takes one ``--data_dir`` a command, so ``run`` and
``peer`` go one task at a time (``--tasks``); ``table`` reads the results files only::

    G=--config=experiments/bitfit_study/config_tasks.py; D=../shared/data
    python -m experiments.bitfit_study.run run  $G --out=runs/tasks --tasks=pos   --data_dir=$D/ud_ewt    --jobs=4
    python -m experiments.bitfit_study.run run  $G --out=runs/tasks --tasks=ner   --data_dir=$D/conll2003 --jobs=4
    python -m experiments.bitfit_study.run run  $G --out=runs/tasks --tasks=squad --data_dir=$D/squad     --jobs=2
    python -m experiments.bitfit_study.run peer $G --out=runs/tasks --tasks=pos   --data_dir=$D/ud_ewt    --jobs=4
    python -m experiments.bitfit_study.run peer $G --out=runs/tasks --tasks=ner   --data_dir=$D/conll2003 --jobs=4
    python -m experiments.bitfit_study.run peer $G --out=runs/tasks --tasks=squad --data_dir=$D/squad     --jobs=2
    python -m experiments.bitfit_study.run table $G --out=runs/tasks

Known gaps, to read the table right:

* ``prefix`` and ``ptuning_v2``: the peer exits with an ``error:`` line (status 2) where the installed
  peft cannot run them (peft up to 0.21 on transformers 5's ``BertModel``; peft 0.22 runs them);
  ``run.py peer`` reports them failed and the table has no peer cell for them.
* ``bitfit_unpacked`` / ``lora_unpacked``: one example a row, in batches of similar lengths
  (``--group_by_length``, the peer too); ``bitfit_random`` / ``lora_random``: one a row, in random
  batches (``--no-group_by_length``, the tagging default one a row): which of the two packing's gain
  on tagging comes from. ``prompt_grouped`` ... ``ptuning_v2_grouped``: the prompt methods in
  length-grouped batches (their tagging default before random batches); ``prompt_random`` ...
  ``ptuning_v2_random``: in random batches, stated (on tagging, the same as their defaults).
* ``prompt`` and ``ptuning``: ours put the virtual tokens after ``[CLS]`` by default, peft in front
  (``prompt_position=front`` is peft's placement); the defaults are compared as they are.
* SQuAD's EM/F1 are percentages (the official script's scale); the study reads them as fractions
  like the other tasks' metrics (``study.main_metric``), so every cell is x100 alike.
* ``plan`` counts sentences / questions; a run steps over windows (long sentences, long contexts), so
  its steps and examples for these tasks are lower bounds.
* The offline copy's ``ud_ewt`` folder must hold ``UD_English-EWT/en_ewt-ud-{train,dev,test}.conllu``.
"""

TASKS = ("pos", "ner", "squad")


def get_config(task: str) -> dict:
    del task
    return dict(progress=False, log_every=100)


def get_study() -> dict:
    methods = ("full", "frozen", "bitfit", "lora", "ia3", "bottleneck", "prompt", "ptuning", "prefix", "ptuning_v2")
    settings = {m: dict(label=m, method=m) for m in methods}
    # one example a row, in length-grouped batches or in random ones (the tagging default one a row)
    for m in ("bitfit", "lora"):
        settings[f"{m}_unpacked"] = dict(label=f"{m}, one a row", method=m,
                                         options=dict(packing=False, group_by_length=True))
        settings[f"{m}_random"] = dict(label=f"{m}, one a row, random batches", method=m,
                                       options=dict(packing=False, group_by_length=False))
    # the prompt methods (one a row always) in length-grouped batches or in random ones
    for m in ("prompt", "ptuning", "prefix", "ptuning_v2"):
        settings[f"{m}_grouped"] = dict(label=f"{m}, length-grouped batches", method=m,
                                        options=dict(group_by_length=True))
        settings[f"{m}_random"] = dict(label=f"{m}, random batches", method=m,
                                       options=dict(group_by_length=False))
    return dict(tasks=TASKS, seeds=(0, 1, 2), method_configs=True, settings=settings)
