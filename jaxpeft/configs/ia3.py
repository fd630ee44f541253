"""IA3: rescaling vectors starting at one, on peft's default targets for the family."""

from jaxpeft.configs import for_task


def get_config(task: str) -> dict:
    # 3e-3: the vectors start at 1 and move ~lr per Adam step (docs/results.md, "IA3 and DoRA")
    return for_task(task, "module", dict(learning_rate=3e-3))
