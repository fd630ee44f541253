#!/usr/bin/env python
"""Train-step benchmark (the ``jaxpeft-bench`` command); see ``--help``."""

from jaxpeft import cli

if __name__ == "__main__":
    cli.bench_main()
