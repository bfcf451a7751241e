"""The one exception type of the data layer."""

from knlight.errors import KnlightError


class DataError(KnlightError, ValueError):
    """Bad input data or options.

    Every message says what is wrong, where (``file:line`` or the option name) and what to do about it.
    """
