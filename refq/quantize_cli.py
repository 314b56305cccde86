"""`refq quantize` and `refq info`.

Method options become flags automatically: every option in a method's
DEFAULTS (refq/methods/__init__.py) is a flag `--option-name`; only the flags
given on the command line are passed, so an option the method does not have
is an error naming it, and the method's own defaults apply otherwise.
"""
import argparse
import hashlib
import json
import os
import sys
import time
import warnings

import numpy as np

from refq.errors import RefqError


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def _optional_int(s):
    if s.lower() in ("none", "0", "-1"):
        return None
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {s!r}") from None


def _number(s):
    """An int if it reads as one, else a float (options shared by int and float methods)."""
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None


def _method_options():
    """{option: (default, [methods])} over all registered methods."""
    from refq.methods import METHODS
    opts = {}
    for m, spec in METHODS.items():
        for k, v in spec.defaults.items():
            if k in spec.api_only or k == "seed":   # --seed is a general flag, passed on
                continue
            opts.setdefault(k, (v, []))[1].append(m)
    return opts


def add_commands(sub):
    from refq.cli_common import DEFAULT_CALIB, DEFAULT_EVAL
    from refq.methods import METHODS
    s = sub.add_parser("quantize", help="quantize a model into a packed checkpoint")
    s.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    s.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    g = s.add_argument_group("method options (each only for the methods named)")
    for k, (default, methods) in sorted(_method_options().items()):
        flag = "--" + k.replace("_", "-")
        defaults = {m: METHODS[m].defaults[k] for m in methods}
        if len({repr(v) for v in defaults.values()}) == 1:
            helptext = f"{', '.join(methods)} (default {default})"
        else:
            helptext = "; ".join(f"{m} (default {v})" for m, v in defaults.items())
        if isinstance(default, bool):
            g.add_argument(flag, dest="opt_" + k, action=argparse.BooleanOptionalAction,
                           default=None, help=helptext)
        elif default is None or k == "group_size":
            g.add_argument(flag, dest="opt_" + k, type=_optional_int, default=argparse.SUPPRESS,
                           metavar=k.upper(), help=helptext + "; 'none' = per output row")
        elif isinstance(default, (int, float)):
            g.add_argument(flag, dest="opt_" + k, type=_number, default=None,
                           metavar=k.upper(), help=helptext)
        else:
            g.add_argument(flag, dest="opt_" + k, type=type(default), default=None,
                           metavar=k.upper(), help=helptext)
    s.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (default: data/calib.txt)")
    s.add_argument("--nsamples", type=int, default=128)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--true-sequential", action="store_true",
                   help="quantize q,k,v -> o -> gate,up -> down, re-capturing inputs after each")
    s.add_argument("--eval", action="store_true", help="perplexity before and after")
    s.add_argument("--eval-text", default=DEFAULT_EVAL)
    s.add_argument("--eval-max-tokens", type=int, default=None)
    s.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    s.add_argument("--force", action="store_true", help="replace a non-empty --out")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("info", help="what a packed checkpoint holds")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)


def _given_options(args):
    opts = {}
    for k, v in vars(args).items():
        # group_size may be given as None ('none' = per-channel); other unset flags are None
        if k.startswith("opt_") and (v is not None or k == "opt_group_size"):
            opts[k[4:]] = v
    return opts


def _check_options(method, opts):
    """Each given option: known to the method and valid, else an error naming its flag.
    -> every option of the method (defaults filled in, validated)."""
    from refq.api import option_error, validate_options
    from refq.methods import METHODS
    known = METHODS[method].defaults
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if k not in known:
            raise RefqError(f"{flag}: not an option of method {method} (its options: "
                            f"{', '.join('--' + o.replace('_', '-') for o in sorted(known))})")
        msg = option_error(method, k, v)
        if msg:
            raise RefqError(f"{flag} {v}: {msg}")
    return validate_options(method, opts, prefix=f"--method {method}: ")


def _check_finite(model, folder):
    """Refuse a model with a NaN/Inf in any tensor before any work, naming the tensor."""
    tensors = [("model.embed_tokens.weight", model.embed_tokens), ("model.norm.weight", model.norm)]
    if not model.cfg.tie_word_embeddings:
        tensors.append(("lm_head.weight", model.lm_head.weight))
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", layer.input_norm),
                    (p + "post_attention_layernorm.weight", layer.post_norm)]
        tensors += [(p + n + ".bias", b) for n, b in layer.biases.items()]
        tensors += [(p + n + ".weight", lin.weight) for n, lin in layer.linears.items()]
    for name, t in tensors:
        finite = np.isfinite(t)
        if not finite.all():
            raise RefqError(f"--model {folder}: tensor {name} has "
                            f"{finite.size - np.count_nonzero(finite)} NaN/Inf values")


def _check_shapes(model, method, full):
    """Refuse, before calibrating, a layer the method cannot take with these options (e.g.
    AQLM 1x16 on a layer with fewer than 65,536 groups), naming the tensor and the flag.
    full: every option of the method, as _check_options returns them."""
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
        ppl, n, _ = perplexity(model, ids, 512, progress=bar.update)
    _log(f"perplexity {what}: {ppl:.4f} ({n} tokens)")
    return ppl


def cmd_quantize(args):
    from tqdm import tqdm

    from llama_np import Tokenizer, load_model
    from refq import __version__
    from refq.api import quantize_weight
    from refq.calibrate import calibration_windows, quantize_layers
    from refq.checkpoint import check_out_dir, save_packed
    from refq.cli_common import read_text
    from refq.fetch import resolve_model
    from refq.loading import is_packed
    from refq.methods import METHODS

    if args.method not in METHODS:
        raise RefqError(f"--method {args.method}: unknown method (known: {', '.join(METHODS)})")
    opts = _given_options(args)
    if "seed" in METHODS[args.method].defaults:
        opts.setdefault("seed", args.seed)
    check_out_dir(args.out, args.force)
    # Validate every option now rather than after calibration, naming the flag at fault.
    full_opts = _check_options(args.method, opts)

    folder = resolve_model(args.model)
    if is_packed(folder):
        raise RefqError(f"--model {folder}: already a packed checkpoint; give the original model")
    t_start = time.perf_counter()
    model, tok = load_model(folder), Tokenizer(folder)
    _check_finite(model, folder)
    _check_shapes(model, args.method, full_opts)
    calib_text = read_text(args.calib, "--calib")
    windows = calibration_windows(tok.encode(calib_text), args.nsamples, args.seqlen, args.seed)
    eval_ids = None
    result = {}
    if args.eval:
        eval_ids = tok.encode(read_text(args.eval_text, "--eval-text"))[:args.eval_max_tokens]
        if len(eval_ids) < 2:
            raise RefqError(f"--eval-text {args.eval_text}: fewer than 2 tokens")
        result["ppl_before"] = _eval(model, eval_ids, "before")

    rows, quantized = [], {}

    def quantize(name, W, H):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            q = quantize_weight(W, H, args.method, name=name, **opts)
        for w in caught:  # e.g. GPTQ's "Cholesky failed, retried with more damping"
            tqdm.write(f"warning: {w.message}", file=sys.stderr)
        loss = q.info["loss"]                 # recorded once, by quantize_weight
        rows.append({"name": name, "loss": loss, "bits_per_weight": q.bits_per_weight})
        quantized[name] = q
        return q

    t_q = time.perf_counter()
    bar = tqdm(total=len(model.layers), desc=f"{args.method}", unit="layer", file=sys.stderr)
    quantize_layers(model, windows, quantize, args.true_sequential,
                    log=lambda i, s: bar.update(1))
    bar.close()
    q_secs = time.perf_counter() - t_q

    n_w = sum(q.shape[0] * q.shape[1] for q in quantized.values())
    bpw = sum(q.bits_per_weight * q.shape[0] * q.shape[1] for q in quantized.values()) / n_w
    if args.eval:
        result["ppl_after"] = _eval(model, eval_ids, "after")

    shown_opts = next(iter(quantized.values())).options if quantized else opts
    qc = {"method": args.method, "options": shown_opts, "refq_version": __version__,
          "bits_per_weight": bpw,
          "calibration": {"text": os.path.basename(args.calib),
                          "sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
                          "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                          "true_sequential": args.true_sequential}}
    save_packed(args.out, folder, model, quantized, qc, force=args.force)

    _log(f"{'layer':<42} {'loss':>12} {'bits':>7}")
    for r in rows:
        _log(f"{r['name']:<42} {r['loss']:>12.4g} {r['bits_per_weight']:>7.3f}")
    _log(f"{args.method}: {bpw:.4f} bits per weight over {len(rows)} linears, "
         f"quantized in {q_secs:.1f} s; wrote {args.out}")
    if args.json:
        out = {"method": args.method, "options": shown_opts, "bits_per_weight": bpw,
               "seconds": round(time.perf_counter() - t_start, 3), "layers": rows}
        out.update(result)
        print(json.dumps(out))
    return 0


def summarize(folder):
    """Method, options, bits per weight (with breakdown) and sizes of a packed checkpoint."""
    from refq.checkpoint import load_packed
    cfg, ckpt, qc, qws = load_packed(folder)
    n = sum(q.shape[0] * q.shape[1] for q in qws.values())
    breakdown = {}
    for q in qws.values():
        for k, v in q.bits_breakdown.items():
            breakdown[k] = breakdown.get(k, 0.0) + v * q.shape[0] * q.shape[1] / n
    qnames = {k for k in ckpt.names() if any(k.startswith(p + ".") for p in qws)}
    qbytes = sum(ckpt.raw(k).nbytes for k in qnames)
    other = sum(ckpt.raw(k).nbytes for k in ckpt.names() if k not in qnames)
    files = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return {"path": folder, "method": qc.get("method"), "options": qc.get("options"),
            "format_version": qc.get("format_version"),
            "quantized_linears": len(qws), "quantized_weights": n,
            "bits_per_weight": 8 * qbytes / n if n else 0.0, "bits_breakdown": breakdown,
            "quantized_bytes": qbytes, "unquantized_bytes": other, "folder_bytes": files}


def cmd_info(args):
    if not os.path.isdir(args.path):
        raise RefqError(f"{args.path}: no such folder")
    s = summarize(args.path)
    if args.json:
        print(json.dumps(s))
        return 0
    out = sys.stdout
    print(f"{s['path']}: refq packed checkpoint (format version {s['format_version']})", file=out)
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
    return 0
