"""`refq golden write|verify` (GOLDEN.md)."""
import json

from refq.golden import spec
from refq.golden.verify import load_impl, status_of, summary_line, verify_suite
from refq.golden.write import log_stderr, write_suite


def add_commands(sub):
    s = sub.add_parser("golden", help="write / verify golden fixtures (GOLDEN.md)")
    gs = s.add_subparsers(dest="golden_what", metavar="WHAT", parser_class=type(s))
    gs.required = True
    w = gs.add_parser("write", help="write a golden suite into DIR")
    w.add_argument("dir", metavar="DIR")
    w.add_argument("--methods", nargs="+", metavar="M",
                   help="methods to include (default: every registered one)")
    w.add_argument("--model", help="SmolLM2 HF folder for the real-layer cases "
                   "(default: the fetched one, if any)")
    w.add_argument("--no-real", action="store_true", help="leave out the real-layer cases")
    w.add_argument("--force", action="store_true", help="replace DIR if it exists")
    w.set_defaults(func=cmd_golden_write)
    v = gs.add_parser("verify", help="check refq (or --impl) against a golden suite")
    v.add_argument("dir", metavar="DIR")
    v.add_argument("--impl", metavar="MODULE[:NAME]",
                   help="another implementation: a module (or an object in it) with decode(), "
                   "quantize() and/or step_<kind>() functions (GOLDEN.md, 'Writing a port'); "
                   "MODULE:FUNCTION names a quantize function")
    v.add_argument("--tier", nargs="+", choices=spec.TIERS, metavar="TIER",
                   help="tiers to check: decode, steps, e2e (default: all)")
    v.add_argument("--kernel", choices=("cpu", "cpu-int", "gpu", "dequant"), default="cpu",
                   help="kernel that computes y with refq (default cpu; cpu-int is checked "
                   "within its own int16-activation bound on top of y's)")
    v.add_argument("--methods", nargs="+", metavar="M", help="only these methods")
    v.add_argument("--cases", nargs="+", metavar="NAME", help="only these cases")
    v.add_argument("--json", action="store_true", help="print the results as one JSON object")
    v.set_defaults(func=cmd_golden_verify)


def cmd_golden_write(args):
    n, failed = write_suite(args.dir, methods=args.methods, model_path=args.model,
                            real=not args.no_real, force=args.force)
    log_stderr(f"golden write: {n} cases written to {args.dir}")
    for m, why in sorted(failed.items()):
        log_stderr(f"golden write: method {m} left out: {why}")
    return 0


def _clean(o):
    """JSON-safe copy of a result (numpy scalars, inf)."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "item"):
        o = o.item()
    if isinstance(o, float) and o != o or o in (float("inf"), float("-inf")):
        return repr(o)
    return o


def cmd_golden_verify(args):
    impl = load_impl(args.impl) if args.impl else None   # a bad --impl: exit 2, before any case
    results = verify_suite(args.dir, impl=impl, kernel=args.kernel, methods=args.methods,
                           cases=args.cases, tiers=args.tier)
    counts = {}
    for r in results:
        log_stderr(summary_line(r))
        st = status_of(r)
        counts[st] = counts.get(st, 0) + 1
    n_checks = sum(r["checked"] for r in results)
    n_fail = counts.get("FAIL", 0)
    log_stderr(f"golden verify: {counts.get('PASS', 0)} passed, {n_fail} failed, "
               f"{counts.get('NOT CHECKED', 0)} not checked, {counts.get('SKIP', 0)} skipped "
               f"({n_checks} checks)")
    ok = n_fail == 0 and n_checks > 0
    if args.json:
        print(json.dumps(_clean({"passed": ok, "checks": n_checks, "cases": results}),
                         sort_keys=True))
    if n_checks == 0:
        log_stderr("golden verify: nothing was checked")
    return 0 if ok else 1
