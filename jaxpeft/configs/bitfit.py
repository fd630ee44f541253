"""BitFit: bias terms + head. BitFit needs a larger learning rate than full fine-tuning
(the paper searched 1e-4..1e-3); small GLUE sets get more epochs. The short-text tasks (SST-2,
CoLA) pack several examples into each row (``packing``: one compiled shape, no padding computed;
docs/benchmarks.md has the accuracy check).

RTE reads the cosine of the two sentences, each encoded apart (``pooling="cosine"``): all biases
56.5 +- 2.1 against 56.3 on [CLS], and the query and intermediate biases alone (``bitfit_terms=
query,intermediate``) 54.9 +- 1.3 against 53.4 (the majority class is 52.7%); the PyTorch peer at
the same config 56.3 +- 1.4 and 54.7 +- 0.9 (docs/results.md, "The cosine read-out").
"""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-3), task, sst2=dict(learning_rate=3e-3), rte=dict(pooling="cosine"))
