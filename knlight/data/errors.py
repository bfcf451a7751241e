"""The one exception type of the data layer."""


class DataError(ValueError):
    """Bad input data or options.

    Every message says what is wrong, where (``file:line`` or the option name) and what to do about it.
    """
