"""BitFit: bias terms + head. BitFit needs a larger learning rate than full fine-tuning
(the paper searched 1e-4..1e-3); small GLUE sets get more epochs. The short-text tasks (SST-2,
CoLA) pack several examples into each row (``packing``: one compiled shape, no padding computed;
docs/benchmarks.md has the accuracy check)."""

from jaxpeft.configs.module_common import for_task


def get_config(task: str) -> dict:
    return for_task(dict(learning_rate=1e-3), task, sst2=dict(learning_rate=3e-3))
