"""Each method's defaults per task, as deltas from the library defaults (:mod:`jaxpeft.config`).

``<method>.py`` holds ``get_config(task) -> dict`` (flag name -> value; ``get_config(task, hidden_size)``
where a value depends on the encoder's width, ``None`` when unknown), built with :func:`for_task`:
the method's own values, the per-task schedule of its kind (:data:`SCHEDULES`), then its values for
that task. Each value carries one line saying which measurement chose it; the searches themselves
are in ``docs/results.md``. A method without a file here runs on the library defaults and its
kind's schedule. Shipped inside the package, so a non-editable install finds them.
"""

from __future__ import annotations

#: Epochs and lengths per task, by method kind: ``module`` (methods that train small modules in the
#: encoder: BitFit, Frozen, LoRA, IA3, bottleneck adapters) and ``prompt`` (prompt methods, which
#: converge slowly: the P-tuning v2 reference scripts' 40-60 epochs on the small sets). The short-text
#: tasks, tagging and QA pack several examples (QA: windows) into each row (docs/benchmarks.md,
#: "Packing: the same accuracy" and "NER and SQuAD: the job against the peer"; docs/results.md,
#: "Token and span tasks against the peer").
SCHEDULES: dict[str, dict[str, dict]] = {
    "module": {
        "sst2": dict(packing=True, num_epochs=2, max_seq_length=64),
        "cola": dict(packing=True, num_epochs=10, max_seq_length=64),
        "mrpc": dict(num_epochs=10), "stsb": dict(num_epochs=10), "rte": dict(num_epochs=10),
        "wnli": dict(num_epochs=5), "qnli": dict(num_epochs=2),
        "qqp": dict(num_epochs=2, eval_every=5000), "mnli": dict(num_epochs=2, eval_every=5000),
        "pos": dict(packing=True, num_epochs=3), "ner": dict(packing=True, num_epochs=5),
        "squad": dict(packing=True, num_epochs=3, max_seq_length=384),
    },
    "prompt": {
        "*": dict(num_epochs=10),
        "sst2": dict(max_seq_length=64, eval_every=2000), "cola": dict(num_epochs=40, max_seq_length=64),
        "mrpc": dict(num_epochs=40), "stsb": dict(num_epochs=40), "rte": dict(num_epochs=60),
        "wnli": dict(num_epochs=20), "qnli": dict(num_epochs=5, eval_every=5000),
        "qqp": dict(num_epochs=5, eval_every=10000), "mnli": dict(num_epochs=5, eval_every=10000),
        "pos": dict(num_epochs=10), "ner": dict(num_epochs=20), "squad": dict(num_epochs=10, max_seq_length=384),
    },
}


def for_task(task: str, kind: str, method: dict, **per_task: dict) -> dict:
    """``method``'s values, then the ``kind`` schedule's for ``task``, then ``per_task[task]``."""
    schedule = SCHEDULES[kind]
    return {**schedule.get("*", {}), **method, **schedule.get(task, {}), **per_task.get(task, {})}
