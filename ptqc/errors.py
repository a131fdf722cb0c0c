"""The one exception type the CLI turns into a single ``error: ...`` line and exit code 2."""

from __future__ import annotations


class PtqcError(Exception):
    """Bad input or an unsupported model: the message is meant for the user, as is."""
