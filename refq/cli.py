"""The `refq` script.

    refq fetch                      print the default model's folder (fetch it first if needed)
    refq eval      [--model PATH]   perplexity on a text
    refq generate  [--model PATH]   continue a prompt
    refq quantize  --method NAME    quantize a model into a packed checkpoint
    refq info      PATH             what a packed checkpoint holds
    refq bench kernels              time the matmul kernels (refq/kernels/bench.py)
    refq golden write|verify DIR    golden fixtures for other implementations (GOLDEN.md)
    refq compare   [--methods ...]  methods side by side: bits, perplexity, time, memory
    refq export    CKPT --to F      write a checkpoint as GPTQ / AQLM (Hugging Face) or GGUF

Human-readable output and progress bars go to stderr; with --json one JSON
object alone goes to stdout. Exit codes: 0 ok, 1 failure, 2 bad usage or input.
"""
import argparse
import json
import math
import os
import sys
import time

from refq.cli_common import (DATA_DIR, DEFAULT_CALIB, DEFAULT_EVAL,  # noqa: F401
                             check_positions, check_seed, read_text)
from refq.errors import RefqError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _log(*a):
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- fetch
def cmd_fetch(args):
    from refq.fetch import ensure_default_model
    print(ensure_default_model())
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args):
    from tqdm import tqdm

    from llama_np import perplexity
    from refq.interop import evaluate as proto
    from refq.loading import load_for_inference
    ctx = args.ctx if args.ctx is not None else proto.DEFAULT_CTX[args.protocol]
    if ctx < 2:
        raise RefqError(f"--ctx {ctx}: must be at least 2")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise RefqError(f"--max-tokens {args.max_tokens}: must be at least 2")
    text = read_text(args.text)
    model, tok, path = load_for_inference(args.model, kernel=args.kernel, verify=args.verify)
    ids, bos = proto.encode(tok, path, text, args.protocol)
    ids = tok.check_ids(ids, model.cfg.vocab_size, f"--text {args.text}")
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    proto.check_length(len(ids), ctx, args.protocol, args.text)
    check_positions(min(ctx, len(ids)), model.cfg, f"--ctx {ctx}")
    ref = None
    if args.reference is not None:
        ref, ref_tok, _ = load_for_inference(args.reference, kernel=args.kernel, verify=args.verify)
        if ref_tok.vocab_size != tok.vocab_size or ref.cfg.vocab_size != model.cfg.vocab_size:
            raise RefqError(f"--reference {args.reference}: its vocabulary differs from the model's")
    t0 = time.perf_counter()
    with tqdm(total=len(ids), desc="eval", unit="tok", file=sys.stderr,
              disable=args.json and not sys.stderr.isatty()) as bar:
        if ref is None:
            ppl, n, _ = perplexity(model, ids, ctx, progress=bar.update,
                                   protocol=args.protocol, bos_id=bos)
        else:
            from llama_np.generate import kl_divergence
            kl = kl_divergence(model, ref, ids, ctx, progress=bar.update,
                               protocol=args.protocol, bos_id=bos)
            ppl, n = kl["ppl"], kl["tokens"]
    secs = time.perf_counter() - t0
    if args.json:
        res = {"ppl": ppl, "tokens": n, "seconds": round(secs, 3)}
        if args.protocol != "refq" or ref is not None:
            res.update(protocol=args.protocol, ctx=ctx)
        if ref is not None:
            res.update({k: kl[k] for k in ("kld", "kld_median", "kld_p99", "top1", "ppl_reference")})
        print(json.dumps(res))
    else:
        _log(f"{path}: perplexity {ppl:.4f} over {n} predicted tokens "
             f"(ctx {ctx}, protocol {args.protocol}) in {secs:.1f} s")
        if ref is not None:
            _log(f"  vs {args.reference}: mean KL {kl['kld']:.6f} (median {kl['kld_median']:.6f}, "
                 f"99th pct {kl['kld_p99']:.6f}), top-1 agreement {100 * kl['top1']:.2f} %, "
                 f"reference perplexity {kl['ppl_reference']:.4f}")
    return 0


# --------------------------------------------------------------------------- generate
def cmd_generate(args):
    from llama_np import generate
    from refq.loading import load_for_inference
    if args.max_new_tokens < 1:
        raise RefqError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise RefqError(f"--temperature {args.temperature}: must be a finite number >= 0")
    if not 0 < args.top_p <= 1:
        raise RefqError(f"--top-p {args.top_p}: must be in (0, 1]")
    check_seed(args.seed)
    model, tok, _ = load_for_inference(args.model, kernel=args.kernel, verify=args.verify)
    prompt = tok.check_ids(tok.encode(args.prompt), model.cfg.vocab_size, "--prompt")
    if not prompt:
        raise RefqError("--prompt: encodes to no tokens")
    limit = model.cfg.max_position_embeddings
    check_positions(len(prompt), model.cfg, f"--prompt ({len(prompt)} tokens)")
    # the last new token is sampled, never fed back: prompt + n_new - 1 positions
    n_new = min(args.max_new_tokens, limit - len(prompt) + 1)   # stop at the model's limit
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

    generate(model, prompt, n_new, args.temperature, args.top_p,
             args.seed, stop_ids=stop, on_token=show)
    sys.stdout.write(tok.decode(new)[len(shown):] + "\n")
    if n_new < args.max_new_tokens and len(new) == n_new:
        _log(f"refq generate: stopped after {n_new} new tokens at the model's "
             f"max_position_embeddings {limit}")
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
    s.add_argument("--ctx", type=int, default=None,
                   help="window length in tokens (default 512; 2048 with --protocol gptq)")
    s.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    s.add_argument("--protocol", choices=("refq", "gptq", "llama.cpp"), default="refq",
                   help="which tokens are scored: refq (default), gptq (GPTQ reference: whole "
                   "windows, remainder dropped) or llama.cpp (llama-perplexity: second half of "
                   "each window, BOS if the vocabulary adds one); README has the details")
    s.add_argument("--reference", metavar="MODEL", default=None,
                   help="also report the mean KL divergence from MODEL's next-token "
                   "distributions and the top-1 agreement (as llama-perplexity's KL mode)")
    s.add_argument("--json", action="store_true", help='print {"ppl", "tokens", "seconds"} on stdout '
                   '(+ protocol, ctx, and kld, kld_median, kld_p99, top1, ppl_reference)')
    s.add_argument("--kernel", choices=("cpu", "cpu-int", "gpu", "dequant"), default="cpu",
                   help="how a packed checkpoint multiplies: numba kernels on the packed "
                   "tensors (cpu, default; cpu-int: int16 activations, see refq.kernels), "
                   "CUDA through CuPy (gpu), or dequantize (dequant)")
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of a packed checkpoint's tensors")
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
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of a packed checkpoint's tensors")
    s.set_defaults(func=cmd_generate)

    from refq import quantize_cli
    quantize_cli.add_commands(sub)

    from refq.kernels import bench
    bench.add_commands(sub)

    from refq import golden       # refq golden write|verify (GOLDEN.md)
    golden.add_commands(sub)

    from refq import compare      # refq compare: methods side by side
    compare.add_commands(sub)

    from refq import export       # refq export: GPTQ / AQLM / GGUF layouts (FORMAT.md)
    export.add_commands(sub)
    return p


def main(argv=None):
    from refq.errors import Terminated, raise_on_sigterm
    args = build_parser().parse_args(argv)
    restore = raise_on_sigterm()      # SIGTERM cleans up like Ctrl-C (refq/outdir.py)
    try:
        return args.func(args)
    except RefqError as e:
        print(f"refq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print(f"refq {args.command}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"refq {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
