"""One exception type for user errors.

The CLI turns a RefqError into a one-line message on stderr and exit code 2.
Anything else that escapes is a bug in refq (exit 1 with a traceback).
"""


class RefqError(Exception):
    """A user mistake: bad file, bad tensor, bad option. The message names it."""
