#!/usr/bin/env python
"""Train-step benchmark (the ``jaxpeft-bench`` command); see ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpeft import cli  # noqa: E402

if __name__ == "__main__":
    cli.bench_main()
