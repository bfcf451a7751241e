"""The base of knlight's user errors: bad input or settings, with a message that says what, where and what to do.

Every error a user can cause (a malformed record, a config value out of range, a neuron file of another model,
an unknown model name...) derives from :class:`KnlightError`. The ``knlight`` command prints such an error as
one line (no traceback) and exits with status 2; anything else is a bug and keeps its traceback. Pure Python.
"""

from __future__ import annotations


class KnlightError(Exception):
    """A user error: its message names what is wrong, where (file:line or config key) and what to do."""


class ConfigError(KnlightError, ValueError):
    """A setting out of range or inconsistent with another; the message names the config key to change."""


class DataError(KnlightError, ValueError):
    """Bad input data or options of the data layer: the message says what is wrong, where (``file:line`` or the
    option name) and what to do about it."""
