"""The command-line entry points (``jaxpeft-train``, ``jaxpeft-predict``, ``jaxpeft-bench``; also
``python scripts/train.py`` etc.) and their shared plumbing: one clear line and exit status 2 on
bad input."""

from __future__ import annotations

import time

_START = time.perf_counter()   # the command's start, before the heavy imports

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

EXIT_USER_ERROR = 2


def guarded(main: Callable[[], int]) -> int:
    """Runs ``main``; a :class:`~jaxpeft.errors.UserError` (or a mask error) becomes
    ``error: <message>`` on stderr and exit status 2, with no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # JAX reserves 75% of a GPU's memory up front, which took 1.4 s of a 10 s run on an H200; the
    # commands grow their memory as they need it (set it to true to reserve again)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from jaxpeft.errors import UserError
    from jaxpeft.masks import MaskError

    try:
        return main()
    except (UserError, MaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


TRAIN_DOC = """Fine-tune an encoder on a task with a PEFT method.

    jaxpeft-train --method=bitfit --task=sst2
    jaxpeft-train --method=bitfit --bitfit_terms=query,intermediate --task=rte
    jaxpeft-train --method=lora --task=mrpc --lora_r=8 --compute=exact
    jaxpeft-train --method=bitfit --tasks=sst2,cola,mrpc --task_sampling=temperature

Defaults come from the method's config for the task (jaxpeft/configs/<method>.py); every flag
overrides them. --compute=auto (the default) takes the fastest path on this platform.
"""


def train(argv: Sequence[str] | None = None) -> int:
    from jaxpeft import config
    from jaxpeft.training import loop

    cfg = config.parse_args(argv, description=TRAIN_DOC)
    if cfg.tasks:   # several tasks, one adapter each, in mixed batches
        from jaxpeft.training.multitask import MultiTask as Job
    else:
        from jaxpeft.training.single import SingleTask as Job
    loop.run(Job(cfg, start=_START))
    return 0


def train_main() -> None:
    sys.exit(guarded(train))


def predict_main() -> None:
    from jaxpeft.cli import predict

    sys.exit(guarded(predict.main))


def bench_main() -> None:
    from jaxpeft.cli import bench

    sys.exit(bench.main())
