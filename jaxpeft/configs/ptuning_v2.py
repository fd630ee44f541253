"""P-tuning v2: deep prompts (20 per layer) held directly, dropout 0.1 on them, the reference's rate;
on encoders 768 wide and wider, one step lower on the 3e-3 / 1e-2 / 3e-2 ladder."""

from jaxpeft.configs import for_task

#: From this hidden size on (BERT-base and larger) each task's rate is one step lower (:data:`LOWER`).
WIDE = 768
#: A rate chosen on the 384-wide MiniLM -> the rate for wide encoders. On all-mpnet-base-v2 (768), seeds
#: 0-2 (docs/results.md, "all-mpnet-base-v2 on four small GLUE tasks"): MRPC and STS-B collapsed at
#: 3e-2 (81.2 F1, 0.05 Pearson), trained at 1e-2 (90.6 +- 0.7, 88.8 +- 0.0); RTE and CoLA collapsed on one
#: seed of three at 1e-2 (47.3 accuracy, 0.0 MCC), trained on every seed at 3e-3 (63.7 +- 5.2, 54.5 +- 0.8)
LOWER = {3e-2: 1e-2, 1e-2: 3e-3}


def get_config(task: str, hidden_size: int | None = None) -> dict:
    # 1e-2: the reference scripts' RTE recipe (docs/methods.md, "Learning rates")
    values = for_task(task, "prompt", dict(learning_rate=1e-2),
                      # MiniLM: 85.2 / 85.3 / 87.1 at 3e-3 / 1e-2 / 3e-2, seed 0 (docs/results.md, "The search")
                      mrpc=dict(learning_rate=3e-2),
                      # MiniLM: 81.6 / 83.6 / 84.9 at 3e-3 / 1e-2 / 3e-2, seed 0 (docs/results.md, "The search")
                      stsb=dict(learning_rate=3e-2),
                      # the cosine: 60.6 +- 2.6 over 5 seeds against 55.6 +- 1.9 on the mean (docs/results.md)
                      rte=dict(pooling="cosine"))
    if hidden_size is not None and hidden_size >= WIDE:
        values["learning_rate"] = LOWER.get(values["learning_rate"], values["learning_rate"])
    return values
