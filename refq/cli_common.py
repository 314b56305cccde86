"""What the command modules share (cli.py, quantize_cli.py, compare.py): the
data files shipped with refq, reading a text file for an option, and the checks
of a seed and of a window length.

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
        what = "not a regular file" if os.path.exists(path) else "no such file"
        raise RefqError(f"{option} {path}: {what}")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise RefqError(f"{option} {path}: not UTF-8 text") from None
    except OSError as e:
        raise RefqError(f"{option} {path}: cannot read ({e.strerror})") from None


def check_seed(seed, flag="--seed"):
    """numpy's generators take seeds 0 <= seed < 2**128 (refq's convention: < 2**63)."""
    if not 0 <= seed < 2 ** 63:
        raise RefqError(f"{flag} {seed}: must be an integer in [0, 2**63)")


def check_positions(n, cfg, what):
    """A window of n tokens must fit the model's positions (config.json
    max_position_embeddings): RoPE beyond it is extrapolation the model never saw."""
    if n > cfg.max_position_embeddings:
        raise RefqError(f"{what}: {n} positions exceed the model's max_position_embeddings "
                        f"{cfg.max_position_embeddings} (config.json)")
