"""Shared plumbing of the command-line scripts: one clear line and a non-zero exit on bad input."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2


def guarded(main: Callable[[], int]) -> int:
    """Runs ``main``; a :class:`~jaxpeft.errors.UserError` (or a mask error) becomes
    ``error: <message>`` on stderr and exit status 2, with no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
