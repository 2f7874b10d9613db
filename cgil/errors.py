"""One exception type for every user-facing error: the CLI prints its message on one line."""


class CgilError(Exception):
    """Bad input or a refused operation; the message says what is wrong and what would be valid."""
