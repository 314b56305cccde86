"""What the command modules share (cli.py, quantize_cli.py, compare.py): the
data files shipped with refq and reading a text file for an option.

A leaf module, so that cli.py -> commands stays one-way.
"""
import os

from refq.errors import RefqError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_EVAL = os.path.join(DATA_DIR, "eval.txt")
DEFAULT_CALIB = os.path.join(DATA_DIR, "calib.txt")


def read_text(path, option="--text"):
    """The UTF-8 text of file `path`; a one-line RefqError naming `option` otherwise."""
    if not os.path.isfile(path):
        raise RefqError(f"{option} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise RefqError(f"{option} {path}: not UTF-8 text") from None
    except OSError as e:
        raise RefqError(f"{option} {path}: cannot read ({e.strerror})") from None
