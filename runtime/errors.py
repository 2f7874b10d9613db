"""One exception type for every user-facing error: the CLI prints its message on one line.

It lives at the bottom of the layers (runtime/) so that every package, torch-free or not, raises
the same type.
"""


class CgilError(Exception):
    """Bad input or a refused operation; the message says what is wrong and what would be valid."""
