"""User-facing errors.

Anything raised as :class:`UserError` is a problem with the user's input (recipe, data, command line), not a bug.
The CLI prints its message on one line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the allowed values."""


class ConfigError(UserError):
    """A malformed recipe or override."""


class DataError(UserError):
    """A dataset that cannot be used (empty split, one class, labels out of range, ...)."""
