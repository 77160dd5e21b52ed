"""The one error type a user sees as a message, not a traceback."""


class SafeMergeError(Exception):
    """A problem with the user's inputs or settings; the CLI prints it and exits with status 2."""
