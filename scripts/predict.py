#!/usr/bin/env python
"""Predict with a trained adapter (the ``jaxpeft-predict`` command); see ``--help``."""

from jaxpeft import cli

if __name__ == "__main__":
    cli.predict_main()
