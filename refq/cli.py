"""The `refq` script.

    refq fetch                      print the default model's folder (fetch it first if needed)
    refq eval      [--model PATH]   perplexity on a text
    refq generate  [--model PATH]   continue a prompt
    refq quantize  --method NAME    quantize a model into a packed checkpoint
    refq info      PATH             what a packed checkpoint holds
    refq bench kernels              time the matmul kernels (refq/kernels/bench.py)
    refq golden write|verify DIR    golden fixtures for other implementations (GOLDEN.md)
    refq compare   [--methods ...]  methods side by side: bits, perplexity, time, memory

Human-readable output and progress bars go to stderr; with --json one JSON
object alone goes to stdout. Exit codes: 0 ok, 1 failure, 2 bad usage or input.
"""
import argparse
import json
import os
import sys
import time

from refq.errors import RefqError

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
DEFAULT_EVAL = os.path.join(DATA_DIR, "eval.txt")
DEFAULT_CALIB = os.path.join(DATA_DIR, "calib.txt")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_text(path, option="--text"):
    if not os.path.isfile(path):
        raise RefqError(f"{option} {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise RefqError(f"{option} {path}: not UTF-8 text") from None
    except OSError as e:
        raise RefqError(f"{option} {path}: cannot read ({e.strerror})") from None


# --------------------------------------------------------------------------- fetch
def cmd_fetch(args):
    from refq.fetch import ensure_default_model
    print(ensure_default_model())
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args):
    from tqdm import tqdm

    from llama_np import perplexity
    from refq.loading import load_for_inference
    if args.ctx < 2:
        raise RefqError(f"--ctx {args.ctx}: must be at least 2")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise RefqError(f"--max-tokens {args.max_tokens}: must be at least 2")
    model, tok, path = load_for_inference(args.model, kernel=args.kernel)
    ids = tok.encode(read_text(args.text))
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    if len(ids) < 2:
        raise RefqError(f"--text {args.text}: has {len(ids)} token(s); perplexity needs at least 2")
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc="eval", unit="tok", file=sys.stderr,
              disable=args.json and not sys.stderr.isatty()) as bar:
        ppl, n, _ = perplexity(model, ids, args.ctx, progress=bar.update)
    secs = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"ppl": ppl, "tokens": n, "seconds": round(secs, 3)}))
    else:
        _log(f"{path}: perplexity {ppl:.4f} over {n} predicted tokens "
             f"(ctx {args.ctx}) in {secs:.1f} s")
    return 0


# --------------------------------------------------------------------------- generate
def cmd_generate(args):
    from llama_np import generate
    from refq.loading import load_for_inference
    if args.max_new_tokens < 1:
        raise RefqError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.temperature < 0:
        raise RefqError(f"--temperature {args.temperature}: must be >= 0")
    if not 0 < args.top_p <= 1:
        raise RefqError(f"--top-p {args.top_p}: must be in (0, 1]")
    model, tok, _ = load_for_inference(args.model, kernel=args.kernel)
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise RefqError("--prompt: encodes to no tokens")
    eos = model.cfg.eos_token_id
    stop = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    new, shown = [], ""

    def show(t):  # decode everything so far, print what is new (keeps UTF-8 whole)
        nonlocal shown
        new.append(t)
        text = tok.decode(new)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    generate(model, prompt, args.max_new_tokens, args.temperature, args.top_p,
             args.seed, stop_ids=stop, on_token=show)
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
    return 0


# --------------------------------------------------------------------------- main
def build_parser():
    p = _Parser(prog="refq", description="Low-bit weight quantization for LLaMA-family "
                "models, in numpy and numba.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("fetch", help="fetch the default model (SmolLM2-135M-Instruct) and print its folder")
    s.set_defaults(func=cmd_fetch)

    s = sub.add_parser("eval", help="perplexity of a model on a text")
    s.add_argument("--model", help="HF folder or refq packed checkpoint (default: SmolLM2-135M-Instruct)")
    s.add_argument("--text", default=DEFAULT_EVAL, help="UTF-8 text file (default: data/eval.txt)")
    s.add_argument("--ctx", type=int, default=512, help="window length in tokens (default 512)")
    s.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    s.add_argument("--json", action="store_true", help='print {"ppl", "tokens", "seconds"} on stdout')
    s.add_argument("--kernel", choices=("cpu", "cpu-int", "gpu", "dequant"), default="cpu",
                   help="how a packed checkpoint multiplies: numba kernels on the packed "
                   "tensors (cpu, default; cpu-int: int16 activations, see refq.kernels), "
                   "CUDA through CuPy (gpu), or dequantize (dequant)")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("generate", help="continue a prompt")
    s.add_argument("--model", help="HF folder or refq packed checkpoint (default: SmolLM2-135M-Instruct)")
    s.add_argument("--prompt", default="The capital of France is")
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--kernel", choices=("cpu", "cpu-int", "gpu", "dequant"), default="cpu",
                   help="how a packed checkpoint multiplies: numba kernels on the packed "
                   "tensors (cpu, default; cpu-int: int16 activations, see refq.kernels), "
                   "CUDA through CuPy (gpu), or dequantize (dequant)")
    s.set_defaults(func=cmd_generate)

    from refq import quantize_cli
    quantize_cli.add_commands(sub)

    from refq.kernels import bench
    bench.add_commands(sub)

    from refq import golden       # refq golden write|verify (GOLDEN.md)
    golden.add_commands(sub)

    from refq import compare      # refq compare: methods side by side
    compare.add_commands(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RefqError as e:
        print(f"refq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refq {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
