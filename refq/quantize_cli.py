"""`refq quantize` and `refq info`.

Method options become flags from the methods' OPTIONS tables (refq/options.py):
every option `x_y` of any method is a flag `--x-y VALUE` (`--x-y` / `--no-x-y`
for a bool); the value is read by the option of the method chosen, so a flag
the method does not have is an error naming it, and the method's own defaults
apply to the flags not given.  `--options JSON` gives options as one JSON
object instead (what `refq compare` passes its child processes).
`refq quantize --help` shows the common flags and the methods;
`refq quantize --method M --help` adds M's options, with help, default and range.
"""
import argparse
import hashlib
import json
import os
import sys
import time


from refq.errors import RefqError
from refq.options import SEED, Invalid


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _all_options():
    """{name: Option} over every method's flag options; an option name has one kind
    (bool or not) in every method that has it, so its flag works the same way."""
    from refq.methods import METHODS
    seen = {}
    for m, spec in METHODS.items():
        for o in spec.options:
            if o.api_only or o.common:
                continue
            first = seen.setdefault(o.name, o)
            assert (first.kind == "bool") == (o.kind == "bool"), f"option {o.name}: bool in one " \
                "method only"
    return seen


def add_commands(sub):
    from refq.cli_common import DEFAULT_CALIB, DEFAULT_EVAL
    from refq.methods import METHODS
    s = sub.add_parser("quantize", help="quantize a model into a packed checkpoint",
                       add_help=False, epilog=f"methods: {', '.join(METHODS)}. "
                       "`refq quantize --method M --help` lists M's options.")
    s.add_argument("-h", "--help", action="store_true",
                   help="show this help (with --method M: also M's options) and exit")
    s.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    s.add_argument("--method", help=f"one of: {', '.join(METHODS)} (required)")
    for name, o in sorted(_all_options().items()):           # help: --method M --help
        dest = "opt_" + name
        if o.kind == "bool":
            s.add_argument(o.flag, dest=dest, action="store_const", const=True,
                           help=argparse.SUPPRESS)
            s.add_argument("--no-" + o.flag[2:], dest=dest, action="store_const", const=False,
                           help=argparse.SUPPRESS)
        else:
            s.add_argument(o.flag, dest=dest, help=argparse.SUPPRESS)
    s.add_argument("--options", metavar="JSON", help="the method's options as one JSON object "
                   "(Python API names and values), e.g. '{\"bits\": 3, \"group_size\": null}'")
    s.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (default: data/calib.txt)")
    s.add_argument("--nsamples", type=int, default=128)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--seed", type=SEED.arg_type, default=0,
                   help="calibration windows, and the method's seed if it has one (default 0)")
    s.add_argument("--true-sequential", action="store_true",
                   help="quantize q,k,v -> o -> gate,up -> down, re-capturing inputs after each")
    s.add_argument("--calib-batch", type=int, default=None, metavar="N",
                   help="calibration samples per product and per float32 Gram matrix "
                        "(default: 2048 tokens' worth); more is faster and takes more memory, "
                        "and changes H in its float32 rounding")
    from refq.finetune import add_flags
    add_flags(s)                                   # --finetune, --finetune-epochs, ... (aqlm, slim)
    s.add_argument("--cluster", metavar="ADDRESS|local:N", default=None,
                   help="quantize the linears of each layer as parallel tasks on a Dask cluster: "
                   "local:N starts N worker processes here, ADDRESS is a running scheduler "
                   "(tcp://host:8786); the output is the same bytes (needs dask[distributed])")
    s.add_argument("--eval", action="store_true", help="perplexity before and after")
    s.add_argument("--eval-text", default=DEFAULT_EVAL)
    s.add_argument("--eval-max-tokens", type=int, default=None)
    s.add_argument("--out", help="output folder (must not exist, or be empty; required)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_quantize, parser=s)

    s = sub.add_parser("info", help="what a packed checkpoint holds")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)


def method_help(method):
    """`refq quantize --method M --help`: M's options with help, default and range."""
    from refq.methods import METHODS
    p = argparse.ArgumentParser(prog=f"refq quantize --method {method}", add_help=False,
                                usage=argparse.SUPPRESS)
    g = p.add_argument_group(f"options of --method {method} (flags; in a compare SPEC "
                             "and --options: the name with underscores)")
    for o in METHODS[method].options:
        if o.api_only:
            continue
        if o.common:
            g.add_argument(o.flag, metavar=o.name.upper(), help=o.help_line())
        elif o.kind == "bool":
            g.add_argument(o.flag, action=argparse.BooleanOptionalAction, help=o.help_line())
        else:
            g.add_argument(o.flag, metavar=o.name.upper(), help=o.help_line())
    api = [o.name for o in METHODS[method].options if o.api_only]
    if api:
        p.epilog = f"Python API only: {', '.join(api)} (refq.quantize_weight)."
    return p.format_help()


def _check_method(method):
    from refq.methods import METHODS
    if not method:
        raise RefqError(f"--method: required (one of: {', '.join(METHODS)})")
    if method not in METHODS:
        raise RefqError(f"--method {method}: unknown method (known: {', '.join(METHODS)})")


def given_options(args):
    """The method options given on the command line (flags and --options JSON), each
    checked by the method's OPTIONS table -> {name: value}; an error names the flag."""
    from refq.methods import METHODS
    method = args.method
    table = METHODS[method].table
    flags = ", ".join(o.flag for o in table.values() if not (o.api_only or o.common))
    given = {}
    for k, v in vars(args).items():
        if not k.startswith("opt_") or v is None:
            continue
        name = k[4:]
        o = table.get(name)
        flag = "--" + name.replace("_", "-")
        if o is None or o.api_only or o.common:
            raise RefqError(f"{flag}: not an option of method {method} (its options: {flags})")
        try:
            given[name] = o.check(v) if isinstance(v, bool) else o.parse(v)
        except Invalid as e:
            shown = flag if isinstance(v, bool) else f"{flag} {v}"
            raise RefqError(f"{shown}: {e}") from None
    if args.options is not None:
        try:
            obj = json.loads(args.options)
        except ValueError as e:
            raise RefqError(f"--options: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise RefqError("--options: must be a JSON object {\"option\": value, ...}")
        for name, v in obj.items():
            o = table.get(name)
            if o is None or o.common:
                names = ", ".join(n for n, x in table.items() if not (x.api_only or x.common))
                raise RefqError(f"--options: {name!r} is not an option of method {method} "
                                f"(its options: {names})")
            if o.api_only:
                raise RefqError(f"--options: {name} is an option of the Python API only")
            if name in given:
                raise RefqError(f"--options: {name} is given as a flag too")
            try:
                given[name] = o.check(v)
            except Invalid as e:
                raise RefqError(f"--options: {name} {e}") from None
    return given


def options_from_args(args):
    """-> (options to pass to quantize_weight, every option of the method validated),
    from the flags and --options; cross-option errors name the method."""
    from refq.api import validate_options
    from refq.methods import METHODS
    _check_method(args.method)
    opts = given_options(args)
    full = validate_options(args.method, opts, prefix=f"--method {args.method}: ",
                            given=set(opts))
    if "seed" in METHODS[args.method].table:                     # a common flag, passed on
        opts["seed"] = full["seed"] = args.seed
    return opts, full


def _check_finite(model, folder):
    """Refuse a model with a NaN/Inf in any tensor before any work, naming the tensor."""
    from refq.loading import check_finite
    check_finite(model, f"--model {folder}")


def _check_shapes(model, method, full):
    """Refuse, before calibrating, a layer the method cannot take with these options (e.g.
    AQLM 1x16 on a layer with fewer than 65,536 groups), naming the tensor and the flag.
    full: every option of the method, as options_from_args returns them."""
    from refq.methods import METHODS
    check = METHODS[method].check_shape
    if check is None:
        return
    for i, layer in enumerate(model.layers):
        for n, lin in layer.linears.items():
            check(lin.weight.shape, full, f"model.layers.{i}.{n}")


def _eval(model, ids, what):
    from tqdm import tqdm

    from llama_np import perplexity
    with tqdm(total=len(ids), desc=f"eval {what}", unit="tok", file=sys.stderr, leave=False) as bar:
        ppl, n, _ = perplexity(model, ids, min(512, model.cfg.max_position_embeddings),
                               progress=bar.update)
    _log(f"perplexity {what}: {ppl:.4f} ({n} tokens)")
    return ppl


def cmd_quantize(args):
    from refq.checkpoint import check_out_dir
    from refq.cli_common import check_seed
    from refq.fetch import resolve_model
    from refq.loading import is_packed

    if args.help:
        if args.method:
            _check_method(args.method)
        print(args.parser.format_help() + ("\n" + method_help(args.method) if args.method else ""))
        return 0
    _check_method(args.method)
    if args.out is None:
        raise RefqError("--out: required (the output folder)")
    check_seed(args.seed)
    for flag, v, low in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2),
                         ("--eval-max-tokens", args.eval_max_tokens, 2)):
        if v is not None and v < low:
            raise RefqError(f"{flag} {v}: must be at least {low}")
    # The output location first, before anything is computed (refq/outdir.py).
    from refq.fetch import default_model_path
    check_out_dir(args.out, args.force, log=_log,
                  inputs=[args.model or default_model_path(), args.calib]
                  + ([args.eval_text] if args.eval else []))
    if args.calib_batch is not None and args.calib_batch < 1:
        raise RefqError(f"--calib-batch {args.calib_batch}: need at least 1 sample per batch")
    # Validate every option now rather than after calibration, naming the flag at fault.
    opts, full_opts = options_from_args(args)
    from refq.finetune import options_from_args as finetune_options
    ft_opts = finetune_options(args, args.method)
    folder = resolve_model(args.model)
    if is_packed(folder):
        raise RefqError(f"--model {folder}: already a packed checkpoint; give the original model")
    # the cluster reached (or started) before any work; shut down however the run ends
    from contextlib import nullcontext
    from refq.cluster import connect
    with connect(args.cluster, log=_log) if args.cluster else nullcontext() as client:
        return _quantize(args, folder, opts, full_opts, ft_opts, client)


def _quantize(args, folder, opts, full_opts, ft_opts, client):
    """cmd_quantize once every argument is checked: calibrate, quantize, write --out."""
    from tqdm import tqdm

    from llama_np import Tokenizer, load_model
    from refq.calibrate import calibration_windows
    from refq.cli_common import check_positions, read_text
    from refq.pipeline import quantize_model
    from refq.resume import ResumeState, run_fingerprint, state_dir

    t_start = time.perf_counter()
    model, tok = load_model(folder), Tokenizer(folder)
    _check_finite(model, folder)
    _check_shapes(model, args.method, full_opts)
    calib_text = read_text(args.calib, "--calib")
    calib_ids = tok.check_ids(tok.encode(calib_text), model.cfg.vocab_size, f"--calib {args.calib}")
    check_positions(args.seqlen, model.cfg, f"--seqlen {args.seqlen}")
    try:
        windows = calibration_windows(calib_ids, args.nsamples, args.seqlen, args.seed)
    except RefqError as e:
        raise RefqError(f"--calib {args.calib}: {e}") from None
    eval_ids = None
    result = {}
    if args.eval:
        eval_ids = tok.encode(read_text(args.eval_text, "--eval-text"))[:args.eval_max_tokens]
        tok.check_ids(eval_ids, model.cfg.vocab_size, f"--eval-text {args.eval_text}")
        if len(eval_ids) < 2:
            raise RefqError(f"--eval-text {args.eval_text}: fewer than 2 tokens")
        result["ppl_before"] = _eval(model, eval_ids, "before")

    # a killed run restarted with the same arguments continues after its last finished layer
    state = ResumeState(state_dir(args.out), run_fingerprint(
        folder, args.method, full_opts, calib_text, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, true_sequential=args.true_sequential, calib_batch=args.calib_batch,
        finetune=ft_opts))
    n_layers = len(model.layers)
    # tokens through decoder layers: the rate (tok/s) and the ETA of the whole run
    bar = tqdm(total=n_layers * windows.size, desc=f"{args.method} layer 1/{n_layers}",
               unit="tok", unit_scale=True, file=sys.stderr)
    # with --cluster: a second bar, the linears whose tasks have finished on the cluster
    n_linears = sum(len(layer.linears) for layer in model.layers)
    linears = tqdm(total=n_linears, desc="cluster", unit="linear", file=sys.stderr,
                   position=1, disable=client is None)
    try:
        run = quantize_model(
            model, args.method, opts, windows, true_sequential=args.true_sequential,
            calib_batch=args.calib_batch, finetune=ft_opts, resume=state, progress=bar.update,
            on_layer=lambda i, s: bar.set_description(
                f"{args.method} layer {min(i + 2, n_layers)}/{n_layers}"),
            log=lambda m: tqdm.write(m, file=sys.stderr),
            cluster=client, on_linear=lambda name: linears.update())
        linears.close()
        bar.close()
        result.update(run.info)
        rows, bpw = run.layers, run.bits_per_weight
        if args.eval:
            result["ppl_after"] = _eval(model, eval_ids, "after")
        calibration = {"text": os.path.basename(args.calib),
                       "sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
                       "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                       "true_sequential": args.true_sequential}
        if args.calib_batch is not None:
            calibration["calib_batch"] = args.calib_batch
        run.save(args.out, folder, force=args.force, calibration=calibration)
        state.remove()
    except KeyboardInterrupt:          # Ctrl-C, or SIGTERM (refq.errors.Terminated)
        bar.close()                    # (closing twice is harmless)
        k = state.layers_done()
        if k:
            _log(f"refq quantize: {k} finished decoder layer(s) kept in {state.folder}; "
                 "the same command continues from there (delete it to start afresh)")
        raise
    finally:
        linears.close()
        bar.close()                    # an error message then starts on its own line

    _log(f"{'layer':<42} {'loss':>12} {'bits':>7}")
    for r in rows:
        _log(f"{r['name']:<42} {r['loss']:>12.4g} {r['bits_per_weight']:>7.3f}")
    _log(f"{args.method}: {bpw:.4f} bits per weight over {len(rows)} linears, "
         f"quantized in {run.seconds:.1f} s; wrote {args.out}")
    if args.json:
        out = {"method": args.method, "options": run.options, "bits_per_weight": bpw,
               "seconds": round(time.perf_counter() - t_start, 3), "layers": rows}
        out.update(result)
        print(json.dumps(out))
    return 0


def summarize(folder):
    """Method, options, bits per weight (with breakdown) and sizes of a packed checkpoint."""
    from refq.checkpoint import load_packed
    from refq.interop.foreign import foreign_method
    cfg, ckpt, qc, qws = load_packed(folder)
    n = sum(q.shape[0] * q.shape[1] for q in qws.values())
    qnames = {k for k in ckpt.names() if any(k.startswith(p + ".") for p in qws)}
    qbytes = sum(ckpt.raw(k).nbytes for k in qnames)
    breakdown = {}
    if foreign_method(folder):
        # A GPTQ / AQLM checkpoint of another tool: the total counts its tensors as
        # stored (qweight, qzeros, scales, g_idx / codes, codebooks, scales), so the
        # breakdown does too, by tensor kind (not refq's re-encoding of the same weights).
        for k in sorted(qnames):
            kind = k.rsplit(".", 1)[1]
            breakdown[kind] = breakdown.get(kind, 0.0) + 8 * ckpt.raw(k).nbytes / n
    else:
        for q in qws.values():
            for k, v in q.bits_breakdown.items():
                breakdown[k] = breakdown.get(k, 0.0) + v * q.shape[0] * q.shape[1] / n
    other = sum(ckpt.raw(k).nbytes for k in ckpt.names() if k not in qnames)
    files = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"path": folder, "method": qc.get("method"), "options": qc.get("options"),
            "format_version": qc.get("format_version"), "foreign": foreign_method(folder),
            "quantized_linears": len(qws), "quantized_weights": n,
            "bits_per_weight": 8 * qbytes / n if n else 0.0, "bits_breakdown": breakdown,
            "quantized_bytes": qbytes, "unquantized_bytes": other, "folder_bytes": files,
            **({"finetune": qc["finetune"]} if "finetune" in qc else {})}


def cmd_info(args):
    if not os.path.isdir(args.path):
        raise RefqError(f"{args.path}: no such folder")
    s = summarize(args.path)
    if args.json:
        print(json.dumps(s))
        return 0
    out = sys.stdout
    what = (f"{s['foreign'].upper()} checkpoint of another tool, read by refq "
            f"(checkpoint_format {s['format_version']})" if s.get("foreign") else
            f"refq packed checkpoint (format version {s['format_version']})")
    print(f"{s['path']}: {what}", file=out)
    print(f"  method           {s['method']}", file=out)
    print(f"  options          {json.dumps(s['options'])}", file=out)
    print(f"  quantized        {s['quantized_linears']} linears, {s['quantized_weights']:,} weights",
          file=out)
    print(f"  bits per weight  {s['bits_per_weight']:.4f}", file=out)
    for k, v in s["bits_breakdown"].items():
        print(f"    {k:<14} {v:.4f}", file=out)
    mib = lambda b: f"{b / 2**20:.2f} MiB"
    print(f"  sizes            quantized tensors {mib(s['quantized_bytes'])}, "
          f"unquantized tensors {mib(s['unquantized_bytes'])}, folder {mib(s['folder_bytes'])}",
          file=out)
    if "finetune" in s:                            # AQLM / SLiM block fine-tuning's record
        ft = s["finetune"]
        print(f"  fine-tuning      {len(ft['layers'])} layers in {ft['seconds']:.1f} s, "
              f"options {json.dumps(ft['options'])}", file=out)
        for r in ft["layers"]:
            hist = " ".join(f"{v:.4g}" for v in r["mse_history"])
            print(f"    layer {r['layer']:<3} mse per epoch (0 = before): {hist}", file=out)
    return 0
