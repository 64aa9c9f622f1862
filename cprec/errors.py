"""Errors whose messages say what to change; the command line prints them without a traceback."""


class CPRecError(RuntimeError):
    """A user-facing failure: bad input, a missing file or package, a refused resume."""
