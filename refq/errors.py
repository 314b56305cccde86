"""One exception type for user errors.

The CLI turns a RefqError into a one-line message on stderr and exit code 2.
Anything else that escapes is a bug in refq (exit 1 with a traceback).
"""


class RefqError(Exception):
    """A user mistake: bad file, bad tensor, bad option. The message names it."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `timeout`, containers and batch schedulers send), raised like
    Ctrl-C's KeyboardInterrupt so that every `except BaseException` / `finally`
    that removes a half-written output runs for it too."""


def raise_on_sigterm():
    """Turn SIGTERM into a Terminated exception; -> a function restoring the old handler.

    A second SIGTERM during the clean-up is ignored (SIGKILL still ends the process;
    its leftovers are removed by the next run, refq/outdir.py)."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:            # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, old)
