"""The one exception type for bad input that the command-line tools turn into a one-line message."""


class UserError(Exception):
    """Bad input from the user: unknown name, missing file, malformed row, incompatible checkpoint.

    Command-line entry points print ``error: <message>`` and exit with status 2; no traceback.
    """
