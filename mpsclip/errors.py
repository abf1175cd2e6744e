"""The one exception type for bad user input: its message says what was wrong, where, and what to do."""


class MPSCLIPError(Exception):
    """A problem with the user's files, arguments or environment (not a bug in mpsclip)."""
