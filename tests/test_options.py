"""The option tables (refq/options.py, OPTIONS at the top of each method file).

Property: for every method and every option, the Python API
(validate_options), the command line of `refq quantize` (argparse + the
method's table), `refq quantize --options JSON` (what compare passes its
children) and a `refq compare` SPEC accept and reject the same values, and
produce the same validated options.  Then the bugs of issue 15 that came
from the hand-written checkers, one test each.
"""
import contextlib
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refq.api import quantize_weight, validate_options
from refq.cli import build_parser, main
from refq.compare import options_arg, parse_spec
from refq.errors import RefqError
from refq.methods import METHODS
from refq.options import Option
from refq.quantize_cli import options_from_args

PARSER = build_parser()
REJECTED = "rejected"
FLAG_OPTIONS = [(m, o) for m, spec in METHODS.items() for o in spec.options
                if not (o.api_only or o.common)]
# words: every choice of every option, the 2:4 pattern, junk; never one that
# reads as a number, a bool or none (the text of such a value is not a string)
WORDS = sorted({c for _, o in FLAG_OPTIONS for c in o.choices} | {"2:4", "abc", "", "4:8"})


def text(v):
    """A Python value as typed on the command line / in a SPEC."""
    if v is None:
        return "none"
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def values(o):
    """Values around an option's range and of every type."""
    lo, _, hi, _ = o.bounds()
    edges = [e for b in (lo, hi) if math.isfinite(b) for e in (b - 1, b, b + 1, b - 0.5, b + 0.5)]
    plain = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 20), st.floats(-1, 20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(edges or [0]), st.sampled_from(WORDS),
        st.sampled_from(list(o.also) or [0.5]))
    as_numpy = st.one_of(st.integers(-3, 20).map(np.int64), st.floats(-1, 20).map(np.float64),
                         st.booleans().map(np.bool_))
    return st.one_of(plain, as_numpy)


def via_api(method, opts):
    try:
        return validate_options(method, opts, given=set(opts))
    except RefqError:
        return REJECTED


def via_cli(method, opts):
    argv = ["quantize", "--method", method, "--out", "unused"]
    for name, v in opts.items():
        o = METHODS[method].table[name]
        if o.kind == "bool" and isinstance(v, (bool, np.bool_)):
            argv.append(o.flag if v else "--no-" + o.flag[2:])
        else:
            argv.append(f"{o.flag}={text(v)}")
    with contextlib.redirect_stderr(io.StringIO()):
        try:
            args = PARSER.parse_args(argv)
        except SystemExit:                       # argparse: e.g. --sym=3
            return REJECTED
    try:
        return options_from_args(args)[1]
    except RefqError:
        return REJECTED


def via_spec(method, opts):
    spec = method + ":" + ",".join(f"{k}={text(v)}" for k, v in opts.items())
    try:
        m, given = parse_spec(spec)
    except RefqError:
        return REJECTED
    return validate_options(m, given)


def via_json(method, opts):
    """`refq quantize --options JSON`, what compare passes its children."""
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in opts.items()}
    argv = ["quantize", "--method", method, "--out", "unused", "--options", json.dumps(plain)]
    try:
        return options_from_args(PARSER.parse_args(argv))[1]
    except RefqError:
        return REJECTED


def same_everywhere(method, opts):
    api, cli, spec = via_api(method, opts), via_cli(method, opts), via_spec(method, opts)
    assert api == cli == spec == via_json(method, opts), (method, opts, api, cli, spec)
    if api is not REJECTED:
        # what is stored (checkpoint, golden manifest) is plain JSON and validates to itself
        again = json.loads(json.dumps(api))
        assert again == api and validate_options(method, again) == api
        for k, v in api.items():
            assert v is None or type(v) in (bool, int, float, str, list), (k, v)
        # the API without `given` (stored dicts hold every option) accepts it too
        assert validate_options(method, opts) == api
    return api


@pytest.mark.parametrize("method,option", FLAG_OPTIONS,
                         ids=[f"{m}-{o.name}" for m, o in FLAG_OPTIONS])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_api_cli_spec_agree_on_one_option(method, option, data):
    v = data.draw(values(option))
    same_everywhere(method, {option.name: v})


@pytest.mark.parametrize("method", list(METHODS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_api_cli_spec_agree_on_several_options(method, data):
    """Several options at once: cross-option checks and options without effect too."""
    opts = [o for o in METHODS[method].options if not (o.api_only or o.common)]
    chosen = data.draw(st.lists(st.sampled_from(opts), min_size=1, max_size=4,
                                unique_by=lambda o: o.name))
    given_opts = {}
    for o in chosen:
        # mostly valid values (so that the cross-option checks are reached)
        ok = st.sampled_from([o.default] + list(o.choices) + list(o.also)
                             + ([None] if o.none else []) + ([True, False] if o.kind == "bool" else []))
        given_opts[o.name] = data.draw(st.one_of(ok, ok, values(o)))
    same_everywhere(method, given_opts)


def test_every_value_accepted_is_the_value_stored():
    """Independent of the tables: a few values each path must keep as they are."""
    cases = [("gptq", {"bits": 3, "group_size": 128, "act_order": True}),
             ("claq", {"bits": 2.5, "outlier_reservation": True, "or_fit": "before"}),
             ("claq", {"bits": 3.0}),
             ("slim", {"sparsity": 0.5, "rank": 0}), ("spqr", {"qq_bits": None}),
             ("squeezellm", {"outlier_iqr": math.inf}), ("wanda", {"bits": 16})]
    for method, opts in cases:
        got = same_everywhere(method, opts)
        for k, v in opts.items():
            assert got[k] == v and type(got[k]) is (int if k == "bits" and v == 3.0 else type(v))


# --------------------------------------------------------------------------- issue 15 bugs
def cli_opts(*argv):
    args = PARSER.parse_args(["quantize", "--out", "unused", *argv])
    return options_from_args(args)[1]


def test_rank_0_means_no_adapters_not_rank_ratio():
    # was: "0" and "-1" became None, i.e. rank_ratio 0.1
    assert cli_opts("--method", "slim", "--rank", "0")["rank"] == 0
    assert parse_spec("slim:rank=0")[1] == {"rank": 0}
    assert cli_opts("--method", "slim", "--rank", "none")["rank"] is None
    with pytest.raises(RefqError, match=r"--rank -1: must be an integer >= 0, or none"):
        cli_opts("--method", "slim", "--rank", "-1")
    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 16)).astype(np.float32)
    q = quantize_weight(W, np.eye(16), "slim", rank=0)
    assert q.info["rank"] == 0


def test_qq_bits_none_on_the_command_line_and_through_compare():
    assert cli_opts("--method", "spqr", "--qq-bits", "none")["qq_bits"] is None
    m, given = parse_spec("spqr:qq_bits=none")
    assert given == {"qq_bits": None}
    # what compare passes its child: the values as JSON, read back by the child's parser
    args = PARSER.parse_args(["quantize", "--method", m, "--out", "x", *options_arg(given)])
    opts, full = options_from_args(args)
    assert opts == {"qq_bits": None} and full["qq_bits"] is None


def test_a_string_is_not_a_bool():
    # was: outlier_reservation="false" turned outlier reservation ON (bool("false"))
    for v in ("false", "true", 0, 1, None, np.float64(1.0)):
        with pytest.raises(RefqError, match="option outlier_reservation must be true or false"):
            validate_options("claq", {"outlier_reservation": v})
    for method, spec in METHODS.items():
        for o in spec.options:
            if o.kind == "bool":
                with pytest.raises(RefqError, match=o.name):
                    validate_options(method, {o.name: "false"})


def test_option_without_effect_names_the_switch_it_needs():
    # was: quantized without outlier reservation, bits and loss exactly plain CLAQ's
    with pytest.raises(RefqError, match=r"or_ratio_high \(--or-ratio-high\), or_ratio_low "
                       r"\(--or-ratio-low\) have no effect unless outlier_reservation is on "
                       r"\(--outlier-reservation\)"):
        cli_opts("--method", "claq", "--or-ratio-high", "0.014", "--or-ratio-low", "0.004")
    full = cli_opts("--method", "claq", "--outlier-reservation", "--or-ratio-high", "0.02")
    assert full["outlier_reservation"] and full["or_ratio_high"] == 0.02
    with pytest.raises(RefqError, match="--outlier-reservation"):
        parse_spec("claq:or_top_frac=0.2")
    for argv, switch in [(["--method", "slim", "--adapter-group-size", "64"], "--adapter-bits"),
                         (["--method", "slim", "--rank", "8", "--rank-ratio", "0.2"], "--rank none"),
                         (["--method", "slim", "--rank", "0", "--adapter-bits", "4"], "adapters"),
                         (["--method", "slim", "--percdamp", "0.1"], "--pruner sparsegpt"),
                         (["--method", "spqr", "--qq-bits", "none", "--qq-group-size", "8"],
                          "--qq-bits"),
                         (["--method", "quantease", "--init", "rtn", "--percdamp", "0.1"],
                          "--init gptq"),
                         (["--method", "wanda", "--sym"], "--bits below 16"),
                         (["--method", "claq", "--bits", "3", "--no-ap"], "fractional")]:
        with pytest.raises(RefqError, match=switch):
            cli_opts(*argv)
    # the API accepts them: a stored option dict (checkpoint, golden manifest) holds every
    # option, also those without effect
    assert validate_options("claq", {"or_ratio_high": 0.02})["outlier_reservation"] is False


@pytest.mark.parametrize("value", ["-1", "0"])
def test_group_size_minus_one_or_zero_is_refused_not_per_row(value):
    with pytest.raises(RefqError, match=rf"--group-size {value}: must be an integer >= 1, "
                       r"or none \(one grid per output row\)"):
        cli_opts("--method", "rtn", "--group-size", value)
    with pytest.raises(RefqError, match="option group_size"):
        validate_options("rtn", {"group_size": int(value)})
    assert cli_opts("--method", "rtn", "--group-size", "none")["group_size"] is None


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_seed_minus_one_is_a_one_line_usage_error(command, tmp_path, capsys):
    argv = [command, "--seed", "-1", "--out", str(tmp_path / "out")]
    if command == "quantize":
        argv += ["--method", "rtn"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--seed" in err and "-1" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_inert_option_on_the_command_line_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["quantize", "--method", "claq", "--or-ratio-high", "0.014", "--or-ratio-low",
               "0.004", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--outlier-reservation" in err
    assert not out.exists()


# --------------------------------------------------------------------------- help
def test_every_option_has_help_default_and_range():
    for method, spec in METHODS.items():
        for o in spec.options:
            line = o.help_line()
            assert o.help and "default" in line, (method, o.name)
            if o.name != "group_size":                  # was: every optional int said so
                assert "per output row" not in line, (method, o.name)


def test_method_help_lists_the_method_options(capsys):
    for method, spec in METHODS.items():
        assert main(["quantize", "--method", method, "--help"]) == 0
        out = capsys.readouterr().out
        for o in spec.options:
            if not o.api_only:
                assert o.flag in out, (method, o.flag)
        assert "default" in out
    main(["quantize", "--method", "slim", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--rank RANK rank of the low-rank adapters" in out
    assert "default none = fp16 adapters" in out


def test_general_help_lists_methods_not_every_option(capsys):
    assert main(["quantize", "--help"]) == 0
    out = capsys.readouterr().out
    for m in METHODS:
        assert m in out
    assert "--or-ratio-high" not in out and "--method M --help" in out
    assert main(["quantize", "--method", "nope", "--help"]) == 2
    assert "--method nope: unknown method" in capsys.readouterr().err


def test_method_and_out_still_required(tmp_path, capsys):
    assert main(["quantize", "--out", str(tmp_path / "o")]) == 2
    assert "--method: required" in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn"]) == 2
    assert "--out: required" in capsys.readouterr().err


# --------------------------------------------------------------------------- --options
@pytest.mark.parametrize("argv,match", [
    (["--options", "[1]"], "JSON object"),
    (["--options", "{bits: 3}"], "not JSON"),
    (["--options", '{"frob": 1}'], "'frob' is not an option of method rtn"),
    (["--options", '{"bits": 3}', "--bits", "3"], "bits is given as a flag too"),
    (["--options", '{"bits": 3.0}'], "option bits|bits must be an integer"),
    (["--options", '{"sym": "false"}'], "sym must be true or false"),
])
def test_options_json_errors(argv, match):
    with pytest.raises(RefqError, match=match):
        cli_opts("--method", "rtn", *argv)


def test_options_json_api_only_and_seed():
    with pytest.raises(RefqError, match="column_bits is an option of the Python API only"):
        cli_opts("--method", "claq", "--options", '{"column_bits": [2, 3]}')
    with pytest.raises(RefqError, match="'seed' is not an option"):
        cli_opts("--method", "aqlm", "--options", '{"seed": 3}')
    assert cli_opts("--method", "aqlm", "--seed", "5")["seed"] == 5
    with pytest.raises(RefqError, match="use --seed"):
        parse_spec("aqlm:seed=3")


def test_declaration_errors_fail_at_import():
    with pytest.raises(AssertionError):
        Option("x", "int", 0, "")                               # no help
    with pytest.raises(AssertionError):
        Option("x", "int", 0, "h", range="2..8")                # not an interval
    with pytest.raises((AssertionError, ValueError)):
        Option("x", "int", 9, "h", range="[2, 8]")              # default out of range
