"""User-facing errors.

Anything a user can get wrong (a config key, a value, a missing file, a
broken checkpoint) raises :class:`UserError`. The CLI prints its message as
one line and exits with status 2; library users catch it like any exception.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the run stops at the last good checkpoint."""
