"""User-facing errors. The CLI prints them without a traceback and exits with code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2
