"""`refq compare`: every method side by side on the same model, calibration and texts.

    refq compare [--model PATH] [--methods SPEC ...] [--calib FILE] [--text FILE ...]
                 [--nsamples N] [--seqlen L] [--seed S] [--eval-max-tokens N]
                 [--out DIR] [--no-baseline] [--no-plot] [--json]

A SPEC is a method and, optionally, its options:

    gptq                                  the method's defaults
    gptq:bits=3,group_size=128,act_order=true
    claq:bits=2.2,outlier_reservation=true
    ckpt:PATH                             an existing checkpoint, not quantized again

Option names are those of `refq quantize` (underscores or dashes); values are
read as `refq quantize` reads its flags (`refq quantize --method M --help`):
numbers, true/false, none, or words. `ckpt:PATH` is a quantized checkpoint
that `refq eval` reads: refq's own, or a GPTQ / AQLM Hugging Face checkpoint
made by another tool (refq/interop/foreign.py); it must be of the same model
(same shapes, same tokens for every text). Its row is evaluated only; its bits
per weight are `refq info`'s, and it has no quantize time or memory. For each
other SPEC, in order, compare runs


    refq quantize --method M --options JSON --calib ... --out DIR/<spec>/checkpoint --json
    refq eval --model DIR/<spec>/checkpoint --text T --json      (for each --text)

as child processes (so the peak resident memory of each quantization is its
own, read from the child's rusage) and writes DIR/<spec>/result.json last.
Then it writes the table DIR/compare.md and DIR/compare.json and, when
matplotlib is installed, the plot DIR/compare.png (perplexity on the first
text against bits per weight, the Pareto front marked).

Resumable: a SPEC whose result.json exists in DIR is not recomputed (texts that
are new since are evaluated); a DIR made with other calibration settings is
refused rather than mixed. One SPEC that fails is reported in the table and
the others still run; the exit code is then 1.

With --cluster ADDRESS|local:N each SPEC is one Dask task (run_specs,
refq/cluster.py): run_spec runs on a worker, its children's messages kept
there (a failed child's last line goes into the table), and the resume rule
is the same one, applied by the worker to DIR (which every worker must see).
"""
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import time

from refq.errors import RefqError
from refq.options import SEED
from refq.outdir import write_file_atomic

# "Standard settings": ~3 bits for the quantizers (4 for SLiM, whose paper
# setting is 4-bit + 2:4), the methods' own defaults otherwise. AQLM is left out
# of the default list because it takes ~37 min on SmolLM2 with 2 cores (the others
# 3-5 min each); name it to run it.
DEFAULT_SPECS = [
    "rtn:bits=3,group_size=128",
    "gptq:bits=3,group_size=128,act_order=true",
    "claq:bits=3",
    "quantease:bits=3,group_size=128",
    "spqr:bits=3",
    "squeezellm:bits=3",
    "slim",
    "sparsegpt",
    "wanda",
]
BASELINE = "unquantized"
CKPT = "ckpt"          # spec kind ckpt:PATH, an existing checkpoint
RESULT = "result.json"


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


# ============================================================================ specs
def parse_spec(spec):
    """'gptq:bits=3,act_order=true' -> ('gptq', {'bits': 3, 'act_order': True}).

    Each value is read by the method's OPTIONS table (refq/options.py), as
    `refq quantize` reads its flags; the options together are then validated
    (an option without effect given the others is an error here too)."""
    from refq.api import validate_options
    from refq.methods import METHODS
    from refq.options import Invalid
    method, _, rest = spec.partition(":")
    if method == CKPT:                          # ckpt:PATH, checked by check_checkpoint
        if not rest.strip():
            raise RefqError(f"--methods {spec}: give the checkpoint's folder, ckpt:PATH")
        return CKPT, {"path": os.path.abspath(rest)}
    if method not in METHODS:
        raise RefqError(f"--methods {spec}: unknown method {method!r} (known: {', '.join(METHODS)})")
    table = METHODS[method].table
    opts = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not key:
            raise RefqError(f"--methods {spec}: {item!r} is not OPTION=VALUE")
        key = key.strip().replace("-", "_")
        if key in opts:
            raise RefqError(f"--methods {spec}: option {key} given twice")
        o = table.get(key)
        if key == "seed" or (o is not None and (o.api_only or o.common)):
            raise RefqError(f"--methods {spec}: {key} is not a per-method option here"
                            + (" (use --seed)" if key == "seed" else " (Python API only)"))
        flag = "--" + key.replace("_", "-")                 # errors name it as quantize does
        if o is None:
            known = ", ".join(x.flag for x in table.values() if not (x.api_only or x.common))
            raise RefqError(f"--methods {spec}: {flag}: not an option of method {method} "
                            f"(its options: {known})")
        try:
            opts[key] = o.parse(val)
        except Invalid as e:
            raise RefqError(f"--methods {spec}: {flag} {val.strip()}: {e}") from None
    validate_options(method, opts, prefix=f"--methods {spec}: ", given=set(opts))
    return method, opts


def options_arg(opts):
    """The `refq quantize --options JSON` argument for validated options: the values
    themselves (JSON: null, true, 0.5, Infinity), not flags to be parsed again."""
    return ["--options", json.dumps(opts)] if opts else []


def spec_dir(spec):
    """A folder name for a spec: its text with anything but [A-Za-z0-9._=-] as '_'."""
    return re.sub(r"[^A-Za-z0-9._=-]", "_", spec)


# ============================================================================ running
def _die_with_parent():
    """In the child, before exec (Linux): SIGTERM when the process that started it dies,
    so that a cluster worker killed (SIGKILL, out of memory) leaves no `refq quantize`
    running on behind it, writing where the task's re-run writes."""
    try:
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _run_child(args, quiet=False):
    """Run `python -m refq.cli ARGS`; -> (returncode, stdout, peak RSS in MiB, why).

    stderr (progress bars, errors) goes straight to ours; quiet (on a cluster
    worker, whose stderr nobody reads) keeps it in a temporary file instead,
    and `why` is then its last line when the child failed (else ""); the
    child then also ends with the worker (_die_with_parent).
    The child is reaped with os.wait4, whose rusage is the child's own
    (ru_maxrss: KiB on Linux).
    """
    import tempfile
    with tempfile.TemporaryFile("w+") if quiet else contextlib.nullcontext() as err:
        p = subprocess.Popen([sys.executable, "-m", "refq.cli"] + args,
                             stdout=subprocess.PIPE, stderr=err, text=True,
                             preexec_fn=_die_with_parent if quiet else None)
        try:
            out = p.stdout.read()
            p.stdout.close()
            _, status, usage = os.wait4(p.pid, 0)
        except BaseException:   # Ctrl-C / SIGTERM: the child cleans up its output, then we go
            p.terminate()
            p.wait()
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        why = "(its message is above)"
        if quiet:
            err.seek(0)
            lines = [line.strip() for line in err.read().splitlines() if line.strip()]
            why = f"({lines[-1]})" if lines else ""
    return p.returncode, out, usage.ru_maxrss / 1024, why


def _last_json(out):
    lines = out.strip().splitlines()
    return json.loads(lines[-1]) if lines else None


def _folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(folder) for f in fs)


def _write_atomic(path, text):
    """Write text to path, never half-written (refq.outdir.write_file_atomic)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _write_json_atomic(path, obj):
    _write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _eval_texts(model, texts, have, max_tokens, ctx, quiet=False):
    """ppl per text name for the texts not in `have`; -> (ppl dict, error or None)."""
    ppl = dict(have)
    for name, path in texts:
        if name in ppl:
            continue
        args = ["eval", "--model", model, "--text", path, "--ctx", str(ctx), "--json"]
        if max_tokens:
            args += ["--max-tokens", str(max_tokens)]
        rc, out, _, why = _run_child(args, quiet)
        if rc != 0:
            return ppl, f"refq eval on {path} exited with {rc} {why}".strip()
        ppl[name] = _last_json(out)["ppl"]
    return ppl, None


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def check_checkpoint(spec, path, model, texts, max_tokens):
    """Refuse, before any work, a ckpt:PATH that is not a quantized checkpoint of
    `model`: refq must read it, its shapes must be the model's, and its tokenizer must
    give the same tokens for every text (else the perplexities would not compare)."""
    from llama_np import LlamaConfig, Tokenizer
    from refq.loading import is_packed
    if not os.path.isdir(path):
        raise RefqError(f"--methods {spec}: no such folder {path}")
    if not is_packed(path):
        raise RefqError(f"--methods {spec}: {path} is not a quantized checkpoint refq reads "
                        "(refq's own, GPTQ or AQLM); an unquantized model is the baseline row")
    try:
        a, b = LlamaConfig.load(model), LlamaConfig.load(path)
        tok = Tokenizer(path)
    except RefqError as e:
        raise RefqError(f"--methods {spec}: {e}") from None
    for k in SHAPE_KEYS:
        if getattr(a, k) != getattr(b, k):
            raise RefqError(f"--methods {spec}: {k} {getattr(b, k)} differs from the model's "
                            f"{getattr(a, k)}: a checkpoint of another model")
    model_tok = Tokenizer(model)
    for name, text in texts:
        with open(text, encoding="utf-8") as f:
            t = f.read()
        if tok.encode(t)[:max_tokens] != model_tok.encode(t)[:max_tokens]:
            raise RefqError(f"--methods {spec}: its tokenizer encodes {name} differently "
                            "from the model's")


def _fingerprint(folder):
    """{file: [size, mtime_ns]} of a folder: a checkpoint changed since its row was made."""
    return {f: [os.path.getsize(os.path.join(folder, f)),
                os.stat(os.path.join(folder, f)).st_mtime_ns]
            for f in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, f))}


def run_spec(spec, method, opts, settings, texts, out_dir, log=_log, quiet=False):
    """Quantize + evaluate one spec (or reuse its result.json); -> result dict.
    quiet: the children's messages are kept (see _run_child), not shown."""
    d = os.path.join(out_dir, spec_dir(spec))
    res_path = os.path.join(d, RESULT)
    ckpt = opts["path"] if method == CKPT else os.path.join(d, "checkpoint")
    model = settings["model"] if method == BASELINE else ckpt       # what gets evaluated
    if os.path.exists(res_path) and method == CKPT:
        with open(res_path) as f:
            prev = json.load(f)
        if prev.get("checkpoint_files") != _fingerprint(ckpt):
            log(f"compare: {spec}: the checkpoint changed since its row was made; evaluating again")
            os.remove(res_path)
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
        old = res.get("settings") or {}
        if old != settings:
            diff = sorted(k for k in set(settings) | set(old) if old.get(k) != settings.get(k))
            raise RefqError(f"--out {out_dir}: {spec} was made with other settings "
                            f"({', '.join(diff)}); use another --out, or --force to redo it")
        missing = [n for n, _ in texts if n not in res["ppl"]]
        if not missing:
            log(f"compare: {spec}: done before, reused ({res_path})")
            return res
        if not os.path.isdir(model):
            raise RefqError(f"--out {out_dir}: {spec} needs evaluating on {', '.join(missing)} "
                            f"but its checkpoint is gone; use --force to redo it")
        log(f"compare: {spec}: evaluating on {', '.join(missing)}")
        res["ppl"], err = _eval_texts(model, texts, res["ppl"], settings["eval_max_tokens"],
                                      settings["ctx"], quiet)
        if err:
            return dict(res, error=err)
        _write_json_atomic(res_path, res)
        return res

    log(f"compare: {spec}: running")
    res = {"spec": spec, "method": method, "settings": settings}
    if method == BASELINE:
        res.update(options={}, bits_per_weight=32.0, quantize_seconds=0.0, peak_rss_mib=None,
                   packed_bytes=_folder_bytes(model))
    elif method == CKPT:                    # evaluated only; its bits as `refq info` counts them
        rc, out, _, why = _run_child(["info", ckpt, "--json"], quiet)
        if rc != 0:
            return dict(res, error=f"refq info exited with {rc} {why}".strip())
        info = _last_json(out)
        res.update(options={}, checkpoint=ckpt, checkpoint_method=info["method"],
                   checkpoint_options=info["options"], bits_per_weight=info["bits_per_weight"],
                   quantize_seconds=None, peak_rss_mib=None, packed_bytes=_folder_bytes(ckpt),
                   checkpoint_files=_fingerprint(ckpt))
    else:
        args = ["quantize", "--method", method, *options_arg(opts),
                "--model", settings["model"], "--calib", settings["calib"],
                "--nsamples", str(settings["nsamples"]), "--seqlen", str(settings["seqlen"]),
                "--seed", str(settings["seed"]), "--out", ckpt, "--force", "--json"]
        t0 = time.perf_counter()
        rc, out, rss, why = _run_child(args, quiet)
        secs = time.perf_counter() - t0
        if rc != 0:
            return dict(res, error=f"refq quantize exited with {rc} {why}".strip())
        q = _last_json(out)
        res.update(options=q["options"], bits_per_weight=q["bits_per_weight"],
                   quantize_seconds=round(secs, 1), peak_rss_mib=round(rss, 1),
                   packed_bytes=_folder_bytes(ckpt))
    res["ppl"], err = _eval_texts(model, texts, {}, settings["eval_max_tokens"], settings["ctx"],
                                  quiet)
    if err:
        return dict(res, error=err)
    _write_json_atomic(res_path, res)
    return res


def _spec_task(spec, method, opts, settings, texts, out_dir):
    """On a cluster worker: run_spec, its messages returned -> (result, [log lines])."""
    lines = []
    return run_spec(spec, method, opts, settings, texts, out_dir, log=lines.append,
                    quiet=True), lines


def run_specs(todo, settings, texts, out_dir, client=None):
    """run_spec for every (spec, method, opts) of todo -> results in todo's order.

    client (a dask.distributed Client, refq.cluster): each spec is one task,
    all submitted at once and run as workers free up (Dask's retries re-run
    one whose worker died).  A spec done before is reused by run_spec on the
    worker, from its result.json in out_dir (a folder every worker sees)."""
    def failed(r):
        if r.get("error"):
            _log(f"compare: {r['spec']}: FAILED: {r['error']}")
        return r

    if client is None:
        return [failed(run_spec(spec, method, opts, settings, texts, out_dir))
                for spec, method, opts in todo]
    from distributed import as_completed
    from tqdm import tqdm
    from refq.cluster import RETRIES
    futures = {client.submit(_spec_task, spec, method, opts, settings, texts, out_dir,
                             retries=RETRIES, pure=False, key=f"refq-compare-{spec_dir(spec)}"): k
               for k, (spec, method, opts) in enumerate(todo)}
    rows = [None] * len(todo)
    with tqdm(total=len(todo), desc="compare", unit="spec", file=sys.stderr) as bar:
        for f in as_completed(futures):
            try:
                rows[futures[f]], lines = f.result()  # a RefqError of run_spec: raised here
            except BaseException:
                client.cancel(list(futures))
                raise
            for line in lines:
                bar.write(line, file=sys.stderr)
            failed(rows[futures[f]])
            bar.update()
    return rows


# ============================================================================ table and plot
def pareto(rows, text):
    """Quantized specs on the Pareto front of (bits_per_weight, ppl on `text`): no other
    is <= in both and < in one. The unquantized baseline is a reference, not a point."""
    pts = [(r["spec"], r["bits_per_weight"], r["ppl"][text]) for r in rows
           if not r.get("error") and text in r.get("ppl", {}) and r["method"] != BASELINE]
    return {s for s, b, p in pts
            if not any((b2 <= b and p2 <= p) and (b2 < b or p2 < p) for _, b2, p2 in pts)}


def markdown(rows, texts, settings):
    names = [n for n, _ in texts]
    front = pareto(rows, names[0]) if names else set()
    lines = [f"Model {settings['model_name']}; calibration {settings['nsamples']} x "
             f"{settings['seqlen']} tokens of {os.path.basename(settings['calib'])} "
             f"(seed {settings['seed']}); perplexity with ctx {settings['ctx']}"
             + (f", first {settings['eval_max_tokens']} tokens" if settings["eval_max_tokens"]
                else "") + f". Pareto front (bits vs ppl on {names[0]}): *.", "",
             "| spec | options (other than the defaults) | bits/weight | " + " | ".join(f"ppl {n}" for n in names)
             + " | quantize s | peak RSS MiB | packed MiB | front |",
             "|---|---|---:|" + "---:|" * len(names) + "---:|---:|---:|:---:|"]
    from refq.methods import METHODS
    for r in rows:
        defaults = METHODS[r["method"]].defaults if r["method"] in METHODS else {}
        opts = {k: v for k, v in (r.get("options") or {}).items()
                if k not in defaults or defaults[k] != v}
        shown = ("-" if r["method"] == BASELINE else
                 f"checkpoint: {r.get('checkpoint_method')}" if r["method"] == CKPT else
                 ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "defaults")
        if r.get("error"):
            lines.append(f"| {r['spec']} | {shown} | failed: {r['error']} |")
            continue
        rss = "-" if r.get("peak_rss_mib") is None else f"{r['peak_rss_mib']:.0f}"
        secs = "-" if r.get("quantize_seconds") is None else f"{r['quantize_seconds']:.0f}"
        lines.append(
            f"| {r['spec']} | {shown} | {r['bits_per_weight']:.4f} | "
            + " | ".join(f"{r['ppl'][n]:.3f}" if n in r["ppl"] else "-" for n in names)
            + f" | {secs} | {rss} | {r['packed_bytes'] / 2**20:.2f} | "
            + ("*" if r["spec"] in front else "") + " |")
    return "\n".join(lines) + "\n"


def plot(rows, text, path):
    """PNG of ppl on `text` vs bits per weight, Pareto front joined; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if not r.get("error") and text in r.get("ppl", {})]
    front = pareto(ok, text)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for r in ok:
        if r["method"] == BASELINE:
            ax.axhline(r["ppl"][text], color="gray", ls="--", lw=1, label="unquantized")
    ok = [r for r in ok if r["method"] != BASELINE]
    for r in ok:
        on = r["spec"] in front
        ax.scatter(r["bits_per_weight"], r["ppl"][text], color="C3" if on else "C0", zorder=3)
        ax.annotate(r["spec"], (r["bits_per_weight"], r["ppl"][text]), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    f = sorted((r["bits_per_weight"], r["ppl"][text]) for r in ok if r["spec"] in front)
    if f:
        ax.plot([b for b, _ in f], [p for _, p in f], color="C3", lw=1, label="Pareto front")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (everything stored)")
    ax.set_ylabel(f"perplexity on {text}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    write_file_atomic(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    plt.close(fig)
    return True


# ============================================================================ command
def add_commands(sub):
    from refq.cli_common import DEFAULT_CALIB, DEFAULT_EVAL
    s = sub.add_parser("compare", help="quantize with several methods and tabulate "
                       "bits, perplexity, time, memory and size")
    s.add_argument("--model", help="HF folder (default: SmolLM2-135M-Instruct)")
    s.add_argument("--methods", nargs="+", metavar="SPEC", default=None,
                   help="METHOD[:option=value,...] or ckpt:PATH (an existing checkpoint: "
                   "refq's, GPTQ or AQLM) each (default: "
                   + " ".join(DEFAULT_SPECS) + "; aqlm only when named: ~37 min on SmolLM2 with 2 cores)")
    s.add_argument("--calib", default=DEFAULT_CALIB, help="calibration text (default: data/calib.txt)")
    s.add_argument("--text", nargs="+", default=[DEFAULT_EVAL],
                   help="texts to measure perplexity on (default: data/eval.txt)")
    s.add_argument("--nsamples", type=int, default=32)
    s.add_argument("--seqlen", type=int, default=512)
    s.add_argument("--seed", type=SEED.arg_type, default=0, help="calibration windows, and "
                   "the seed of the methods that have one (default 0)")
    s.add_argument("--ctx", type=int, default=512, help="perplexity window (default 512)")
    s.add_argument("--eval-max-tokens", type=int, default=None, help="use only the first N tokens")
    s.add_argument("--out", default="refq-compare", help="results folder (default: ./refq-compare)")
    s.add_argument("--force", action="store_true", help="recompute every SPEC, even if done")
    s.add_argument("--no-baseline", action="store_true", help="leave out the unquantized model's row")
    s.add_argument("--no-plot", action="store_true", help="no PNG plot")
    s.add_argument("--json", action="store_true", help="print compare.json on stdout")
    s.add_argument("--cluster", metavar="ADDRESS|local:N", default=None,
                   help="run the SPECs as parallel tasks on a Dask cluster: local:N starts N "
                   "worker processes here, ADDRESS is a running scheduler (tcp://host:8786) "
                   "whose workers see --out (needs dask[distributed])")
    s.set_defaults(func=cmd_compare)


def cmd_compare(args):
    from refq.cli_common import read_text
    from refq.fetch import resolve_model
    from refq.loading import is_packed

    specs = args.methods or DEFAULT_SPECS
    if len(set(specs)) != len(specs):
        raise RefqError("--methods: a SPEC is given twice")
    parsed = [(s, *parse_spec(s)) for s in specs]          # every spec checked before any work
    dirs = {}
    for s, _, _ in parsed:
        if spec_dir(s) in dirs or spec_dir(s) == BASELINE:
            raise RefqError(f"--methods {s}: same folder name as {dirs.get(spec_dir(s), BASELINE)}")
        dirs[spec_dir(s)] = s
    for opt, v in (("--nsamples", args.nsamples), ("--seqlen", args.seqlen), ("--ctx", args.ctx)):
        if v < (2 if opt == "--ctx" else 1):
            raise RefqError(f"{opt} {v}: must be at least {2 if opt == '--ctx' else 1}")
    if args.eval_max_tokens is not None and args.eval_max_tokens < 2:
        raise RefqError(f"--eval-max-tokens {args.eval_max_tokens}: must be at least 2")
    read_text(args.calib, "--calib")
    texts, contents, seen = [], [], set()
    for t in args.text:
        contents.append(read_text(t, "--text"))
        name = os.path.basename(t)
        if name in seen:
            raise RefqError(f"--text {t}: another text has the same file name")
        seen.add(name)
        texts.append((name, os.path.abspath(t)))
    model = resolve_model(args.model)
    if is_packed(model):
        raise RefqError(f"--model {model}: already a packed checkpoint; give the original model")
    from llama_np import Tokenizer
    tok = Tokenizer(model)
    for t, text in zip(args.text, contents):     # refused now, not after a quantization
        n = len(tok.encode(text)[:args.eval_max_tokens])
        if n < 2:
            raise RefqError(f"--text {t}: has {n} token(s); perplexity needs at least 2")
    from refq.outdir import check_output      # not /, ~, ., an input; creatable
    for s, method, opts in parsed:
        if method == CKPT:
            check_checkpoint(s, opts["path"], model, texts, args.eval_max_tokens)
    check_output(args.out, args.force, None, None, reuse=True, log=_log,
                 inputs=[model, args.calib] + list(args.text)
                 + [o["path"] for _, m, o in parsed if m == CKPT])

    settings = {"model": os.path.abspath(model), "model_name": os.path.basename(os.path.normpath(model)),
                "calib": os.path.abspath(args.calib), "calib_sha256": _sha256_file(args.calib),
                "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed,
                "ctx": args.ctx, "eval_max_tokens": args.eval_max_tokens}
    # the cluster reached (or started) before any work; shut down however the run ends
    from refq.cluster import connect
    with connect(args.cluster, log=_log) if args.cluster else contextlib.nullcontext() as client:
        return _compare(args, parsed, settings, texts, client)


def _compare(args, parsed, settings, texts, client):
    """cmd_compare once every argument is checked: run the specs, write the report."""
    import shutil

    from refq._version import __version__
    os.makedirs(args.out, exist_ok=True)
    todo = ([] if args.no_baseline else [(BASELINE, BASELINE, {})]) + parsed
    if args.force:
        spec_dirs = [os.path.join(args.out, spec_dir(s)) for s, _, _ in todo]
        for d in spec_dirs:     # all checked before any is removed
            ours = {RESULT, "checkpoint"}      # + leftovers of a killed child (refq/outdir.py)
            if os.path.isdir(d) and any(n not in ours and not re.fullmatch(
                    r"\.checkpoint\.(tmp|old)-\d+", n) for n in os.listdir(d)):
                raise RefqError(f"--out {args.out}: {d} holds files refq compare did not "
                                f"write; not replacing it, even with --force")
        for d in spec_dirs:
            shutil.rmtree(d, ignore_errors=True)
    rows = run_specs(todo, settings, texts, args.out, client)

    table = markdown(rows, texts, settings)
    report = {"refq_version": __version__, "settings": settings,
              "texts": [n for n, _ in texts], "pareto_front": sorted(pareto(rows, texts[0][0])),
              "rows": rows}
    _write_atomic(os.path.join(args.out, "compare.md"), table)
    _write_json_atomic(os.path.join(args.out, "compare.json"), report)
    _log(table)
    if not args.no_plot:
        png = os.path.join(args.out, "compare.png")
        if plot(rows, texts[0][0], png):
            _log(f"compare: plot {png}")
        else:
            _log("compare: matplotlib is not installed, so no plot (pip install matplotlib)")
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 1 if any(r.get("error") for r in rows) else 0
