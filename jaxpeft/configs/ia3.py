"""IA3: rescaling vectors starting at one, on peft's default targets for the family."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    # 3e-3 is not yet searched on this model: the vectors start at one and move by about the rate
    # per Adam step. experiments/bitfit_study/config_ia3_dora.py is the search (docs/results.md,
    # "Not yet measured").
    return for_task(task, "module", dict(learning_rate=3e-3))
