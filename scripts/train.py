#!/usr/bin/env python
"""Fine-tune a BERT encoder on a GLUE task with a PEFT method (the ``jaxpeft-train`` command).

    python scripts/train.py --method=bitfit --task=sst2

Kept short on purpose: the logic is in the jaxpeft library, where it is tested.
"""

from jaxpeft import cli

if __name__ == "__main__":
    cli.train_main()
