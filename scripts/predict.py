#!/usr/bin/env python
"""Predict with a trained adapter (the ``jaxpeft-predict`` command); see ``--help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxpeft import cli  # noqa: E402

if __name__ == "__main__":
    cli.predict_main()
