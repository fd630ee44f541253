#!/usr/bin/env python
"""Fine-tune a BERT encoder on a GLUE task with a PEFT method.

    python scripts/train.py --method=bitfit --task=sst2
    python scripts/train.py --method=bitfit --bitfit_terms=query,intermediate --task=rte

Defaults come from configs/<method>.py for the task; every flag overrides them (see --help).
Kept short on purpose: the logic is in the jaxpeft library, where it is tested.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpeft import cli  # noqa: E402


def main(argv=None) -> int:
    from jaxpeft import config, train

    cfg = config.parse_args(argv, description=__doc__)
    train.run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(cli.guarded(main))
