"""``python -m jaxpeft.serving``: the same as ``jaxpeft-serve`` (:mod:`jaxpeft.serving.cli`)."""

import sys

from jaxpeft.serving.cli import main

sys.exit(main())
