"""Method options, declared once as data.

Each method file lists its options at the top as a tuple of `Option`s:

    OPTIONS = (
        BITS,                                           # shared declarations below
        Option("iters", "int", 30, "coordinate-descent sweeps", range="[1, inf)"),
        Option("init", "choice", "gptq", "initial quantizer", choices=("rtn", "gptq")),
    )

From that one table come
- the Python API's checks (refq.api.validate_options: the value is checked
  first, then cast to a plain JSON type: int, float, bool, str, None, list),
- the flags of `refq quantize` (`--iters N`, `--no-act-order`, `none`) and
  their help (`refq quantize --method M --help`),
- the parser of `refq compare` SPECs (`quantease:iters=5,init=rtn`),
- the options written to checkpoints and golden manifests (the validated dict).
Adding an option is one row.

Kinds and their text form (command line and SPEC):
    int      an integer                     "3"
    float    a number, stored as float      "0.01", "inf"
    number   int when whole, else float     "3" -> 3, "2.5" -> 2.5 (CLAQ's average bits)
    bool     True / False                   flags --x / --no-x; SPEC x=true|false|yes|no|on|off
    choice   one of `choices`               "after"
    int_list a list of integers (API only)
`range` is an interval, "[2, 8]", "(0, 1)", "[0, inf)", "(0, inf]": square
brackets include the bound; inf is a valid value only when "inf]" says so;
NaN never is.  `none` (when not None) allows None (text "none") and says what
it means.  `also` maps values accepted besides the range to what is stored
(e.g. {16: 16} for fp16 bits, {"2:4": "2:4"} for the 2:4 pattern).
`api_only` options have no flag (a per-column list cannot be one flag for every
layer); `common` options are set from the command's own flag (`--seed`).
"""

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("int", "float", "number", "bool", "choice", "int_list")
TRUE_WORDS = ("true", "yes", "on")
FALSE_WORDS = ("false", "no", "off")


def _num(s):
    """A bound of a range: an int when it reads as one (exact comparisons), else a float."""
    try:
        return int(s)
    except ValueError:
        return float(s)


class Invalid(ValueError):
    """A value outside an option's declaration; the text says what is allowed."""


@dataclass(frozen=True)
class Option:
    name: str               # the API keyword; flag --name-with-dashes
    kind: str               # one of KINDS
    default: object
    help: str               # one line for --help
    range: str = None       # interval of allowed numbers, e.g. "[2, 8]", "(0, inf]"
    choices: tuple = ()     # kind "choice": the allowed words
    none: str = None        # None allowed (text "none"), and what it means
    also: dict = field(default_factory=dict)   # other accepted value -> value stored
    api_only: bool = False  # no flag, not in a SPEC (e.g. a per-column list)
    common: bool = False    # set from the command's own flag (--seed), not a method flag

    def __post_init__(self):
        assert self.kind in KINDS, self.kind
        assert self.help, f"option {self.name}: no help text"
        assert (self.kind == "choice") == bool(self.choices), self.name
        self.bounds()                                  # a malformed range fails at import
        assert self.check(self.default) == self.default or self.kind == "number", self.name

    def but(self, **changes):
        """The same option with some fields changed, e.g. BITS.but(default=3)."""
        return replace(self, **changes)

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    # ------------------------------------------------------------------ range
    def bounds(self):
        """-> (lo, lo_closed, hi, hi_closed); (-inf, False, inf, False) without a range."""
        if self.range is None:
            return -math.inf, False, math.inf, False
        m = re.fullmatch(r"\s*([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])\s*", self.range)
        assert m, f"option {self.name}: bad range {self.range!r}"
        return _num(m.group(2)), m.group(1) == "[", _num(m.group(3)), m.group(4) == "]"

    def _in_range(self, v):
        lo, lo_c, hi, hi_c = self.bounds()
        return (lo < v or (lo_c and v == lo)) and (v < hi or (hi_c and v == hi))

    def _range_text(self):
        lo, lo_c, hi, hi_c = self.bounds()
        if self.range is None:
            return ""
        if self.kind in ("int", "number", "int_list") and lo_c and hi_c \
                and math.isfinite(lo) and math.isfinite(hi):
            return f" in {lo}..{hi}"
        if hi == math.inf and not hi_c:
            return f" {'>=' if lo_c else '>'} {lo}"
        if lo == -math.inf and not lo_c:
            return f" {'<=' if hi_c else '<'} {hi}"
        return f" in {self.range.strip()}"

    def describe(self, meaning=True):
        """What the option accepts, e.g. "an integer >= 1, or none (one grid per output row)"."""
        what = {"int": "an integer", "float": "a number", "number": "a number",
                "bool": "true or false", "int_list": "a list of integers",
                "choice": "one of " + ", ".join(repr(c) for c in self.choices)}[self.kind]
        if self.kind == "float" and self.range is not None:
            lo, _, hi, _ = self.bounds()
            if lo >= 0 and hi <= 1:
                what = "a fraction"
        text = what + self._range_text()
        extra = [repr(a) if isinstance(a, str) else str(a) for a in self.also]
        if extra:
            text = (" or ".join(extra) + " or " + text) if isinstance(next(iter(self.also)), str) \
                else text + " or " + " or ".join(extra)
        if self.none is not None:
            text += f", or none ({self.none})" if meaning else ", or none"
        return text

    # ------------------------------------------------------------------ check
    def check(self, v):
        """A value from Python -> the value stored (plain JSON type); Invalid if not allowed.

        Types are strict: a bool is not a number, a string is not a bool, 4.0
        is not an integer; a value is checked before it is cast."""
        if v is None:
            if self.none is None:
                raise Invalid(f"must be {self.describe()}, got None")
            return None
        is_bool = isinstance(v, (bool, np.bool_))
        if self.kind == "bool":
            if is_bool:
                return bool(v)
        elif self.kind == "choice":
            if isinstance(v, str) and v in self.choices:
                return v
        elif self.kind == "int_list":
            a = np.asarray(v) if isinstance(v, (list, tuple, np.ndarray)) else None
            if a is not None and a.ndim == 1 and a.size and np.issubdtype(a.dtype, np.integer) \
                    and all(self._in_range(x) for x in (a.min(), a.max())):
                return [int(x) for x in a]
            raise Invalid(f"must be {self.describe()} (one per input column)")
        elif not is_bool:
            if isinstance(v, str):
                if v in self.also:
                    return self.also[v]
            elif isinstance(v, (int, np.integer)) or (
                    self.kind != "int" and isinstance(v, (float, np.floating))):
                if v in self.also:
                    return self.also[v]
                if not math.isnan(v) and self._in_range(v):
                    if self.kind == "int":
                        return int(v)
                    if self.kind == "number" and float(v).is_integer():
                        return int(v)
                    return float(v)
        raise Invalid(f"must be {self.describe()}, got {v!r}")

    def parse(self, text):
        """Command-line / SPEC text -> a checked value (Invalid if not allowed)."""
        t = text.strip()
        low = t.lower()
        if low == "none":
            return self.check(None)
        if t in self.also:                           # e.g. "2:4"
            return self.check(t)
        if self.kind == "bool":
            if low in TRUE_WORDS or low in FALSE_WORDS:
                return low in TRUE_WORDS
            raise Invalid(f"must be true or false, got {text!r}")
        if self.kind == "choice":
            return self.check(t)
        if self.kind == "int_list":
            raise Invalid("is an option of the Python API only")
        value = None
        try:
            value = int(t)
        except ValueError:
            if self.kind != "int":
                try:
                    value = float(t)
                except ValueError:
                    pass
        if value is None:
            raise Invalid(f"must be {self.describe()}, got {text!r}")
        return self.check(value)

    def arg_type(self, text):
        """argparse type= for a command's own flag (e.g. --seed): parse, or a one-line usage error."""
        import argparse
        try:
            return self.parse(text)
        except Invalid as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    def help_line(self):
        """The --help text: help, default, what is allowed (argparse-safe)."""
        d = self.default
        if self.kind == "bool":
            tail = f"default {str(d).lower()}"
        elif d is None:
            tail = f"default none = {self.none}; {self.describe(meaning=False)}"
        else:
            tail = f"default {d}; {self.describe()}"
        return f"{self.help} ({tail})".replace("%", "%%")


def table(options):
    """(Option, ...) -> {name: Option}; names must be unique."""
    t = {o.name: o for o in options}
    assert len(t) == len(options), "an option is declared twice"
    return t


def defaults(options):
    """(Option, ...) -> {name: default}."""
    return {o.name: o.default for o in options}


def no_effect(given, names, effective, unless):
    """Cross-option check: the options in `names` have no effect when `effective` is
    False; naming one of them explicitly (`given`) is then an error that says what
    it needs (`unless`, e.g. "outlier_reservation is on (--outlier-reservation)")."""
    idle = [n for n in names if n in given]
    if idle and not effective:
        flags = ", ".join(f"{n} (--{n.replace('_', '-')})" for n in idle)
        return f"{flags} {'has' if len(idle) == 1 else 'have'} no effect unless {unless}"


# ---------------------------------------------------------------------------
# options shared by several methods (declared once; a method changes a field
# with .but(default=...))
# ---------------------------------------------------------------------------
BITS = Option("bits", "int", 4, "bits per weight code", range="[2, 8]")
GROUP_SIZE = Option("group_size", "int", None,
                    "input columns per quantization group (a shorter last group is allowed)",
                    range="[1, inf)", none="one grid per output row")
SYM = Option("sym", "bool", False, "symmetric grid (zero point fixed at 2^(bits-1))")
MSE = Option("mse", "bool", False, "search a clipped range per row (GPTQ's grid search, norm 2.4)")
ACT_ORDER = Option("act_order", "bool", False,
                   "process columns by decreasing Hessian diagonal (largest activations first)")
PERCDAMP = Option("percdamp", "float", 0.01,
                  "damping added to the Hessian diagonal, as a fraction of its mean",
                  range="[0, inf)")
BLOCKSIZE = Option("blocksize", "int", 128, "columns per lazy-update block", range="[1, inf)")
SEED = Option("seed", "int", 0, "random seed", range="[0, 9223372036854775807]")
