#!/usr/bin/env python
"""Fine-tune a BERT encoder on a GLUE task with a PEFT method (the ``jaxpeft-train`` command).

    python scripts/train.py --method=bitfit --task=sst2

Kept short on purpose: the logic is in the jaxpeft library, where it is tested.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpeft import cli  # noqa: E402

if __name__ == "__main__":
    cli.train_main()
